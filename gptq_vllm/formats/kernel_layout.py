"""The kernel layout of one linear weight: what the plugin's ops consume and `gptq-convert` writes.

One function, `to_kernel`, turns a canonical QuantizedWeight into it; the plugin calls it once at load
time for GPTQ checkpoints, the converter calls it offline, and `from_kernel` inverts it for `verify`
and the tests.  Layouts:

  marlin  (2, 3, 4, 8)   qweight = Marlin words of the rows taken in `perm` order (marlin.py: tiles for 4/8
                         bit, units of 2/4 k-tiles for 2/3 bit), K and N padded to the GEMM's tile multiples;
                         scales Marlin-permuted; qzeros Marlin zero points (asym only; 2/3 bit in the 4-bit
                         packing); the kernel computes s * (q - z), z implied 2^(b-1) when symmetric.  The
                         default for every width.
  exllama (2, 3, 4, 8)   qweight = ExLlama-shuffled words of the rows taken in `perm` order; scales plain;
                         qzeros exact zeros packed along N like GPTQ v2.  Written on request (--layout
                         exllama), read wherever a checkpoint holds it.

Act-order: perm = argsort(g_idx) (stable); rows are stored permuted, so the kernel sees contiguous
full groups and the activations are gathered x[:, perm] (formats.md §3.4 A).  A trivial g_idx gives no
perm at all.  g_idx_sorted (= g_idx[perm]) is kept only when groups are not contiguous runs of G rows,
which happens for row-parallel shards of act-order layers (vLLM's is_k_full = False case).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

import torch

from . import bitpack, exllama, marlin
from .act_order import act_order_perm, default_g_idx, inverse_perm, num_groups
from .errors import FormatError
from .gptq import QuantizedWeight, sym_zero


class Layout(str, Enum):
    MARLIN = "marlin"
    EXLLAMA = "exllama"


def default_layout(bits: int) -> Layout:
    """The layout converted checkpoints get unless asked otherwise: Marlin, which holds every GPTQ width
    (marlin.MARLIN_BITS); ExLlama is written only on request."""
    return Layout.MARLIN


@dataclass(frozen=True)
class KernelWeight:
    layout: Layout
    bits: int
    group_size: int
    sym: bool
    in_features: int  # K of the weight as loaded (before padding)
    out_features: int  # N before padding
    qweight: torch.Tensor
    scales: torch.Tensor
    qzeros: torch.Tensor | None
    perm: torch.Tensor | None  # int32 [K_padded]: row k of qweight is input channel perm[k]
    g_idx_sorted: torch.Tensor | None  # int32 [K_padded]: group of row k, when groups are not runs of G

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.qweight": self.qweight, f"{prefix}.scales": self.scales}
        if self.qzeros is not None:
            out[f"{prefix}.qzeros"] = self.qzeros
        if self.perm is not None:
            out[f"{prefix}.perm"] = self.perm
        if self.g_idx_sorted is not None:
            out[f"{prefix}.g_idx_sorted"] = self.g_idx_sorted
        return out


def expected_shapes(layout: Layout, bits: int, group_size: int, sym: bool, K: int, N: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors a converted module (pad=False) of this layout holds; perm only with act-order."""
    ng = num_groups(K, group_size)
    shapes = {"scales": (ng, N), "perm": (K,)}
    if layout is Layout.MARLIN:
        shapes["qweight"] = marlin.qweight_shape(K, N, bits)
        if not sym:
            shapes["qzeros"] = (ng, bitpack.packed_length(N, marlin.ZERO_BITS[bits]))
    else:
        shapes["qweight"] = (bitpack.packed_length(K, bits), N)
        shapes["qzeros"] = (ng, bitpack.packed_length(N, bits))
    return shapes


def _groups_are_runs(g_sorted: torch.Tensor, group_size: int) -> bool:
    return bool(torch.equal(g_sorted, default_g_idx(g_sorted.numel(), group_size, g_sorted.device)))


def to_kernel(weight: QuantizedWeight, layout: Layout | None = None, scale_dtype: torch.dtype | None = None,
              pad: bool = True) -> KernelWeight:
    """Canonical weight -> kernel layout (rows permuted by act-order, padded, packed, scales arranged)."""
    layout = layout or default_layout(weight.bits)
    K, N = weight.codes.shape
    perm = None
    w = weight
    pack_perm = None  # rows marlin.pack gathers itself
    if not torch.equal(weight.g_idx, default_g_idx(K, weight.group_size, weight.g_idx.device)):
        perm = act_order_perm(weight.g_idx)
        unpadded = not pad or marlin.padded_shape(K, N, weight.group_size) == (K, N)
        if layout is Layout.MARLIN and unpadded:
            # Fast path (the converter's): marlin.pack takes the rows in perm order itself, without
            # materialising the permuted codes; only g_idx is permuted here.
            w, pack_perm = replace(weight, g_idx=weight.g_idx[perm.to(torch.int64)]), perm
        else:
            w = weight.permute_rows(perm)
    g_sorted = None if _groups_are_runs(w.g_idx, w.group_size) else w.g_idx.to(torch.int32)
    scales = w.scales if scale_dtype is None else w.scales.to(scale_dtype)
    if layout is Layout.MARLIN:
        if pad:
            kp, np_ = marlin.padded_shape(K, N, w.group_size)
            if g_sorted is not None and kp != K:
                raise FormatError(f"act-order shard with K={K} cannot be padded to the Marlin tile ({kp})")
            w = marlin.pad(w, kp, np_)
            scales = w.scales if scale_dtype is None else w.scales.to(scale_dtype)
            if perm is not None and kp != K:
                perm = torch.cat([perm, torch.arange(K, kp, dtype=torch.int32, device=perm.device)])
        kp, np_ = w.codes.shape
        return KernelWeight(
            layout=layout, bits=w.bits, group_size=w.group_size, sym=w.sym, in_features=K, out_features=N,
            qweight=marlin.pack(w.codes, w.bits, pack_perm),
            scales=marlin.permute_scales(scales, w.group_size, kp),
            qzeros=None if w.sym else marlin.pack_zeros(w.zeros, marlin.ZERO_BITS[w.bits]),
            perm=perm, g_idx_sorted=g_sorted,
        )
    return KernelWeight(
        layout=layout, bits=w.bits, group_size=w.group_size, sym=w.sym, in_features=K, out_features=N,
        qweight=exllama.shuffle_codes(w.codes, w.bits),
        scales=scales.contiguous(),
        qzeros=bitpack.pack_cols(w.zeros, w.bits),
        perm=perm, g_idx_sorted=g_sorted,
    )


def from_kernel(kw: KernelWeight, name: str = "weight") -> QuantizedWeight:
    """Exact inverse of to_kernel (padding removed, rows back in input-channel order); errors name `name`."""
    K, N = kw.in_features, kw.out_features
    if kw.layout is Layout.MARLIN:
        kp = marlin.stored_rows(kw.qweight, kw.bits)
        np_ = kw.scales.shape[1]
        codes = marlin.unpack(kw.qweight, kw.bits, kp, np_)
        scales = marlin.unpermute_scales(kw.scales, kw.group_size, kp)
        zeros = (torch.full(scales.shape, sym_zero(kw.bits), dtype=torch.int32, device=codes.device) if kw.sym
                 else marlin.unpack_zeros(kw.qzeros, marlin.ZERO_BITS[kw.bits], np_))
    else:
        kp, np_ = K, kw.scales.shape[1]
        codes = exllama.unshuffle_codes(kw.qweight, kw.bits, K)
        scales = kw.scales
        zeros = bitpack.unpack_cols(kw.qzeros, kw.bits, np_)
    # A row-parallel act-order shard keeps the scales of every group of the full K.
    ng = scales.shape[0] if kw.g_idx_sorted is not None else num_groups(K, kw.group_size)
    if kw.perm is not None:
        inv = inverse_perm(kw.perm).to(torch.int64)
        codes = codes[inv]
    codes = codes[:K, :N]
    if kw.g_idx_sorted is not None:
        g_idx = kw.g_idx_sorted[inverse_perm(kw.perm).to(torch.int64)] if kw.perm is not None else kw.g_idx_sorted
    elif kw.perm is not None:
        g_idx = default_g_idx(kp, kw.group_size, codes.device)[inverse_perm(kw.perm).to(torch.int64)][:K]
    else:
        g_idx = default_g_idx(K, kw.group_size, codes.device)
    w = QuantizedWeight(codes=codes.contiguous(), scales=scales[:ng, :N].contiguous(), zeros=zeros[:ng, :N].contiguous(),
                        g_idx=g_idx.to(torch.int32), bits=kw.bits, group_size=kw.group_size, sym=kw.sym)
    w.validate(name, shard=kw.g_idx_sorted is not None)
    return w
