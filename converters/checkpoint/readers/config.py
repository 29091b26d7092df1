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

from dataclasses import dataclass, field, replace
from pathlib import Path

from gptq_vllm.formats import compressed_tensors
from gptq_vllm.formats.errors import FormatError
from gptq_vllm.formats.gptq import ZeroFormat
from gptq_vllm.formats.kernel_layout import Layout
from gptq_vllm.formats.validate import GPTQ_CONFIG_FILES, config_sources

from .dynamic import DynamicRules, ModuleParams


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
    model: dict = field(default_factory=dict)  # config.json (the model's sizes)

    def params(self, module: str) -> ModuleParams | None:
        """Parameters of one module; None when a dynamic "-:" rule leaves it unquantized."""
        return self.dynamic.params(module, self.base)


def _quantizer(cfg: dict) -> list[str]:
    q = (cfg.get("meta") or {}).get("quantizer") or []
    return [q] if isinstance(q, str) else list(q)


def load_quant_config(directory: Path) -> QuantConfig:
    """Find, merge and check the quantization config of a checkpoint directory (validate.config_sources)."""
    model, found = config_sources(directory)
    if not found:
        raise FormatError(
            f"{directory}: no quantization config (looked for config.json quantization_config, "
            f"{', '.join(GPTQ_CONFIG_FILES)}); is this a quantized checkpoint?"
        )
    where, cfg = found[0]
    method = str(cfg.get("quant_method", "gptq")).lower()
    if method == "compressed-tensors":
        qc = _compressed_tensors(directory, where, cfg)
    elif method == "mygptq":
        qc = _mygptq(directory, where, cfg)
    elif method == "gptq":
        qc = _gptq(directory, found)
    else:
        raise FormatError(f"{directory / where.split('[')[0]}: quant_method {method!r} is not GPTQ; "
                          f"supported sources are GPTQ, compressed-tensors pack-quantized and mygptq checkpoints")
    return replace(qc, model=model)


def _gptq(directory: Path, found: list[tuple[str, dict]]) -> QuantConfig:
    where, cfg = found[0]
    merged: dict = {}
    origin: dict[str, str] = {}
    for name, other in reversed(found):  # the first file wins for non-core keys
        merged.update(other)
        origin.update({k: name for k in other})
    cfg = merged  # config_sources has checked that the files agree on every CORE_KEY
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
        # static_groups quantizes with contiguous groups: g_idx is k // G, no runtime act-order (formats.md §2.6).
        desc_act=bool(cfg.get("desc_act", False)) and not bool(cfg.get("static_groups", False)),
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
    bits, group_size, sym, desc_act = compressed_tensors.scheme(cfg, str(path))
    base = ModuleParams(bits, group_size, sym)
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
