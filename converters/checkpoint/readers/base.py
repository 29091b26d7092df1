"""What every checkpoint reader offers: quantized modules as canonical QuantizedWeights, the rest as is.

A reader knows which tensor names make up a quantized module (MODULE_TENSORS, found through the MARKERS
that only quantized modules have) and how to decode them (`_load`).  Every error it raises names the
file(s) holding the module, the tensor and what was expected.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch

from gptq_vllm.formats.act_order import is_trivial
from gptq_vllm.formats.errors import FormatError
from gptq_vllm.formats.gptq import QuantizedWeight
from gptq_vllm.formats.quant_config import ModuleParams
from gptq_vllm.formats.validate import check_fused, model_dims

from ..safetensors_dir import SafetensorsDir
from .config import QuantConfig


class Checkpoint(ABC):
    MODULE_TENSORS: tuple[str, ...] = ()  # suffixes of the tensors of one quantized module
    MARKERS: tuple[str, ...] = ()  # suffixes that only quantized modules have
    ACT_ORDER_TENSOR = "g_idx"  # this format's name for the tensor that carries act-order

    def __init__(self, path: Path, config: QuantConfig, tensors: SafetensorsDir):
        self.path = path
        self.config = config
        self.tensors = tensors
        self._modules: dict[str, list[str]] = {}
        names = tensors.names()
        for name in names:
            module, _, suffix = name.rpartition(".")
            if suffix in self.MARKERS:
                self._modules.setdefault(module, [])
        for name in names:
            module, _, suffix = name.rpartition(".")
            if module in self._modules and suffix in self.MODULE_TENSORS:
                self._modules[module].append(name)
        owned = {n for tensor_names in self._modules.values() for n in tensor_names}
        self._passthrough = [n for n in names if n not in owned]

    def modules(self) -> list[str]:
        """Names of the quantized modules (e.g. model.layers.0.mlp.down_proj), in file order."""
        return list(self._modules)

    def module_tensors(self, module: str) -> list[str]:
        return self._modules[module]

    def passthrough(self) -> list[str]:
        """Every tensor that is not part of a quantized module (embeddings, norms, biases, ...)."""
        return list(self._passthrough)

    def nbytes(self, names: list[str]) -> int:
        return sum(self.tensors.tensor_nbytes(n) for n in names)

    def where(self, module: str) -> str:
        """The file(s) holding a module, for error messages."""
        files = sorted({str(self.tensors.file_of(n)) for n in self._modules.get(module, [])})
        return ", ".join(files) or str(self.path)

    def get(self, module: str, suffix: str) -> torch.Tensor | None:
        name = f"{module}.{suffix}"
        return self.tensors.get(name) if name in self.tensors else None

    def shape(self, module: str, suffix: str) -> tuple[int, ...] | None:
        name = f"{module}.{suffix}"
        return self.tensors.shape(name) if name in self.tensors else None

    def params(self, module: str) -> ModuleParams:
        p = self.config.params(module)
        if p is None:
            rule = self.config.rule(module)
            raise FormatError(f"{self.where(module)}: {module} has quantized tensors, but the dynamic rule "
                              f"{rule.pattern!r} says it is not quantized")
        return p

    def load(self, module: str, out_perm: torch.Tensor | None = None) -> QuantizedWeight:
        """The module as a validated canonical weight; out_perm reorders its output channels (columns)."""
        try:
            return self._load(module, self.params(module), out_perm)
        except FormatError as e:
            if str(e).startswith(self.where(module)):
                raise
            raise FormatError(f"{self.where(module)}: {e}") from e

    def has_act_order(self) -> bool:
        """Whether any module carries a non-trivial act-order tensor (read from those small tensors only)."""
        for module in self.modules():
            t = self.get(module, self.ACT_ORDER_TENSOR)
            if t is not None and (self.ACT_ORDER_TENSOR == "perm" or not is_trivial(t, self.params(module).group_size)):
                return True
        return False

    def model_dims(self, module: str) -> tuple[int, int] | None:
        """(K, N) that config.json gives the module (what vLLM builds the layer with), where it tells."""
        return model_dims(self.config.model, module)

    def check_fused(self, g_idx: dict[str, torch.Tensor]) -> None:
        """validate.check_fused over the modules of one parent, the error naming the file of the module blamed."""
        try:
            check_fused(g_idx, self.ACT_ORDER_TENSOR)
        except FormatError as e:
            module = str(e).split(f".{self.ACT_ORDER_TENSOR}:")[0]
            raise FormatError(f"{self.where(module)}: {e}") from e

    @abstractmethod
    def _load(self, module: str, params: ModuleParams, out_perm: torch.Tensor | None) -> QuantizedWeight:
        ...

    @abstractmethod
    def dims(self, module: str) -> tuple[int, int] | None:
        """(in_features K, out_features N) from the tensor headers alone; None when they do not tell."""

    def describe(self) -> dict:
        """The detected format, for provenance and `inspect`."""
        c = self.config
        return {"quant_method": c.method, "dialect": c.dialect, "config_files": c.sources, "quantizer": c.quantizer}
