"""compressed-tensors `pack-quantized` (llm-compressor) <-> canonical weight (formats.md §6).

Per module, with K = in_features, N = out_features:
    weight_packed      [N, K*b/32] int32   stored field u = q + 2^(b-1) packed along K (dim 1)
    weight_scale       [N, NG]             the GPTQ scales transposed
    weight_zero_point  [N*b/32, NG] int32  asymmetric only; exact zeros packed along N (dim 0)
    weight_g_idx       [K] int32           only for actorder "group"
    weight_shape       [2] int32 or int64  (N, K) (llm-compressor writes int64)
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


def expected_shapes(in_features: int, out_features: int, bits: int, group_size: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors of one module (weight_zero_point: asymmetric only; weight_g_idx: act-order)."""
    ng = num_groups(in_features, group_size)
    return {
        "weight_packed": (out_features, bitpack.packed_length(in_features, bits)),
        "weight_scale": (out_features, ng),
        "weight_zero_point": (bitpack.packed_length(out_features, bits), ng),
        "weight_g_idx": (in_features,),
        "weight_shape": (2,),
    }


def scheme(cfg: dict, where: str) -> tuple[int, int, bool, bool]:
    """(bits, group_size, sym, act_order) of a compressed-tensors quantization_config holding weight-only
    pack-quantized integer weights; FormatError naming `where` for anything else."""
    fmt = cfg.get("format")
    if fmt != "pack-quantized":
        raise FormatError(f"{where}: compressed-tensors format {fmt!r} is not supported; only 'pack-quantized' "
                          f"(integer weights packed into int32) holds GPTQ-style weights")
    if cfg.get("quantization_status", "compressed") != "compressed":
        raise FormatError(f"{where}: quantization_status {cfg.get('quantization_status')!r}; expected 'compressed'")
    schemes = []
    for name, group in (cfg.get("config_groups") or {}).items():
        w = group.get("weights") or {}
        if group.get("input_activations") or group.get("format", fmt) != "pack-quantized":
            raise FormatError(f"{where}: config group {name!r} is not a weight-only pack-quantized scheme")
        if w.get("type", "int") != "int" or w.get("strategy") not in ("group", "channel"):
            raise FormatError(f"{where}: config group {name!r}: weights {w.get('type')!r} with strategy "
                              f"{w.get('strategy')!r}; expected int weights with strategy 'group' or 'channel'")
        group_size = int(w["group_size"]) if w.get("strategy") == "group" else -1
        schemes.append((int(w["num_bits"]), group_size, bool(w.get("symmetric", True)),
                        w.get("actorder") in ("group", "dynamic")))
    if not schemes:
        raise FormatError(f"{where}: compressed-tensors config has no config_groups")
    if any(s != schemes[0] for s in schemes[1:]):
        raise FormatError(f"{where}: config groups with different weight schemes are not supported")
    return schemes[0]


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
            raise FormatError(f"{key} is missing")
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
