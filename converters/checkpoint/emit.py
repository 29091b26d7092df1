"""Output formats: the tensors and the quantization_config written for one canonical weight.

Shared by `gptq-convert convert` and `gptq-convert quantize`, so both write every target the same way.
Targets:
  gptq-v1, gptq-v2      qweight/qzeros/scales/g_idx (AutoGPTQ/GPTQModel/vLLM `gptq`)
  compressed-tensors    pack-quantized (llm-compressor / vLLM compressed-tensors)
  mygptq                our kernel layout (gptq_vllm.formats.kernel_layout), loaded without repacking
"""

from __future__ import annotations

from enum import Enum

import torch

from gptq_vllm.formats import compressed_tensors, gptq, marlin
from gptq_vllm.formats.gptq import QuantizedWeight, ZeroFormat
from gptq_vllm.formats.kernel_layout import Layout, default_layout, to_kernel

from .gptq_config import QUANTIZER_TAG, gptq_quantization_config


class Target(str, Enum):
    GPTQ_V1 = "gptq-v1"
    GPTQ_V2 = "gptq-v2"
    COMPRESSED_TENSORS = "compressed-tensors"
    MYGPTQ = "mygptq"


def module_tensors(weight: QuantizedWeight, prefix: str, target: Target, layout: Layout | None = None,
                   perm_absorbed: bool = False, write_g_idx: bool | None = None) -> dict[str, torch.Tensor]:
    """Tensors of one quantized module named `prefix.*`.

    perm_absorbed (mygptq only): the act-order permutation of this module's input was folded into the
    module producing that input, so no runtime gather is stored.  write_g_idx (compressed-tensors only):
    True writes weight_g_idx even when trivial, as a checkpoint whose config says actorder "group" must
    for every module; None writes it where it is not trivial.
    """
    if target is Target.GPTQ_V1:
        return gptq.pack(weight, ZeroFormat.V1).as_dict(prefix)
    if target is Target.GPTQ_V2:
        return gptq.pack(weight, ZeroFormat.V2).as_dict(prefix)
    if target is Target.COMPRESSED_TENSORS:
        return compressed_tensors.to_tensors(weight, prefix, write_g_idx=write_g_idx)
    kw = to_kernel(weight, layout, pad=False)
    tensors = kw.tensors(prefix)
    if perm_absorbed:
        tensors.pop(f"{prefix}.perm", None)
    return tensors


def quantization_config(target: Target, bits: int, group_size: int, sym: bool, desc_act: bool,
                        layout: Layout | None = None, ignore: list[str] | None = None,
                        dynamic: dict | None = None, lm_head: bool = False, meta: dict | None = None,
                        observer: str = "minmax") -> dict:
    """config.json["quantization_config"] for a checkpoint written in `target` (observer: how the
    group grids were chosen, "minmax" or "mse"; compressed-tensors records it, the others have meta)."""
    if target in (Target.GPTQ_V1, Target.GPTQ_V2):
        fmt = ZeroFormat.V1 if target is Target.GPTQ_V1 else ZeroFormat.V2
        return gptq_quantization_config(bits, group_size, sym, desc_act, fmt, lm_head=lm_head,
                                        dynamic=dynamic, meta=meta)
    if target is Target.COMPRESSED_TENSORS:
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "ignore": ignore if ignore is not None else ["lm_head"],
            "kv_cache_scheme": None,
            "config_groups": {"group_0": {
                "targets": ["Linear"], "input_activations": None, "output_activations": None,
                "weights": {"num_bits": bits, "type": "int", "symmetric": sym,
                            "strategy": "channel" if group_size == -1 else "group",
                            "group_size": None if group_size == -1 else group_size,
                            "actorder": "group" if desc_act else None, "dynamic": False, "observer": observer},
            }},
        }
    layout = layout or default_layout(bits)
    cfg = {
        "quant_method": "mygptq",
        "checkpoint_format": "mygptq",
        "layout": layout.value,
        # The 2/3-bit units' version, checked on load (quant_config.parse).
        **({"unit_layout": marlin.UNIT_LAYOUT} if layout is Layout.MARLIN else {}),
        "bits": bits,
        "group_size": group_size,
        "sym": sym,
        "desc_act": desc_act,
        "lm_head": lm_head,
        "meta": {"quantizer": [QUANTIZER_TAG], **(meta or {})},
    }
    if dynamic:
        cfg["dynamic"] = dynamic
    return cfg
