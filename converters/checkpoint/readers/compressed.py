"""compressed-tensors `pack-quantized` checkpoints (llm-compressor): weight_packed, weight_scale, ... per module.

Every check is validate.compressed_weight's (weight_shape may be int32 or int64: llm-compressor writes int64).
"""

from __future__ import annotations

import torch

from gptq_vllm.formats import compressed_tensors
from gptq_vllm.formats.gptq import QuantizedWeight
from gptq_vllm.formats.quant_config import ModuleParams
from gptq_vllm.formats.validate import compressed_weight

from .base import Checkpoint


class CompressedTensorsCheckpoint(Checkpoint):
    MODULE_TENSORS = compressed_tensors.SUFFIXES
    MARKERS = MODULE_TENSORS  # any of them: a module missing weight_packed is still a broken quantized one
    ACT_ORDER_TENSOR = "weight_g_idx"

    def _load(self, module: str, p: ModuleParams, out_perm: torch.Tensor | None) -> QuantizedWeight:
        tensors = {name: self.tensors.get(name) for name in self.module_tensors(module)}
        K, N = self.model_dims(module) or (None, None)
        w = compressed_weight(tensors, module, p.bits, p.group_size, p.sym, p.desc_act, K, N)
        return w if out_perm is None else w.permute_cols(out_perm)

    def dims(self, module: str) -> tuple[int, int] | None:
        shape = self.get(module, "weight_shape")
        if shape is None or shape.numel() != 2:
            return None
        N, K = (int(v) for v in shape.tolist())
        return K, N
