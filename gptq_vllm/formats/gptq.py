"""GPTQ checkpoint tensors (AutoGPTQ / GPTQModel QuantLinear) and the canonical in-memory weight.

Logical weight W[k, n] (K = in_features, N = out_features, y = x @ W):

    W[k, n] = scales[g, n] * (q[k, n] - z[g, n]),   g = g_idx[k]

On disk (formats.md §1):
    qweight [K*b/32, N] int32   codes packed along K (bitpack.pack_rows)
    qzeros  [NG, N*b/32] int32  zero codes packed along N; v1 ("gptq") stores z-1, v2 ("gptq_v2") stores z
    scales  [NG, N]             fp16 (bf16 in some AutoGPTQ files)
    g_idx   [K] int32           group of each input channel

Every reader and writer goes through QuantizedWeight, which holds exact zeros (v2 semantics), so the
off-by-one of v1 lives in exactly two functions: encode_zeros and decode_zeros.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import Enum

import torch

from . import bitpack
from .act_order import check_g_idx, num_groups
from .errors import FormatError, ZeroFormatError


class ZeroFormat(str, Enum):
    V1 = "gptq"  # stored zero = z - 1 (AutoGPTQ, TheBloke, most of the Hub)
    V2 = "gptq_v2"  # stored zero = z (GPTQModel internal format)

    @classmethod
    def parse(cls, value: str | None) -> "ZeroFormat":
        if value is None:
            return cls.V1
        v = str(value).lower()
        for member in cls:
            if member.value == v:
                return member
        raise FormatError(f"unknown checkpoint_format {value!r}; expected 'gptq' (v1) or 'gptq_v2'")


def sym_zero(bits: int) -> int:
    """The implied zero of a symmetric grid: 2^(b-1) (vLLM's uint4b8 / uint8b128)."""
    return 2 ** (bits - 1)


@dataclass(frozen=True)
class QuantizedWeight:
    """One quantized linear layer in canonical, unpacked form.

    codes [K, N] integer (int32, or uint8 where memory matters) in [0, 2^b); scales [NG, N] float;
    zeros [NG, N] int32 exact zeros in [0, 2^b);
    g_idx [K] int32.  group_size is -1 for one group over all of K.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int
    sym: bool

    @property
    def in_features(self) -> int:
        return self.codes.shape[0]

    @property
    def out_features(self) -> int:
        return self.codes.shape[1]

    def validate(self, name: str = "weight", shard: bool = False) -> None:
        """Check shapes, ranges and g_idx.  shard=True accepts a row-parallel slice of an act-order
        weight: its g_idx holds global group ids and the scales keep every group of the full K."""
        bitpack.check_bits(self.bits)
        K, N = self.codes.shape
        ng = self.scales.shape[0] if shard else num_groups(K, self.group_size)
        if tuple(self.scales.shape) != (ng, N):
            raise FormatError(f"{name}.scales: shape {tuple(self.scales.shape)}, expected ({ng}, {N})")
        if tuple(self.zeros.shape) != (ng, N):
            raise FormatError(f"{name}.zeros: shape {tuple(self.zeros.shape)}, expected ({ng}, {N})")
        if self.scales.numel():
            # min/max propagate NaN and show +-inf: one fast reduction instead of isfinite().all(), which is
            # 10x slower on fp16.
            lo, hi = (float(v) for v in torch.aminmax(self.scales.float()))
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise FormatError(f"{name}.scales: contains NaN or inf")
        if shard:
            if tuple(self.g_idx.shape) != (K,) or int(self.g_idx.min()) < 0 or int(self.g_idx.max()) >= ng:
                raise FormatError(f"{name}.g_idx: expected ({K},) group ids in [0, {ng})")
        else:
            check_g_idx(self.g_idx, K, self.group_size, f"{name}.g_idx")
        top = 2**self.bits
        for label, t in (("codes", self.codes), ("zeros", self.zeros)):
            if t.numel():
                lo, hi = (int(v) for v in torch.aminmax(t))  # one pass over the codes, not two
                if lo < 0 or hi >= top:
                    raise FormatError(f"{name}.{label}: values outside [0, {top - 1}]")
        if self.sym and not bool((self.zeros == sym_zero(self.bits)).all()):
            raise FormatError(f"{name}: symmetric weight whose zeros are not all {sym_zero(self.bits)}")

    def permute_rows(self, perm: torch.Tensor) -> "QuantizedWeight":
        """Rows (input channels) taken in the order perm; groups keep their meaning (formats.md §3.4 A)."""
        p = perm.to(torch.int64)
        return replace(self, codes=torch.index_select(self.codes, 0, p), g_idx=self.g_idx[p])

    def permute_cols(self, perm: torch.Tensor) -> "QuantizedWeight":
        """Output channels taken in the order perm (folding a consumer's act-order into this producer)."""
        p = perm.to(torch.int64)
        return replace(self, codes=self.codes[:, p], scales=self.scales[:, p], zeros=self.zeros[:, p])


@dataclass(frozen=True)
class GPTQTensors:
    """The four packed tensors of one module as a GPTQ checkpoint stores them."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor

    def as_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.qweight": self.qweight,
            f"{prefix}.qzeros": self.qzeros,
            f"{prefix}.scales": self.scales,
            f"{prefix}.g_idx": self.g_idx,
        }


def encode_zeros(zeros: torch.Tensor, bits: int, fmt: ZeroFormat, name: str = "qzeros") -> torch.Tensor:
    """Exact zeros [NG, N] -> packed qzeros [NG, N*b/32] in the given convention."""
    stored = zeros.to(torch.int64)
    if fmt is ZeroFormat.V1:
        if stored.numel() and int(stored.min()) == 0:
            raise ZeroFormatError(
                f"{name}: zero point 0 cannot be stored in GPTQ v1 (it stores z-1, and -1 clobbers every "
                f"higher field of its word); write checkpoint_format 'gptq_v2' or compressed-tensors instead"
            )
        stored = stored - 1
    return bitpack.pack_cols(stored, bits)


def decode_zeros(qzeros: torch.Tensor, bits: int, out_features: int, fmt: ZeroFormat, name: str = "qzeros") -> torch.Tensor:
    """Packed qzeros -> exact zeros [NG, N] int32.

    A v1 field of 2^b - 1 decodes to z = 2^b, which no grid has: it is the footprint of an asymmetric
    zero of 0 written as -1 by AutoGPTQ, and the neighbouring fields of that word are destroyed too.
    """
    fields = bitpack.unpack_cols(qzeros, bits, out_features)
    if fmt is ZeroFormat.V2:
        return fields
    if bool((fields == 2**bits - 1).any()):
        g, n = (fields == 2**bits - 1).nonzero()[0].tolist()
        raise ZeroFormatError(
            f"{name}: v1 zero field {2**bits - 1} at group {g}, column {n} means a stored z-1 of -1 "
            f"(an asymmetric zero of 0 that AutoGPTQ wrote as 0xFFFFFFFF and that corrupted its word); "
            f"the weights of that word cannot be recovered. If the file is really gptq_v2, say so in "
            f"checkpoint_format"
        )
    return fields + 1


def detect_zero_format(qzeros: torch.Tensor, bits: int, out_features: int) -> ZeroFormat | None:
    """The convention a symmetric checkpoint's zeros reveal, or None when the data cannot tell.

    Symmetric files store the constant 2^(b-1)-1 (v1) or 2^(b-1) (v2) in every field (formats.md §1.4).
    Asymmetric v1 data shows itself only through a field of 2^b - 1 (impossible in v1 except as
    corruption), so such a file is reported as V2.
    """
    fields = bitpack.unpack_cols(qzeros, bits, out_features)
    mid = sym_zero(bits)
    if bool((fields == mid - 1).all()):
        return ZeroFormat.V1
    if bool((fields == mid).all()):
        return ZeroFormat.V2
    if bool((fields == 2**bits - 1).any()):
        return ZeroFormat.V2
    return None


def check_zero_format(qzeros: torch.Tensor, bits: int, out_features: int, declared: ZeroFormat, name: str) -> None:
    """Raise ZeroFormatError when the data contradicts the declared convention (a mislabelled checkpoint)."""
    detected = detect_zero_format(qzeros, bits, out_features)
    if detected is not None and detected is not declared:
        raise ZeroFormatError(
            f"{name}: checkpoint says checkpoint_format={declared.value!r} but its zero points are those of "
            f"{detected.value!r} (a mislabelled checkpoint); set checkpoint_format {detected.value!r} in its "
            f"quantization config, or pass --checkpoint-format {detected.value} to gptq-convert"
        )


def pack(weight: QuantizedWeight, fmt: ZeroFormat, scale_dtype: torch.dtype = torch.float16) -> GPTQTensors:
    """Canonical weight -> GPTQ checkpoint tensors."""
    weight.validate()
    return GPTQTensors(
        qweight=bitpack.pack_rows(weight.codes, weight.bits),
        qzeros=encode_zeros(weight.zeros, weight.bits, fmt),
        scales=weight.scales.to(scale_dtype).contiguous(),
        g_idx=weight.g_idx.to(torch.int32).contiguous(),
    )


def expected_shapes(in_features: int, out_features: int, bits: int, group_size: int) -> dict[str, tuple[int, ...]]:
    ng = num_groups(in_features, group_size)
    return {
        "qweight": (bitpack.packed_length(in_features, bits), out_features),
        "qzeros": (ng, bitpack.packed_length(out_features, bits)),
        "scales": (ng, out_features),
        "g_idx": (in_features,),
    }


def check_shapes(t: GPTQTensors, in_features: int, out_features: int, bits: int, group_size: int, name: str) -> None:
    for key, shape in expected_shapes(in_features, out_features, bits, group_size).items():
        got = tuple(getattr(t, key).shape)
        if got != shape:
            raise FormatError(
                f"{name}.{key}: shape {got}, expected {shape} for K={in_features}, N={out_features}, "
                f"bits={bits}, group_size={group_size}"
            )
    for key in ("qweight", "qzeros"):
        if getattr(t, key).dtype != torch.int32:
            raise FormatError(f"{name}.{key}: dtype {getattr(t, key).dtype}, expected torch.int32")


def unpack(
    t: GPTQTensors,
    bits: int,
    group_size: int,
    sym: bool,
    fmt: ZeroFormat,
    in_features: int | None = None,
    name: str = "weight",
) -> QuantizedWeight:
    """GPTQ checkpoint tensors -> canonical weight, validating shapes, zeros, scales and g_idx."""
    bitpack.check_bits(bits)
    N = t.scales.shape[1]
    K = in_features if in_features is not None else t.qweight.shape[0] * 32 // bits
    check_shapes(t, K, N, bits, group_size, name)
    zeros = decode_zeros(t.qzeros, bits, N, fmt, f"{name}.qzeros")
    w = QuantizedWeight(
        codes=bitpack.unpack_rows(t.qweight, bits, K),
        scales=t.scales,
        zeros=zeros,
        g_idx=t.g_idx.to(torch.int32),
        bits=bits,
        group_size=group_size,
        sym=sym,
    )
    w.validate(name)
    return w
