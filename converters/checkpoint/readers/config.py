"""The quantization config of a checkpoint directory, whatever dialect wrote it (formats.md §2, §6).

Where it is looked for (validate.config_sources, vLLM's order): config.json `quantization_config` (or
`compression_config`, or the same keys under `text_config`), quantize_config.json and quant_config.json;
files that mean different things are refused.  The first is parsed by quant_config.parse, the parser the
plugin uses; the others add only provenance (meta.quantizer, AutoGPTQ's model_file_base_name).

Dialects:
  autogptq             quantize_config.json without a GPTQModel/optimum `meta.quantizer` (TheBloke)
  gptqmodel            `meta.quantizer` names gptqmodel; `format`/`checkpoint_format`, `dynamic`, `pack_dtype`
  optimum              `meta.quantizer` names optimum
  transformers         config.json `quantization_config` only (GPTQConfig)
  compressed-tensors   `quant_method: compressed-tensors`, `format: pack-quantized` (llm-compressor)
  mygptq               our own kernel-layout output (`quant_method: mygptq`)
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from gptq_vllm.formats.errors import FormatError
from gptq_vllm.formats.quant_config import QuantScheme, parse
from gptq_vllm.formats.validate import GPTQ_CONFIG_FILES, config_sources


@dataclass(frozen=True)
class QuantConfig(QuantScheme):
    dialect: str = ""
    quantizer: list[str] = field(default_factory=list)  # meta.quantizer: the tools that produced the checkpoint
    sources: list[str] = field(default_factory=list)  # the files the config was found in
    weight_base_name: str | None = None  # AutoGPTQ model_file_base_name
    model: dict = field(default_factory=dict)  # config.json (the model's sizes)


def _quantizer(cfg: dict) -> list[str]:
    q = (cfg.get("meta") or {}).get("quantizer") or []
    return [q] if isinstance(q, str) else list(q)


def load_quant_config(directory: Path) -> QuantConfig:
    """Find, check and parse the quantization config of a checkpoint directory."""
    model, found = config_sources(directory)
    if not found:
        raise FormatError(
            f"{directory}: no quantization config (looked for config.json quantization_config, "
            f"{', '.join(GPTQ_CONFIG_FILES)}); is this a quantized checkpoint?"
        )
    where, cfg = found[0]
    scheme = parse(cfg, str(directory / where.split("[")[0]))
    quantizer = [q for _, other in found for q in _quantizer(other)]
    tools = " ".join(quantizer).lower()
    if scheme.method != "gptq":
        dialect = scheme.method
    elif "optimum" in tools:
        dialect = "optimum"
    elif "gptqmodel" in tools:
        dialect = "gptqmodel"
    elif any(name in GPTQ_CONFIG_FILES for name, _ in found):
        dialect = "autogptq"
    else:
        dialect = "transformers"
    base_name = next((other["model_file_base_name"] for _, other in found if other.get("model_file_base_name")), None)
    return QuantConfig(**{f.name: getattr(scheme, f.name) for f in fields(QuantScheme)}, dialect=dialect,
                       quantizer=list(dict.fromkeys(quantizer)), sources=[name for name, _ in found],
                       weight_base_name=base_name, model=model)
