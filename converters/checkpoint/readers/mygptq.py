"""Our own kernel-layout checkpoints (`quant_method: mygptq`, written by `gptq-convert convert`).

Per module: qweight in the Marlin or ExLlama layout, scales, qzeros (Marlin: asymmetric only; ExLlama:
always), and `perm` when the act-order permutation is stored rather than absorbed.  Decoding goes through
kernel_layout.from_kernel, so rows come back in input-channel order when `perm` is stored, and in the
stored (permuted) order when the permutation was absorbed into the producing modules.  Every check is
validate.kernel_weight's, the one the plugin runs at load.
"""

from __future__ import annotations

import torch

from gptq_vllm.formats import bitpack, marlin
from gptq_vllm.formats.errors import FormatError
from gptq_vllm.formats.gptq import QuantizedWeight
from gptq_vllm.formats.kernel_layout import Layout
from gptq_vllm.formats.quant_config import ModuleParams
from gptq_vllm.formats.validate import kernel_weight

from .base import Checkpoint


class MyGPTQCheckpoint(Checkpoint):
    MODULE_TENSORS = ("qweight", "scales", "qzeros", "perm", "g_idx_sorted")
    MARKERS = ("qweight", "scales", "qzeros", "perm")  # a module missing one is still a quantized one
    ACT_ORDER_TENSOR = "perm"

    def dims(self, module: str) -> tuple[int, int] | None:
        qweight, scales, perm = (self.shape(module, s) for s in ("qweight", "scales", "perm"))
        if scales is None or qweight is None:
            return None
        bits = self.params(module).bits
        if self.config.layout is Layout.MARLIN:
            return qweight[0] * marlin.unit_rows(bits), scales[-1]
        if perm is not None:
            return perm[0], scales[-1]
        codes, words = bitpack.block_shape(bits)
        return qweight[0] // words * codes, scales[-1]

    def _load(self, module: str, p: ModuleParams, out_perm: torch.Tensor | None) -> QuantizedWeight:
        t = {s: self.get(module, s) for s in self.MODULE_TENSORS}
        dims = self.model_dims(module) or self.dims(module)
        if dims is None:
            raise FormatError(f"{module}.{'scales' if t['scales'] is None else 'qweight'} is missing")
        w = kernel_weight(t, module, self.config.layout, p.bits, p.group_size, p.sym, *dims)
        return w if out_perm is None else w.permute_cols(out_perm)

    def describe(self) -> dict:
        return {**super().describe(), "layout": self.config.layout.value}
