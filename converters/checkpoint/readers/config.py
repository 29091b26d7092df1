"""The quantization config of a checkpoint directory, whatever dialect wrote it (formats.md §2, §6).

Where it is looked for: config.json `quantization_config` (or `compression_config`, or the same keys under
`text_config`), quantize_config.json and quant_config.json.  A GPTQ checkpoint may carry it in both
config.json and quantize_config.json (TheBloke, GPTQModel); the two must then agree.

Dialects:
  autogptq             quantize_config.json without a GPTQModel/optimum `meta.quantizer` (TheBloke)
  gptqmodel            `meta.quantizer` names gptqmodel; `format`/`checkpoint_format`, `dynamic`, `pack_dtype`
  optimum              `meta.quantizer` names optimum
  transformers         config.json `quantization_config` only (GPTQConfig)
  compressed-tensors   `quant_method: compressed-tensors`, `format: pack-quantized` (llm-compressor)
  mygptq               our own kernel-layout output (`quant_method: mygptq`)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from gptq_vllm.formats.errors import FormatError
from gptq_vllm.formats.gptq import ZeroFormat
from gptq_vllm.formats.kernel_layout import Layout

from .dynamic import DynamicRules, ModuleParams

GPTQ_CONFIG_FILES = ("quantize_config.json", "quant_config.json")
CORE_KEYS = ("bits", "group_size", "sym", "desc_act", "checkpoint_format")
SYNONYMS = {"w_bit": "bits", "q_group_size": "group_size", "format": "checkpoint_format", "method": "quant_method"}


@dataclass(frozen=True)
class QuantConfig:
    method: str  # "gptq", "compressed-tensors" or "mygptq"
    dialect: str
    base: ModuleParams
    desc_act: bool
    lm_head: bool
    dynamic: DynamicRules
    zero_format: ZeroFormat | None  # declared v1/v2 convention (GPTQ only)
    layout: Layout | None  # mygptq only
    quantizer: list[str]  # meta.quantizer: the tools that produced the checkpoint
    sources: list[str]  # the files the config was read from
    raw: dict  # the config as read (merged over `sources`)
    weight_base_name: str | None = None  # AutoGPTQ model_file_base_name
    ignore: list[str] = field(default_factory=list)  # compressed-tensors modules left unquantized

    def params(self, module: str) -> ModuleParams | None:
        """Parameters of one module; None when a dynamic "-:" rule leaves it unquantized."""
        return self.dynamic.params(module, self.base)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from e


def _embedded(config: dict) -> tuple[str, dict] | None:
    for holder, cfg in (("", config), ("text_config.", config.get("text_config") or {})):
        for key in ("quantization_config", "compression_config"):
            if isinstance(cfg.get(key), dict):
                return f"{holder}{key}", cfg[key]
    return None


def _normalize(cfg: dict) -> dict:
    out = dict(cfg)
    for old, new in SYNONYMS.items():
        if old in out and new not in out:
            out[new] = out[old]
    return out


def _quantizer(cfg: dict) -> list[str]:
    q = (cfg.get("meta") or {}).get("quantizer") or []
    return [q] if isinstance(q, str) else list(q)


def load_quant_config(directory: Path) -> QuantConfig:
    """Find, merge and check the quantization config of a checkpoint directory."""
    found: list[tuple[str, dict]] = []
    config_json = directory / "config.json"
    if config_json.exists():
        emb = _embedded(_read_json(config_json))
        if emb is not None:
            found.append((f"config.json[{emb[0]}]", _normalize(emb[1])))
    for name in GPTQ_CONFIG_FILES:
        if (directory / name).exists():
            found.append((name, _normalize(_read_json(directory / name))))
    if not found:
        raise FormatError(
            f"{directory}: no quantization config (looked for config.json quantization_config, "
            f"{', '.join(GPTQ_CONFIG_FILES)}); is this a quantized checkpoint?"
        )
    where, cfg = found[0]
    method = str(cfg.get("quant_method", "gptq")).lower()
    if method == "compressed-tensors":
        return _compressed_tensors(directory, where, cfg)
    if method == "mygptq":
        return _mygptq(directory, where, cfg)
    if method != "gptq":
        raise FormatError(f"{directory / where.split('[')[0]}: quant_method {method!r} is not GPTQ; "
                          f"supported sources are GPTQ, compressed-tensors pack-quantized and mygptq checkpoints")
    return _gptq(directory, found)


def _gptq(directory: Path, found: list[tuple[str, dict]]) -> QuantConfig:
    where, cfg = found[0]
    merged: dict = {}
    origin: dict[str, str] = {}
    for name, other in reversed(found):  # the first file wins for non-core keys
        merged.update(other)
        origin.update({k: name for k in other})
    for name, other in found[1:]:
        for key in CORE_KEYS:
            if key in cfg and key in other and other[key] != cfg[key]:
                raise FormatError(f"{directory}: {where} says {key}={cfg[key]!r} but {name} says {key}={other[key]!r}")
    cfg = merged
    path = directory / origin.get("bits", where).split("[")[0]
    if cfg.get("is_marlin_format") or str(cfg.get("checkpoint_format", "gptq")).lower() not in ("gptq", "gptq_v2"):
        fmt = "marlin" if cfg.get("is_marlin_format") else cfg.get("checkpoint_format")
        raise FormatError(f"{path}: checkpoint_format {fmt!r} is not a GPTQ tensor format; convert from the "
                          f"original 'gptq' or 'gptq_v2' checkpoint instead")
    pack_dtype = str(cfg.get("pack_dtype", "int32")).removeprefix("torch.")
    if pack_dtype != "int32":
        raise FormatError(f"{path}: pack_dtype {pack_dtype!r} is not supported: vLLM and the Marlin/ExLlama layouts "
                          f"read int32 words; re-export the checkpoint with GPTQModel pack_dtype=int32")
    if "bits" not in cfg:
        raise FormatError(f"{path}: the quantization config has no 'bits'")
    quantizer = _quantizer(cfg)
    tools = " ".join(quantizer).lower()
    if "optimum" in tools:
        dialect = "optimum"
    elif "gptqmodel" in tools:
        dialect = "gptqmodel"
    elif any(name in GPTQ_CONFIG_FILES for name, _ in found):
        dialect = "autogptq"
    else:
        dialect = "transformers"
    return QuantConfig(
        method="gptq",
        dialect=dialect,
        base=ModuleParams(bits=int(cfg["bits"]), group_size=int(cfg.get("group_size", -1)), sym=bool(cfg.get("sym", True))),
        desc_act=bool(cfg.get("desc_act", False)),
        lm_head=bool(cfg.get("lm_head", False)),
        dynamic=DynamicRules(cfg.get("dynamic"), str(path)),
        zero_format=ZeroFormat.parse(cfg.get("checkpoint_format")),
        layout=None,
        quantizer=quantizer,
        sources=[name for name, _ in found],
        raw=cfg,
        weight_base_name=cfg.get("model_file_base_name"),
    )


def _compressed_tensors(directory: Path, where: str, cfg: dict) -> QuantConfig:
    path = directory / "config.json"
    fmt = cfg.get("format")
    if fmt != "pack-quantized":
        raise FormatError(f"{path}: compressed-tensors format {fmt!r} is not supported; only 'pack-quantized' "
                          f"(integer weights packed into int32) holds GPTQ-style weights")
    if cfg.get("quantization_status", "compressed") != "compressed":
        raise FormatError(f"{path}: quantization_status {cfg.get('quantization_status')!r}; expected 'compressed'")
    schemes = []
    for name, group in (cfg.get("config_groups") or {}).items():
        w = group.get("weights") or {}
        if group.get("input_activations") or group.get("format", fmt) != "pack-quantized":
            raise FormatError(f"{path}: config group {name!r} is not a weight-only pack-quantized scheme")
        if w.get("type", "int") != "int" or w.get("strategy") not in ("group", "channel"):
            raise FormatError(f"{path}: config group {name!r}: weights {w.get('type')!r} with strategy "
                              f"{w.get('strategy')!r}; expected int weights with strategy 'group' or 'channel'")
        group_size = int(w["group_size"]) if w.get("strategy") == "group" else -1
        schemes.append((ModuleParams(int(w["num_bits"]), group_size, bool(w.get("symmetric", True))),
                        w.get("actorder") in ("group", "dynamic")))
    if not schemes:
        raise FormatError(f"{path}: compressed-tensors config has no config_groups")
    if any(s != schemes[0] for s in schemes[1:]):
        raise FormatError(f"{path}: config groups with different weight schemes are not supported")
    base, desc_act = schemes[0]
    return QuantConfig(
        method="compressed-tensors", dialect="compressed-tensors", base=base, desc_act=desc_act,
        lm_head=False, dynamic=DynamicRules(None, str(path)), zero_format=None, layout=None,
        quantizer=_quantizer(cfg), sources=[where], raw=cfg, ignore=list(cfg.get("ignore") or []),
    )


def _mygptq(directory: Path, where: str, cfg: dict) -> QuantConfig:
    path = directory / "config.json"
    try:
        layout = Layout(cfg["layout"])
        base = ModuleParams(int(cfg["bits"]), int(cfg["group_size"]), bool(cfg["sym"]))
    except (KeyError, ValueError) as e:
        raise FormatError(f"{path}: mygptq quantization_config is missing or has a bad 'layout', 'bits', "
                          f"'group_size' or 'sym' ({e})") from e
    return QuantConfig(
        method="mygptq", dialect="mygptq", base=base, desc_act=bool(cfg.get("desc_act", False)),
        lm_head=bool(cfg.get("lm_head", False)), dynamic=DynamicRules(cfg.get("dynamic"), str(path)),
        zero_format=None, layout=layout, quantizer=_quantizer(cfg), sources=[where], raw=cfg,
    )
