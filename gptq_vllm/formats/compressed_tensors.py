"""compressed-tensors `pack-quantized` (llm-compressor) <-> canonical weight (formats.md §6).

Per module, with K = in_features, N = out_features:
    weight_packed      [N, K*b/32] int32   stored field u = q + 2^(b-1) packed along K (dim 1)
    weight_scale       [N, NG]             the GPTQ scales transposed
    weight_zero_point  [N*b/32, NG] int32  asymmetric only; exact zeros packed along N (dim 0)
    weight_g_idx       [K] int32           only for actorder "group"
    weight_shape       [2] int32           (N, K)
The stored field u equals the GPTQ code q, so weight_packed is the GPTQ qweight transposed, bit for bit.
3-bit is refused: compressed-tensors packs 10 codes per word, vLLM allocates ceil(3K/32).
"""

from __future__ import annotations

import torch

from . import bitpack
from .act_order import default_g_idx, num_groups
from .errors import FormatError
from .gptq import QuantizedWeight, sym_zero

CT_BITS = (2, 4, 8)
SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape")


def _check_bits(bits: int) -> None:
    if bits not in CT_BITS:
        raise FormatError(f"compressed-tensors pack-quantized is supported for {CT_BITS}-bit here, not {bits}-bit")


def to_tensors(weight: QuantizedWeight, prefix: str, scale_dtype: torch.dtype = torch.float16,
               write_g_idx: bool | None = None) -> dict[str, torch.Tensor]:
    """Canonical weight -> the tensors of one module (names prefixed with `prefix.`)."""
    _check_bits(weight.bits)
    weight.validate(prefix)
    K, N = weight.codes.shape
    out = {
        f"{prefix}.weight_packed": bitpack.pack_rows(weight.codes, weight.bits).t().contiguous(),
        f"{prefix}.weight_scale": weight.scales.t().to(scale_dtype).contiguous(),
        f"{prefix}.weight_shape": torch.tensor([N, K], dtype=torch.int32),
    }
    if not weight.sym:
        out[f"{prefix}.weight_zero_point"] = bitpack.pack_rows(weight.zeros.t(), weight.bits).contiguous()
    trivial = torch.equal(weight.g_idx, default_g_idx(K, weight.group_size, weight.g_idx.device))
    if write_g_idx or (write_g_idx is None and not trivial):
        out[f"{prefix}.weight_g_idx"] = weight.g_idx.to(torch.int32).contiguous()
    return out


def from_tensors(tensors: dict[str, torch.Tensor], prefix: str, bits: int, group_size: int, sym: bool) -> QuantizedWeight:
    """The tensors of one module -> canonical weight, checking every shape against weight_shape."""
    _check_bits(bits)

    def get(suffix: str) -> torch.Tensor:
        key = f"{prefix}.{suffix}"
        if key not in tensors:
            raise FormatError(f"{key}: missing")
        return tensors[key]

    N, K = (int(v) for v in get("weight_shape").tolist())
    ng = num_groups(K, group_size)
    packed = get("weight_packed")
    expected = (N, bitpack.packed_length(K, bits))
    if tuple(packed.shape) != expected:
        raise FormatError(f"{prefix}.weight_packed: shape {tuple(packed.shape)}, expected {expected}")
    scale = get("weight_scale")
    if tuple(scale.shape) != (N, ng):
        raise FormatError(f"{prefix}.weight_scale: shape {tuple(scale.shape)}, expected ({N}, {ng})")
    if sym:
        zeros = torch.full((ng, N), sym_zero(bits), dtype=torch.int32, device=scale.device)
    else:
        zp = get("weight_zero_point")
        zexp = (bitpack.packed_length(N, bits), ng)
        if tuple(zp.shape) != zexp:
            raise FormatError(f"{prefix}.weight_zero_point: shape {tuple(zp.shape)}, expected {zexp}")
        zeros = bitpack.unpack_rows(zp, bits, N).t().contiguous()
    g_key = f"{prefix}.weight_g_idx"
    g_idx = tensors[g_key].to(torch.int32) if g_key in tensors else default_g_idx(K, group_size, packed.device)
    w = QuantizedWeight(
        codes=bitpack.unpack_rows(packed.t().contiguous(), bits, K),
        scales=scale.t().contiguous(),
        zeros=zeros,
        g_idx=g_idx,
        bits=bits,
        group_size=group_size,
        sym=sym,
    )
    w.validate(prefix)
    return w
