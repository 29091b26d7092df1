"""MoE layers: delegated to vLLM's in-tree GPTQ MoE method where it supports the checkpoint.

Our own MoE kernel is later work.  vLLM's AutoGPTQ MoE path serves symmetric 4- and 8-bit GPTQ experts;
vLLM 0.33 also refuses act-order there, which shows up as the ValueError of its config and is passed
on with the layer name.  Everything else fails at load with what would work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .config import MyGPTQConfig


def is_moe_layer(layer: torch.nn.Module) -> bool:
    from vllm.model_executor.layers import fused_moe

    # RoutedExperts is the expert layer in the vLLM releases we support; look it up by feature.
    experts_cls = getattr(fused_moe, "RoutedExperts", None) or getattr(fused_moe, "FusedMoE", None)
    return experts_cls is not None and isinstance(layer, experts_cls)


def unsupported_reasons(config: "MyGPTQConfig", prefix: str) -> list[str]:
    """Why vLLM's in-tree GPTQ MoE method cannot serve these experts (empty: it can)."""
    scheme = config.layer_scheme(prefix)
    if scheme is None:
        return []
    reasons = []
    if scheme.is_kernel_layout:
        reasons.append("experts stored in the converted mygptq layout (convert MoE models to gptq-v2 instead)")
    if scheme.bits not in (4, 8):
        reasons.append(f"{scheme.bits}-bit experts")
    if not scheme.sym:
        reasons.append("asymmetric experts (sym=false)")
    return reasons


def get_moe_method(config: "MyGPTQConfig", layer: torch.nn.Module, prefix: str):
    if config.layer_scheme(prefix) is None:
        return None  # skipped by the config: vLLM loads the experts unquantized
    reasons = unsupported_reasons(config, prefix)
    if reasons:
        raise ValueError(
            f"mygptq: MoE layer {prefix}: mygptq delegates MoE layers to vLLM's in-tree GPTQ MoE method, which "
            f"does not support {'; '.join(reasons)}. What works: symmetric 4- or 8-bit GPTQ experts "
            f"(without act-order on vLLM >= 0.33), e.g. served with --quantization gptq")
    from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig

    try:
        inner = AutoGPTQConfig.from_config(config.gptq_config_dict())
    except ValueError as e:
        raise ValueError(f"mygptq: MoE layer {prefix}: vLLM's in-tree GPTQ MoE method refuses this checkpoint: "
                         f"{e}") from e
    inner.packed_modules_mapping = config.packed_modules_mapping
    return inner.get_quant_method(layer, prefix)
