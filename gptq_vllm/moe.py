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


def experts_scheme(config: "MyGPTQConfig", prefix: str):
    """The scheme of the experts layer `prefix`, or None when its experts are stored unquantized.

    Checkpoints store the experts one module per expert and projection (prefix.3.w1, prefix.3.down_proj),
    so a list of quantized modules names those, never `prefix` itself.  The layer runs all its experts
    as one kernel, so they must share one scheme.
    """
    if not config.modules_in_block_to_quantize:
        return config.layer_scheme(prefix)
    from .config import module_matches

    schemes = set()
    for entry in config.modules_in_block_to_quantize:
        head, sep, expert = f".{entry}".rpartition(".experts.")
        if sep and module_matches(prefix, f"{head}.experts".lstrip(".")):
            schemes.add(config.layer_scheme(f"{prefix}.{expert}"))
    if len(schemes) > 1:
        raise ValueError(f"mygptq: MoE layer {prefix}: its experts are stored with different schemes "
                         f"({', '.join(sorted(map(str, schemes)))}); vLLM runs them as one layer")
    return schemes.pop() if schemes else None


def unsupported_reasons(config: "MyGPTQConfig", prefix: str) -> list[str]:
    """Why vLLM's in-tree GPTQ MoE method cannot serve these experts (empty: it can)."""
    scheme = experts_scheme(config, prefix)
    if scheme is None:
        return []
    reasons = []
    if scheme.compressed:
        reasons.append("compressed-tensors experts (serve them with vLLM's compressed-tensors method)")
    if scheme.is_kernel_layout:
        reasons.append("experts stored in the converted mygptq layout (convert MoE models to gptq-v2 instead)")
    if scheme.bits not in (4, 8):
        reasons.append(f"{scheme.bits}-bit experts")
    if not scheme.sym:
        reasons.append("asymmetric experts (sym=false)")
    return reasons


def get_moe_method(config: "MyGPTQConfig", layer: torch.nn.Module, prefix: str):
    if experts_scheme(config, prefix) is None:
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
