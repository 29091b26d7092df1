"""The one validation of a quantized checkpoint: every invariant, defined once (docs/converter.md lists them).

The plugin (config.py, linear.py) and every `gptq-convert` command (through the readers: inspect,
convert, verify, eval) call these functions, so they accept and refuse exactly the same checkpoints,
with the same one-line message naming the checkpoint's own tensor (never vLLM's fused name) and what
was expected; the callers put the file in front.

  config     config.json present; config.json and quantize_config.json agree; a converted checkpoint's 3-bit
             units in the current unit layout (quant_config.check_unit_layout); module sizes from config.json
             (the config itself is parsed by quant_config.parse, for the readers and the plugin alike)
  tensors    every tensor present with its dtype and shape (gptq_weight, compressed_weight, kernel_weight)
  values     finite scales, codes and zeros in range, symmetric zeros 2^(b-1), v1/v2 label matches the data
             (QuantizedWeight.validate, gptq.check_zero_format / decode_zeros)
  act-order  g_idx a balanced assignment in range (act_order.check_g_idx); present when the config says
             act-order; `perm` a permutation (act_order.check_perm); equal across modules vLLM fuses (check_fused);
             g_idx, not desc_act, decides act-order, refused only where a path cannot honour it (check_implied_g_idx)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import compressed_tensors, gptq
from .act_order import act_order_perm, check_g_idx, check_perm, default_g_idx, is_trivial
from .errors import FormatError
from .gptq import GPTQTensors, QuantizedWeight, ZeroFormat
from .kernel_layout import KernelWeight, Layout, expected_shapes as kernel_shapes, from_kernel
from .quant_config import check_unit_layout, normalize, value

# ---- config files ------------------------------------------------------------------------------------------

GPTQ_CONFIG_FILES = ("quantize_config.json", "quant_config.json")
# Keys that change how the tensors are read: config.json and quantize_config.json must mean the same by them
# (a missing key means its default), or vLLM (config.json) and AutoGPTQ (quantize_config.json) would read the
# same tensors differently.
CORE_KEYS = ("quant_method", "bits", "group_size", "sym", "desc_act", "static_groups", "checkpoint_format",
             "pack_dtype", "lm_head", "dynamic")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from e


def embedded(config: dict) -> tuple[str, dict] | None:
    """(where, quantization config) held by config.json (also under text_config, or as compression_config)."""
    for holder, cfg in (("", config), ("text_config.", config.get("text_config") or {})):
        for key in ("quantization_config", "compression_config"):
            if isinstance(cfg.get(key), dict):
                return f"{holder}{key}", cfg[key]
    return None


def config_sources(directory: Path) -> tuple[dict, list[tuple[str, dict]]]:
    """(config.json, [(where, quantization config as written), ...]) of a checkpoint directory, in the order
    vLLM looks (config.json first).

    Refuses a directory without config.json (no engine can build the model) and config files that
    disagree on a CORE_KEY.  An empty list means an unquantized model.
    """
    directory = Path(directory)
    config_json = directory / "config.json"
    if not config_json.is_file():
        raise FormatError(f"{config_json}: missing; a checkpoint needs the model's config.json (architecture "
                          f"and sizes) beside its weights, or no engine can build the model: copy it from the "
                          f"float model")
    model = read_json(config_json)
    found: list[tuple[str, dict]] = []
    emb = embedded(model)
    if emb is not None:
        found.append((f"config.json[{emb[0]}]", emb[1]))
    for name in GPTQ_CONFIG_FILES:
        if (directory / name).is_file():
            found.append((name, read_json(directory / name)))
    if found:
        where, cfg = found[0][0], normalize(found[0][1])
        for name, other in found[1:]:
            other = normalize(other)
            for key in CORE_KEYS:
                if value(cfg, key) != value(other, key):
                    raise FormatError(f"{directory}: {where} says {key}={value(cfg, key)!r} but {name} says "
                                      f"{key}={value(other, key)!r}; make them agree")
        check_unit_layout(found[0][1], str(directory / found[0][0].split("[")[0]))
    return model, found


def tensor_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file of `directory` holding it (from the index or the headers only)."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return {name: directory / f for name, f in read_json(index).get("weight_map", {}).items()}
    out: dict[str, Path] = {}
    for f in sorted(directory.glob("*.safetensors")):
        with open(f, "rb") as h:
            n = int.from_bytes(h.read(8), "little")
            try:
                header = json.loads(h.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # a corrupt file: the weight loader names it
        out.update(dict.fromkeys((k for k in header if k != "__metadata__"), f))
    return out


def module_files(files: dict[str, Path]) -> dict[str, str]:
    """Quantized module -> the file(s) of its quantized tensors, worded as every entry point's messages put it."""
    quantized = set(GPTQ_DTYPES) | set(CT_DTYPES) | set(KERNEL_DTYPES)
    by_module: dict[str, set[str]] = {}
    for name, f in files.items():
        module, _, suffix = name.rpartition(".")
        if suffix in quantized:
            by_module.setdefault(module, set()).add(str(f))
    return {m: ", ".join(sorted(fs)) for m, fs in by_module.items()}


# Module leaf -> (K, N) as functions of the text config, for the decoder layers of Llama-style models.
_ATTN = {
    "q_proj": lambda h, q, kv, i: (h, q),
    "k_proj": lambda h, q, kv, i: (h, kv),
    "v_proj": lambda h, q, kv, i: (h, kv),
    "o_proj": lambda h, q, kv, i: (q, h),
}
_MLP = {
    "gate_proj": lambda h, q, kv, i: (h, i),
    "up_proj": lambda h, q, kv, i: (h, i),
    "down_proj": lambda h, q, kv, i: (i, h),
}
_DENSE_MLP_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # mlp.{gate,up,down}_proj are intermediate_size wide
_ATTN_TYPES = _DENSE_MLP_TYPES + ("mixtral", "qwen2_moe", "qwen3_moe")


def model_dims(model_config: dict, module: str) -> tuple[int, int] | None:
    """(K, N) of a decoder module from config.json, where the architecture fixes it; else None.

    These are the sizes vLLM builds the layer with, so a checkpoint tensor is checked against them
    (not only against its neighbours) by every entry point.
    """
    cfg = model_config if "hidden_size" in model_config else (model_config.get("text_config") or {})
    parent, _, leaf = module.rpartition(".")
    kind = parent.rpartition(".")[2]
    mtype = cfg.get("model_type", model_config.get("model_type"))
    if kind == "self_attn" and mtype in _ATTN_TYPES and leaf in _ATTN:
        rule = _ATTN[leaf]
    elif kind == "mlp" and mtype in _DENSE_MLP_TYPES and leaf in _MLP:
        rule = _MLP[leaf]
    else:
        return None
    try:
        h, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        kv = int(cfg.get("num_key_value_heads") or heads)
        hd = int(cfg.get("head_dim") or h // heads)
        inter = int(cfg.get("intermediate_size") or 0)
    except (KeyError, TypeError, ValueError):
        return None
    return rule(h, heads * hd, kv * hd, inter)


# ---- tensors of one module ---------------------------------------------------------------------------------

SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)
GPTQ_DTYPES = {"qweight": (torch.int32,), "qzeros": (torch.int32,), "scales": SCALE_DTYPES, "g_idx": INDEX_DTYPES}
# llm-compressor writes weight_shape as int64, our writer int32: both are (N, K).
CT_DTYPES = {"weight_packed": (torch.int32,), "weight_zero_point": (torch.int32,), "weight_scale": SCALE_DTYPES,
             "weight_g_idx": INDEX_DTYPES, "weight_shape": INDEX_DTYPES}
KERNEL_DTYPES = {"qweight": (torch.int32,), "qzeros": (torch.int32,), "scales": SCALE_DTYPES,
                 "perm": INDEX_DTYPES, "g_idx_sorted": INDEX_DTYPES}
ACT_ORDER_WHY = ("; an act-order (desc_act) checkpoint needs it to know which group dequantizes each input "
                 "channel (assuming k // group_size would serve wrong weights)")


def check_implied_g_idx(g_idx: torch.Tensor, group_size: int, tensor: str, why: str) -> None:
    """Refuse an act-order g_idx where a serving path can only take k // group_size (`why` says which).

    A g_idx is authoritative whatever desc_act says: the readers and the plugin's linear layers dequantize
    by it, so an act-order checkpoint labelled desc_act=false is served correctly.  Only a path that drops
    g_idx or splits the scales along K before seeing it would serve it wrong, and refuses it here.
    """
    if not is_trivial(g_idx, group_size):
        raise FormatError(f"{tensor}: not k // group_size although the config says desc_act=false: an act-order "
                          f"assignment, which {why}")


def _dtypes(name: str, tensors: dict[str, torch.Tensor | None], table: dict[str, tuple[torch.dtype, ...]]) -> None:
    for suffix, allowed in table.items():
        t = tensors.get(suffix)
        if t is not None and t.dtype not in allowed:
            raise FormatError(f"{name}.{suffix}: dtype {t.dtype}, expected {' or '.join(map(str, allowed))}")


def missing(tensor: str, shape: tuple[int, ...] | None = None, why: str = "", **dims) -> FormatError:
    """The error for an absent tensor, with the shape it should have had (and for which sizes)."""
    detail = ", ".join(f"{k}={v}" for k, v in dims.items())
    expected = f" (expected shape {shape}{' for ' + detail if detail else ''})" if shape is not None else ""
    return FormatError(f"{tensor} is missing{expected}{why}")


def check_shape(tensor: str, t: torch.Tensor, expected: tuple[int, ...], **dims) -> None:
    """The shape check of every tensor (gptq.check_shapes words it the same way)."""
    if tuple(t.shape) != tuple(expected):
        detail = ", ".join(f"{k}={v}" for k, v in dims.items())
        raise FormatError(f"{tensor}: shape {tuple(t.shape)}, expected {tuple(expected)}"
                          f"{' for ' + detail if detail else ''}")


def check_dtype(tensor: str, t: torch.Tensor, table: dict[str, tuple[torch.dtype, ...]]) -> None:
    """The dtype check of one tensor `module.suffix` against a dialect's table (GPTQ_DTYPES, ...)."""
    module, _, suffix = tensor.rpartition(".")
    _dtypes(module, {suffix: t}, table)


def gptq_dims(bits: int, tensors: dict[str, torch.Tensor | None]) -> tuple[int | None, int | None]:
    """(K, N) as far as the GPTQ tensors present tell: K from g_idx or the packed rows, N from the columns."""
    from .bitpack import block_shape

    qweight, scales, g_idx = (tensors.get(s) for s in ("qweight", "scales", "g_idx"))
    N = qweight.shape[-1] if qweight is not None else scales.shape[-1] if scales is not None else None
    if g_idx is not None:
        K = g_idx.shape[0]
    elif qweight is not None:
        codes, words = block_shape(bits)
        K = qweight.shape[0] // words * codes
    else:
        K = None
    return K, N


def gptq_weight(tensors: dict[str, torch.Tensor | None], name: str, bits: int, group_size: int, sym: bool,
                zero_format: ZeroFormat, act_order: bool, K: int | None = None, N: int | None = None,
                check_label: bool = True, out_perm: torch.Tensor | None = None) -> QuantizedWeight:
    """GPTQ qweight/qzeros/scales/g_idx of module `name` -> validated canonical weight.

    K, N: the module's sizes when known (config.json, vLLM's layer), else read from the tensors.
    act_order: the config says desc_act, so g_idx must be present.  check_label: refuse qzeros that show the
    other v1/v2 convention than zero_format (off for an explicit --checkpoint-format override).
    out_perm: reorder the output channels (the converter folding a consumer's act-order into this module).
    """
    if K is None or N is None:
        k, n = gptq_dims(bits, tensors)
        K, N = K if K is not None else k, N if N is not None else n
    dims = dict(K=K, N=N, bits=bits, group_size=group_size)
    required = ("qweight", "qzeros", "scales") + (("g_idx",) if act_order and group_size != -1 else ())
    for suffix in required:
        if tensors.get(suffix) is None:
            shape = gptq.expected_shapes(K, N, bits, group_size)[suffix] if K and N else None
            raise missing(f"{name}.{suffix}", shape, ACT_ORDER_WHY if suffix == "g_idx" else "", **dims)
    _dtypes(name, tensors, GPTQ_DTYPES)
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    g_idx = tensors.get("g_idx")
    if g_idx is None:  # pre-act-order GPTQ-for-LLaMa files: without act-order g_idx can only be k // G
        g_idx = default_g_idx(K, group_size, qweight.device)
    gptq.check_shapes(GPTQTensors(qweight, qzeros, scales, g_idx), K, N, bits, group_size, name)
    if check_label and sym:  # symmetric zeros show the convention in every field (formats.md §1.4)
        gptq.check_zero_format(qzeros, bits, N, zero_format, f"{name}.qzeros")
    zeros = gptq.decode_zeros(qzeros, bits, N, zero_format, f"{name}.qzeros")
    codes_from = qweight
    if out_perm is not None:
        import numpy as np

        cols = out_perm.to(torch.int64)
        # np.take: 3-4x faster than torch.index_select along dim 1 (measured on 512x11008 int32).
        codes_from = torch.from_numpy(np.take(qweight.numpy(), cols.numpy(), axis=1))
        scales, zeros = scales[:, cols], zeros[:, cols]
    from .bitpack import unpack_rows

    w = QuantizedWeight(codes=unpack_rows(codes_from, bits, K, dtype=torch.uint8), scales=scales.contiguous(),
                        zeros=zeros.contiguous(), g_idx=g_idx.to(torch.int32), bits=bits, group_size=group_size,
                        sym=sym)
    w.validate(name)
    return w


def check_weight_shape(name: str, shape: torch.Tensor, K: int | None, N: int | None) -> tuple[int, int]:
    """(K, N) that a compressed-tensors weight_shape (N, K) holds, checked against the module's sizes."""
    check_shape(f"{name}.weight_shape", shape, (2,))
    n, k = (int(v) for v in shape.tolist())
    if K is not None and N is not None and (n, k) != (N, K):
        raise FormatError(f"{name}.weight_shape: ({n}, {k}), expected ({N}, {K}) (N, K of the model's layer)")
    return k, n


def compressed_weight(tensors: dict[str, torch.Tensor], name: str, bits: int, group_size: int, sym: bool,
                      act_order: bool, K: int | None = None, N: int | None = None) -> QuantizedWeight:
    """compressed-tensors pack-quantized tensors of module `name` (keys `name.weight_*`) -> canonical weight.

    K, N: the module's sizes when known (config.json, vLLM's layer), else weight_shape's.
    act_order: the config says actorder "group", so weight_g_idx must be present.
    """
    short = {k.removeprefix(f"{name}."): v for k, v in tensors.items() if v is not None}
    if "weight_shape" in short:
        _dtypes(name, {"weight_shape": short["weight_shape"]}, CT_DTYPES)
        K, N = check_weight_shape(name, short["weight_shape"], K, N)
    required = ["weight_packed", "weight_scale"] + (["weight_zero_point"] if not sym else []) + \
        (["weight_g_idx"] if act_order and group_size != -1 else []) + ["weight_shape"]
    for suffix in required:
        if suffix not in short:
            shape = compressed_tensors.expected_shapes(K, N, bits, group_size)[suffix] if K and N else None
            raise missing(f"{name}.{suffix}", shape, ACT_ORDER_WHY if suffix == "weight_g_idx" else "",
                          K=K, N=N, bits=bits, group_size=group_size)
    _dtypes(name, short, CT_DTYPES)
    dims = dict(K=K, N=N, bits=bits, group_size=group_size)
    for suffix, shape in compressed_tensors.expected_shapes(K, N, bits, group_size).items():
        if suffix in short:
            check_shape(f"{name}.{suffix}", short[suffix], shape, **dims)
    if "weight_g_idx" in short:  # here, so the message names the checkpoint's tensor (not canonical g_idx)
        check_g_idx(short["weight_g_idx"], K, group_size, f"{name}.weight_g_idx")
    return compressed_tensors.from_tensors({f"{name}.{k}": v for k, v in short.items()}, name, bits, group_size, sym)


def kernel_weight(tensors: dict[str, torch.Tensor | None], name: str, layout: Layout, bits: int, group_size: int,
                  sym: bool, K: int, N: int, g_idx_sorted_ok: bool = False) -> QuantizedWeight:
    """Our converted (mygptq) tensors of module `name` -> canonical weight (layout and stored perm undone)."""
    shapes = kernel_shapes(layout, bits, group_size, sym, K, N)
    dims = dict(K=K, N=N, bits=bits, group_size=group_size)
    for suffix, shape in shapes.items():
        if tensors.get(suffix) is None and suffix != "perm":
            raise missing(f"{name}.{suffix}", shape, **dims)
    _dtypes(name, tensors, KERNEL_DTYPES)
    for suffix, shape in shapes.items():
        if tensors.get(suffix) is not None:
            check_shape(f"{name}.{suffix}", tensors[suffix], shape, **dims)
    perm = tensors.get("perm")
    if perm is not None:
        check_perm(perm, K, f"{name}.perm")
    g_sorted = tensors.get("g_idx_sorted") if g_idx_sorted_ok else None
    kw = KernelWeight(layout=layout, bits=bits, group_size=group_size, sym=sym, in_features=K, out_features=N,
                      qweight=tensors["qweight"], scales=tensors["scales"],
                      qzeros=tensors.get("qzeros") if "qzeros" in shapes else None, perm=perm, g_idx_sorted=g_sorted)
    return from_kernel(kw, name)


# ---- across modules ----------------------------------------------------------------------------------------

# Sibling modules that vLLM fuses into one layer reading one input, hence one act-order permutation.
FUSED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


def check_fused(g_idx: dict[str, torch.Tensor], suffix: str = "g_idx") -> None:
    """Raise unless the modules of one parent that vLLM fuses (FUSED_INPUTS) share one act-order permutation.

    vLLM runs them as one layer that gathers its input once, so their act-order permutations (stable
    argsort of g_idx; the identity without act-order, whatever the group size) must be equal; a layer
    loaded with one shard's would serve the others' weights with the wrong groups.  g_idx: module -> its
    canonical g_idx (for a converted checkpoint: the one its `perm` implies).  suffix: the checkpoint's
    name for that tensor (g_idx, weight_g_idx, perm).  The module blamed is the first that differs from the
    permutation most of its group share.
    """
    by_leaf = {m.rpartition(".")[2]: m for m in g_idx}
    for group in FUSED_INPUTS:
        present = [by_leaf[leaf] for leaf in group if leaf in by_leaf]
        if len(present) < 2:
            continue
        perms = {m: act_order_perm(g_idx[m]) for m in present}
        votes = [sum(torch.equal(perms[a], perms[b]) for b in present) for a in present]
        ref = present[votes.index(max(votes))]
        for m in present:
            a, b = perms[m], perms[ref]
            if a.shape != b.shape:
                raise FormatError(f"{m}.{suffix}: shape {tuple(g_idx[m].shape)}, expected "
                                  f"{tuple(g_idx[ref].shape)} like {ref}.{suffix}")
            if not torch.equal(a, b):
                k = int((a != b).to(torch.int8).argmax())
                raise FormatError(
                    f"{m}.{suffix}: its act-order permutation differs from {ref}'s (position {k} holds input "
                    f"channel {int(a[k])}, expected {int(b[k])}); vLLM fuses "
                    f"{', '.join(p.rpartition('.')[2] for p in present)} into one layer that gathers its input once, "
                    f"so they must share one act-order (GPTQ gives modules reading one input one g_idx)")
