"""compressed-tensors `pack-quantized` checkpoints (llm-compressor): weight_packed, weight_scale, ... per module."""

from __future__ import annotations

import torch

from gptq_vllm.formats import compressed_tensors
from gptq_vllm.formats.errors import FormatError
from gptq_vllm.formats.gptq import QuantizedWeight

from .base import Checkpoint
from .dynamic import ModuleParams


class CompressedTensorsCheckpoint(Checkpoint):
    MODULE_TENSORS = compressed_tensors.SUFFIXES
    MARKERS = ("weight_packed",)

    def _load(self, module: str, p: ModuleParams, out_perm: torch.Tensor | None) -> QuantizedWeight:
        tensors = {name: self.tensors.get(name) for name in self.module_tensors(module)}
        for suffix in ("weight_packed", "weight_zero_point", "weight_shape"):
            t = tensors.get(f"{module}.{suffix}")
            if t is not None and t.dtype != torch.int32:
                raise FormatError(f"{module}.{suffix}: dtype {t.dtype}, expected torch.int32")
        w = compressed_tensors.from_tensors(tensors, module, p.bits, p.group_size, p.sym)
        return w if out_perm is None else w.permute_cols(out_perm)

    def dims(self, module: str) -> tuple[int, int] | None:
        shape = self.get(module, "weight_shape")
        if shape is None or shape.numel() != 2:
            return None
        N, K = (int(v) for v in shape.tolist())
        return K, N
