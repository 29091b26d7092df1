"""The `mygptq` vLLM quantization config: decides, per layer, how the checkpoint stores it.

The config dialects (AutoGPTQ, GPTQModel with `dynamic`, transformers/optimum, TheBloke, compressed-tensors,
our converted `mygptq`) are parsed by gptq_vllm.formats.quant_config, the parser every `gptq-convert`
command uses, so both accept the same configs with the same messages.

The config only resolves schemes; the linear method (linear.py) loads and converts the tensors and
kernels/selection.py picks the kernel.  vLLM pickles this object to its workers, so it is a plain
module-level class holding plain data.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, UnquantizedEmbeddingMethod

from .formats import quant_config, validate
from .formats.gptq import ZeroFormat
from .formats.kernel_layout import Layout
from .formats.quant_config import ModuleParams, QuantScheme

logger = logging.getLogger(__name__)

NAME = "mygptq"

# g_idx of one expert in a per-expert checkpoint (model.layers.0.block_sparse_moe.experts.3.w1.g_idx)
EXPERT_G_IDX = re.compile(r"\.experts\.\d+\.[^.]+\.g_idx$")


@dataclass(frozen=True)
class LayerScheme:
    """How one layer is stored: GPTQ tensors (zero_format set) or our kernel layout (layout set)."""

    bits: int
    group_size: int
    sym: bool
    desc_act: bool
    zero_format: ZeroFormat | None
    layout: Layout | None
    compressed: bool = False  # compressed-tensors pack-quantized tensors (weight_packed, ...; exact zeros)

    @property
    def is_kernel_layout(self) -> bool:
        return self.layout is not None


def module_matches(name: str, entry: str) -> bool:
    """`entry` names the module `name` when it equals a dotted suffix of it.

    Covers optimum's block-relative names ("self_attn.k_proj") and full checkpoint names under an
    outer prefix vLLM may add, without "mlp.gate" matching "mlp.gate_proj".
    """
    return name == entry or name.endswith("." + entry)


def _local_directory(model_name: str, revision: str | None) -> Path | None:
    """The directory vLLM loads the checkpoint from: a local path, or the cached Hub snapshot."""
    path = Path(model_name).expanduser()
    if path.is_dir():
        return path.resolve()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_name, revision=revision, local_files_only=True))
    except Exception:  # not cached (or not a Hub id): the checks are skipped with a warning
        return None


@register_quantization_config(NAME)
class MyGPTQConfig(QuantizationConfig):
    """GPTQ (v1/v2, act-order, 2/3/4/8 bit, sym/asym), compressed-tensors pack-quantized (2/4/8 bit) and
    converted `mygptq` checkpoints."""

    def __init__(self, scheme: QuantScheme) -> None:
        super().__init__()
        self.scheme = scheme
        self.base = self._layer_scheme(scheme.base)
        self.lm_head = scheme.lm_head
        self.modules_in_block_to_quantize = list(scheme.modules_in_block_to_quantize)
        self.module_files: dict[str, str] = {}  # module -> its file(s), for error messages (maybe_update_config)

    def __repr__(self) -> str:
        return (f"MyGPTQConfig({self.base}, lm_head={self.lm_head}, dynamic={self.scheme.dynamic}, "
                f"modules_in_block_to_quantize={len(self.modules_in_block_to_quantize)} entries)")

    # ---- the QuantizationConfig interface --------------------------------------------------------------

    @classmethod
    def get_name(cls) -> str:
        return NAME

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        # float32 runs on the CPU reference op only; kernels/selection.py rejects it on the GPU.
        return [torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        # The GPU kernels use mma.sync m16n8k16 with fp16 and bf16 operands (Ampere and newer).
        return 80

    @staticmethod
    def get_config_filenames() -> list[str]:
        # Read only when config.json has no quantization_config (TheBloke / AutoGPTQ uploads).
        return ["quantize_config.json"]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "MyGPTQConfig":
        scheme = quant_config.parse(config, f"{NAME}: quantization config")
        if scheme.method == "gptq" and config.get("sym") is None:
            logger.warning("mygptq: quantization config has no `sym`; assuming symmetric like AutoGPTQ")
        return cls(scheme)

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg: dict[str, Any], user_quant: str | None,
                                     hf_config: Any = None) -> str | None:
        # Our converted checkpoints need this plugin whatever the user asked for; a plain GPTQ checkpoint
        # is claimed only when the user asks for mygptq, so `vllm serve gptq-model` keeps vLLM's own path.
        # compressed-tensors pack-quantized integer weights (W4A16 / W8A16) are claimed like gptq ones; any
        # other compressed-tensors scheme is refused here with what serves it, rather than by vLLM's
        # generic "does not match" error.
        method = str(hf_quant_cfg.get("quant_method", "")).lower()
        if method == NAME:
            return NAME
        if method in ("gptq", "compressed-tensors") and user_quant == NAME:
            if method == "compressed-tensors":
                cls.from_config(hf_quant_cfg)  # raises, naming what works, for schemes mygptq does not read
            return NAME
        return None

    @staticmethod
    def get_checkpoint_weight_mapper():
        # vLLM >= 0.33 drops `.g_idx` from the weight stream by default; act-order needs it for linear
        # layers.  MoE experts go to vLLM's in-tree GPTQ MoE method, which has no g_idx parameter (it
        # refuses act-order checkpoints): their trivial g_idx is dropped, as vLLM itself does.
        from vllm.model_executor.models.utils import WeightsMapper

        return WeightsMapper(orig_to_new_regex={EXPERT_G_IDX: None})

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        if self.modules_in_block_to_quantize:
            self.modules_in_block_to_quantize = hf_to_vllm_mapper.apply_list(self.modules_in_block_to_quantize)

    def maybe_update_config(self, model_name: str, hf_config: Any = None, revision: str | None = None) -> None:
        """Run the checkpoint checks every gptq-convert command runs, and learn the checkpoint's files.

        vLLM hands from_config one config dict; validate.config_sources refuses a directory whose
        config.json and quantize_config.json disagree (one rule, everywhere).  Without
        `modules_in_block_to_quantize`, the modules whose quantized tensors the checkpoint holds are
        listed, so layers absent from it (MoE routers, vision towers, anything left in float) load as
        unquantized instead of failing on a missing qweight.
        """
        directory = _local_directory(model_name, revision)
        if directory is None:
            quant_config.check_unit_layout(self.scheme.raw, f"{NAME}: quantization config")  # else config_sources
            logger.warning("mygptq: %s is not a local directory or a cached Hub snapshot; its config files "
                           "are not cross-checked and every linear layer is treated as quantized", model_name)
            return
        validate.config_sources(directory)
        files = validate.tensor_files(directory)
        self.module_files = validate.module_files(files)
        self._check_expert_g_idx(files)
        if not self.modules_in_block_to_quantize:
            self.modules_in_block_to_quantize = sorted(self.module_files)

    def _check_expert_g_idx(self, files: dict[str, Path]) -> None:
        """Experts go to vLLM's GPTQ MoE method, which is given no g_idx (get_checkpoint_weight_mapper):
        an expert whose g_idx is an act-order assignment would be served wrong, so it is refused."""
        from safetensors import safe_open

        for f, name in sorted((f, name) for name, f in files.items() if EXPERT_G_IDX.search(name)):
            params = self.scheme.params(name.removesuffix(".g_idx"))
            if params is None or params.desc_act:  # declared act-order: vLLM's MoE config refuses it (moe.py)
                continue
            with safe_open(str(f), "pt") as h:
                g_idx = h.get_tensor(name)
            validate.check_implied_g_idx(g_idx, params.group_size, f"{f}: {name}",
                                         "vLLM's GPTQ MoE method, which serves the experts, cannot honour (it "
                                         "takes no g_idx): no vLLM MoE path serves act-order experts")

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        from .linear import MyGPTQLinearMethod
        from .moe import get_moe_method, is_moe_layer

        if isinstance(layer, ParallelLMHead):
            if not self.lm_head:
                return None
            scheme = self.layer_scheme(prefix)
            if scheme is None:
                return UnquantizedEmbeddingMethod()
            return MyGPTQLinearMethod(scheme, prefix, self.shard_names(prefix), self.module_files)
        if isinstance(layer, LinearBase):
            scheme = self.layer_scheme(prefix)
            if scheme is None:
                return UnquantizedLinearMethod()
            return MyGPTQLinearMethod(scheme, prefix, self.shard_names(prefix), self.module_files)
        if is_moe_layer(layer):
            return get_moe_method(self, layer, prefix)
        return None

    def gptq_config_dict(self) -> dict[str, Any]:
        """The checkpoint's config under the keys vLLM's own GPTQ config requires (MoE delegation)."""
        b = self.base
        return {**self.scheme.raw, "quant_method": "gptq", "bits": b.bits, "group_size": b.group_size,
                "desc_act": b.desc_act, "sym": b.sym, "lm_head": self.lm_head, "dynamic": self.scheme.dynamic}

    # ---- per-layer resolution ----------------------------------------------------------------------------

    def shard_names(self, prefix: str) -> list[str]:
        """Checkpoint module names behind a vLLM layer: q/k/v for qkv_proj, gate/up for gate_up_proj."""
        head, _, proj = prefix.rpartition(".")
        shards = self.packed_modules_mapping.get(proj)
        if not shards:
            return [prefix]
        return [f"{head}.{s}" if head else s for s in shards]

    def layer_scheme(self, prefix: str) -> LayerScheme | None:
        """The scheme of the layer named `prefix` (vLLM name), or None when it is stored unquantized.

        Fused layers are one GEMM in vLLM, so all their checkpoint modules must agree.
        """
        names = self.shard_names(prefix)
        schemes = {name: self._module_scheme(name) for name in names}
        if len(set(schemes.values())) > 1:
            detail = ", ".join(f"{n}: {'unquantized' if s is None else s}" for n, s in schemes.items())
            raise ValueError(f"mygptq: {prefix} fuses checkpoint modules stored differently ({detail}); vLLM runs "
                             f"them as one layer, so they must share bits, group_size, sym and desc_act")
        return schemes[names[0]]

    def _module_scheme(self, name: str) -> LayerScheme | None:
        if self.modules_in_block_to_quantize and not any(
                module_matches(name, entry) for entry in self.modules_in_block_to_quantize):
            return None
        params = self.scheme.params(name)
        return None if params is None else self._layer_scheme(params)

    def _layer_scheme(self, p: ModuleParams) -> LayerScheme:
        s = self.scheme
        return LayerScheme(p.bits, p.group_size, p.sym, p.desc_act, s.zero_format, s.layout,
                           s.compressed)
