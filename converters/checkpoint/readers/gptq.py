"""GPTQ checkpoints (AutoGPTQ, GPTQModel, transformers/optimum): qweight, qzeros, scales, g_idx per module.

The zero-point convention (v1 stores z-1, v2 stores z) is taken from the config, or from the caller's
override, and checked against what the data shows: symmetric files reveal it in every qzeros word
(formats.md §1.4), so a mislabelled checkpoint is refused instead of being silently off by one.
Every check is validate.gptq_weight's, the one the plugin runs at load.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import torch

from gptq_vllm.formats import gptq
from gptq_vllm.formats.gptq import QuantizedWeight, ZeroFormat
from gptq_vllm.formats.quant_config import ModuleParams
from gptq_vllm.formats.validate import gptq_dims, gptq_weight

from ..safetensors_dir import SafetensorsDir
from .base import Checkpoint
from .config import QuantConfig


class GPTQCheckpoint(Checkpoint):
    MODULE_TENSORS = ("qweight", "qzeros", "scales", "g_idx")
    MARKERS = MODULE_TENSORS  # any of them: a module missing its qweight is still a broken quantized one

    def __init__(self, path: Path, config: QuantConfig, tensors: SafetensorsDir, zero_format: ZeroFormat | None = None):
        super().__init__(path, config, tensors)
        self.override = zero_format
        self.zero_format = zero_format or config.zero_format
        self.zero_format_in_data: Counter[str] = Counter()  # convention the qzeros show -> modules
        self._lock = threading.Lock()  # modules may be loaded on several threads

    def _load(self, module: str, p: ModuleParams, out_perm: torch.Tensor | None) -> QuantizedWeight:
        tensors = {s: self.get(module, s) for s in self.MODULE_TENSORS}
        K, N = self.model_dims(module) or (None, None)
        w = gptq_weight(tensors, module, p.bits, p.group_size, p.sym, self.zero_format, p.desc_act,
                        K, N, check_label=self.override is None, out_perm=out_perm)
        self._count_zero_format(tensors["qzeros"], p.bits, w.out_features)
        return w

    def dims(self, module: str) -> tuple[int, int] | None:
        shapes = {s: self.shape(module, s) for s in ("qweight", "scales", "g_idx")}
        K, N = gptq_dims(self.params(module).bits,
                         {s: None if v is None else torch.empty(v, device="meta") for s, v in shapes.items()})
        return None if K is None or N is None else (K, N)

    def _count_zero_format(self, qzeros: torch.Tensor, bits: int, N: int) -> None:
        """What the data shows, for inspect and the provenance (the check itself is gptq_weight's)."""
        detected = gptq.detect_zero_format(qzeros, bits, N)
        with self._lock:
            self.zero_format_in_data[detected.value if detected else "undetermined"] += 1

    def describe(self) -> dict:
        return {
            **super().describe(),
            "checkpoint_format": self.zero_format.value,
            "checkpoint_format_declared": self.config.zero_format.value,
            "checkpoint_format_overridden": self.override is not None,
            "zero_format_in_data": dict(self.zero_format_in_data),
        }
