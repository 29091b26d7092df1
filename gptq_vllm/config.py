"""The `mygptq` vLLM quantization config: reads every GPTQ config dialect and decides, per layer, the scheme.

Dialects (formats.md §2): AutoGPTQ `quantize_config.json` (w_bit/q_group_size synonyms, is_marlin_format),
GPTQModel (`format`/`method`, `dynamic`, `pack_dtype`, `meta`), transformers/optimum `quantization_config`
(`modules_in_block_to_quantize`, `checkpoint_format`), TheBloke files with `quantize_config.json` only,
and our converted format (`quant_method: mygptq`, tensors already in the kernel layout).

The config only parses and resolves; the linear method (linear.py) loads and converts the tensors and
kernels/selection.py picks the kernel.  vLLM pickles this object to its workers, so it is a plain
module-level class holding plain data.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, UnquantizedEmbeddingMethod

from .formats import compressed_tensors, validate
from .formats.bitpack import SUPPORTED_BITS
from .formats.gptq import ZeroFormat
from .formats.kernel_layout import Layout, default_layout

logger = logging.getLogger(__name__)

NAME = "mygptq"
# Values of checkpoint_format / format that name a tensor layout we cannot read, with what to do instead.
_FOREIGN_FORMATS = {
    "marlin": "AutoGPTQ's own Marlin format (tensors B/s) is not read by mygptq; serve the original GPTQ "
              "checkpoint, or convert it with `gptq-convert`",
    "bitblas": "GPTQModel's BitBLAS format is not supported; serve the gptq/gptq_v2 export of the model",
    "gptq_p": "GPTQModel's planar 5/6/7-bit format is not supported; quantize to 2, 3, 4 or 8 bits",
    "gemm": "AWQ checkpoints (format 'gemm') are not GPTQ; serve them with vLLM's awq method",
    "gemv": "AWQ checkpoints (format 'gemv') are not GPTQ; serve them with vLLM's awq method",
}
# Keys a GPTQModel `dynamic` rule may override per module.  Rules may also carry quantizer knobs
# (damp_percent, mse, ...) that do not change the stored tensors; those are ignored.  Keys that would
# change the tensor format per module are refused.
_DYNAMIC_KEYS = {"bits", "group_size", "sym", "desc_act"}
_DYNAMIC_FORMAT_KEYS = {"format", "checkpoint_format", "quant_method", "method", "pack_dtype"}

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


def _first(cfg: dict[str, Any], keys: tuple[str, ...], default: Any = None) -> Any:
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return default


def _check_scheme(bits: Any, group_size: Any, where: str) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"mygptq: {where}bits={bits!r} is not supported; GPTQ checkpoints with bits in "
                         f"{SUPPORTED_BITS} are")
    if not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
        raise ValueError(f"mygptq: {where}group_size={group_size!r} is not supported; use -1 (one group per "
                         f"output channel) or a positive group size")


def _flatten(items: Any) -> list[str]:
    if items is None:
        return []
    out: list[str] = []
    for item in items:
        out.extend(_flatten(item) if isinstance(item, (list, tuple)) else [str(item)])
    return out


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

    def __init__(self, bits: int, group_size: int, sym: bool, desc_act: bool, zero_format: ZeroFormat | None,
                 layout: Layout | None = None, lm_head: bool = False, dynamic: dict[str, dict] | None = None,
                 modules_in_block_to_quantize: list[str] | None = None,
                 full_config: dict[str, Any] | None = None, compressed: bool = False) -> None:
        super().__init__()
        _check_scheme(bits, group_size, "")
        if (zero_format is None) == (layout is None):
            raise ValueError("mygptq: a checkpoint is either GPTQ tensors (zero_format) or our kernel layout (layout)")
        self.base = LayerScheme(bits, group_size, sym, desc_act and group_size != -1, zero_format, layout, compressed)
        self._check_layout(self.base, "")
        self.lm_head = lm_head
        self.dynamic = self._parse_dynamic(dynamic or {})
        self.modules_in_block_to_quantize = list(modules_in_block_to_quantize or [])
        self.full_config = dict(full_config or {})
        self.module_files: dict[str, str] = {}  # module -> its file(s), for error messages (maybe_update_config)

    def __repr__(self) -> str:
        return (f"MyGPTQConfig({self.base}, lm_head={self.lm_head}, dynamic={self.dynamic}, "
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
        method = str(_first(config, ("quant_method", "method"), "gptq")).lower()
        if method == "compressed-tensors":
            # llm-compressor's pack-quantized W4A16 / W8A16 (formats.md §6): exact zeros, like GPTQ v2.
            try:
                bits, group_size, sym, act_order = compressed_tensors.scheme(config, "mygptq: config.json "
                                                                                     "quantization_config")
            except ValueError as e:
                raise ValueError(f"{e}; serve this checkpoint with vLLM's compressed-tensors method (without "
                                 f"--quantization mygptq)") from None
            if bits not in compressed_tensors.CT_BITS:
                raise ValueError(f"mygptq: compressed-tensors {bits}-bit weights are not read here (only "
                                 f"{compressed_tensors.CT_BITS}-bit); serve them with vLLM's compressed-tensors method")
            return cls(bits=bits, group_size=group_size, sym=sym, desc_act=act_order, zero_format=ZeroFormat.V2,
                       full_config=config, compressed=True)
        fmt = _first(config, ("checkpoint_format", "format"))
        fmt = None if fmt is None else str(fmt).lower()
        if config.get("is_marlin_format") or method == "marlin":
            fmt = "marlin"
        if method not in ("gptq", NAME):
            raise ValueError(f"mygptq: quant_method {method!r} is not GPTQ; mygptq serves GPTQ checkpoints "
                             f"(quant_method 'gptq'), compressed-tensors pack-quantized ones and their "
                             f"`gptq-convert` conversions (quant_method 'mygptq')")
        if fmt in _FOREIGN_FORMATS:
            raise ValueError(f"mygptq: checkpoint_format {fmt!r}: {_FOREIGN_FORMATS[fmt]}")
        pack_dtype = str(config.get("pack_dtype", "int32")).removeprefix("torch.")
        if pack_dtype != "int32":
            raise ValueError(f"mygptq: pack_dtype {pack_dtype!r} is not supported; vLLM loads int32-packed GPTQ "
                             f"tensors: repack the checkpoint with `gptq-convert convert --target gptq-v2`")
        bits = _first(config, ("bits", "w_bit"))
        group_size = _first(config, ("group_size", "q_group_size"), -1)
        if bits is None:
            raise ValueError("mygptq: the quantization config has no `bits`")
        sym = config.get("sym")
        if sym is None:
            logger.warning("mygptq: quantization config has no `sym`; assuming symmetric like AutoGPTQ")
            sym = True
        # static_groups quantizes with the original contiguous groups: g_idx is k // G, so the
        # checkpoint has no runtime act-order even when desc_act says true (formats.md §2.6).
        desc_act = bool(config.get("desc_act", False)) and not bool(config.get("static_groups", False))
        if method == NAME or fmt == NAME:
            layout_name = str(config.get("layout", default_layout(bits).value)).lower()
            try:
                layout = Layout(layout_name)
            except ValueError:
                raise ValueError(f"mygptq: layout {layout_name!r} is unknown; converted checkpoints use "
                                 f"{[m.value for m in Layout]}") from None
            zero_format = None
        else:
            layout = None
            try:
                zero_format = ZeroFormat.parse(fmt)
            except ValueError as e:
                raise ValueError(f"mygptq: {e}") from None
        return cls(bits=bits, group_size=group_size, sym=bool(sym), desc_act=desc_act, zero_format=zero_format,
                   layout=layout, lm_head=bool(config.get("lm_head", False)), dynamic=config.get("dynamic"),
                   modules_in_block_to_quantize=_flatten(config.get("modules_in_block_to_quantize")),
                   full_config=config)

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
            logger.warning("mygptq: %s is not a local directory or a cached Hub snapshot; its config files "
                           "are not cross-checked and every linear layer is treated as quantized", model_name)
            return
        validate.config_sources(directory)
        self.module_files = validate.module_files(validate.tensor_files(directory))
        if not self.modules_in_block_to_quantize:
            self.modules_in_block_to_quantize = sorted(self.module_files)

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
        return {**self.full_config, "quant_method": "gptq", "bits": b.bits, "group_size": b.group_size,
                "desc_act": b.desc_act, "sym": b.sym, "lm_head": self.lm_head,
                "dynamic": self.full_config.get("dynamic") or {}}

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
        for kind, pattern, overrides in self.dynamic:
            if re.match(pattern, name):
                if kind == "-":
                    return None
                return self._apply_overrides(overrides, name)
        return self.base

    def _apply_overrides(self, overrides: dict[str, Any], name: str) -> LayerScheme:
        s = replace(self.base, **{k: v for k, v in overrides.items() if k in _DYNAMIC_KEYS})
        s = replace(s, desc_act=bool(s.desc_act) and s.group_size != -1, sym=bool(s.sym))
        _check_scheme(s.bits, s.group_size, f"dynamic rule for {name}: ")
        if s.layout is not None:
            # A converted checkpoint keeps one layout name; a layer whose bits it cannot hold was written in
            # the default layout of its own bits (what `gptq-convert` does for such overrides).
            layout = Layout(overrides["layout"]) if "layout" in overrides else s.layout
            if layout is Layout.MARLIN and s.bits not in (4, 8):
                layout = default_layout(s.bits)
            s = replace(s, layout=layout)
        self._check_layout(s, f"dynamic rule for {name}: ")
        return s

    @staticmethod
    def _check_layout(s: LayerScheme, where: str) -> None:
        if s.layout is Layout.MARLIN and s.bits not in (4, 8):
            raise ValueError(f"mygptq: {where}layout 'marlin' holds 4- or 8-bit weights, not {s.bits}-bit; "
                             f"convert with --layout exllama")

    @staticmethod
    def _parse_dynamic(dynamic: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
        """GPTQModel `dynamic`: ordered rules "+:<regex>" (or a bare regex) -> overrides, "-:<regex>" -> skip."""
        rules = []
        for key, overrides in dynamic.items():
            kind, pattern = ("-", key[2:]) if key.startswith("-:") else ("+", key.removeprefix("+:"))
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"mygptq: dynamic rule {key!r} is not a valid regular expression: {e}") from None
            overrides = dict(overrides or {})
            if kind == "+":
                refused = set(overrides) & _DYNAMIC_FORMAT_KEYS
                if overrides.get("pack_dtype", "int32").removeprefix("torch.") == "int32":
                    refused.discard("pack_dtype")
                if refused:
                    raise ValueError(f"mygptq: dynamic rule {key!r} changes {sorted(refused)} for some modules; "
                                     f"mygptq reads one tensor format per checkpoint and honours per-module "
                                     f"{sorted(_DYNAMIC_KEYS)} only")
            rules.append((kind, pattern, overrides))
        return rules
