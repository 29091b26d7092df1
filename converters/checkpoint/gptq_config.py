"""The quantization_config we write for GPTQ checkpoints (read by vLLM, transformers, GPTQModel)."""

from __future__ import annotations

from gptq_vllm import __version__
from gptq_vllm.formats.gptq import ZeroFormat

QUANTIZER_TAG = f"gptq-vllm:{__version__}"


def gptq_quantization_config(bits: int, group_size: int, sym: bool, desc_act: bool, zero_format: ZeroFormat,
                             static_groups: bool = False, damp_percent: float | None = None,
                             true_sequential: bool = True, lm_head: bool = False,
                             dynamic: dict | None = None, meta: dict | None = None) -> dict:
    cfg = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "sym": sym,
        "desc_act": desc_act,
        "static_groups": static_groups,
        "true_sequential": true_sequential,
        "lm_head": lm_head,
        "checkpoint_format": zero_format.value,
        "pack_dtype": "int32",
        "meta": {"quantizer": [QUANTIZER_TAG], **(meta or {})},
    }
    if damp_percent is not None:
        cfg["damp_percent"] = damp_percent
    if dynamic:
        cfg["dynamic"] = dynamic
    return cfg
