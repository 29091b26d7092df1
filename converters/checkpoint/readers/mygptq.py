"""Our own kernel-layout checkpoints (`quant_method: mygptq`, written by `gptq-convert convert`).

Per module: qweight in the Marlin or ExLlama layout, scales, qzeros (Marlin: asymmetric only; ExLlama:
always), and `perm` when the act-order permutation is stored rather than absorbed.  Decoding goes through
kernel_layout.from_kernel, so rows come back in input-channel order when `perm` is stored, and in the
stored (permuted) order when the permutation was absorbed into the producing modules.
"""

from __future__ import annotations

import torch

from gptq_vllm.formats import bitpack, marlin
from gptq_vllm.formats.act_order import num_groups
from gptq_vllm.formats.errors import FormatError
from gptq_vllm.formats.gptq import QuantizedWeight
from gptq_vllm.formats.kernel_layout import KernelWeight, Layout, from_kernel

from .base import Checkpoint
from .dynamic import ModuleParams


def expected_shapes(layout: Layout, p: ModuleParams, K: int, N: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors a module of this layout must have (perm: when present)."""
    ng = num_groups(K, p.group_size)
    shapes = {"scales": (ng, N), "perm": (K,)}
    if layout is Layout.MARLIN:
        shapes["qweight"] = (K // marlin.TILE_K, N * marlin.TILE_K * p.bits // 32)
        if not p.sym:
            shapes["qzeros"] = (ng, bitpack.packed_length(N, p.bits))
    else:
        shapes["qweight"] = (bitpack.packed_length(K, p.bits), N)
        shapes["qzeros"] = (ng, bitpack.packed_length(N, p.bits))
    return shapes


class MyGPTQCheckpoint(Checkpoint):
    MODULE_TENSORS = ("qweight", "scales", "qzeros", "perm", "g_idx_sorted")
    MARKERS = ("qweight",)

    def dims(self, module: str) -> tuple[int, int] | None:
        qweight, scales, perm = (self.shape(module, s) for s in ("qweight", "scales", "perm"))
        if scales is None:
            return None
        if self.config.layout is Layout.MARLIN:
            return qweight[0] * marlin.TILE_K, scales[-1]
        if perm is not None:
            return perm[0], scales[-1]
        codes, words = bitpack.block_shape(self.params(module).bits)
        return qweight[0] // words * codes, scales[-1]

    def _load(self, module: str, p: ModuleParams, out_perm: torch.Tensor | None) -> QuantizedWeight:
        t = {s: self.get(module, s) for s in self.MODULE_TENSORS}
        if t["scales"] is None:
            raise FormatError(f"{module}.scales is missing")
        layout = self.config.layout
        K, N = self.dims(module)
        for suffix, shape in expected_shapes(layout, p, K, N).items():
            if t[suffix] is None and suffix != "perm":
                raise FormatError(f"{module}.{suffix} is missing (expected shape {shape})")
            if t[suffix] is not None and tuple(t[suffix].shape) != shape:
                raise FormatError(f"{module}.{suffix}: shape {tuple(t[suffix].shape)}, expected {shape}")
        kw = KernelWeight(layout=layout, bits=p.bits, group_size=p.group_size, sym=p.sym, in_features=K,
                          out_features=N, qweight=t["qweight"], scales=t["scales"],
                          qzeros=t["qzeros"] if layout is Layout.EXLLAMA or not p.sym else None,
                          perm=t["perm"], g_idx_sorted=t["g_idx_sorted"])
        w = from_kernel(kw)
        return w if out_perm is None else w.permute_cols(out_perm)

    def describe(self) -> dict:
        return {**super().describe(), "layout": self.config.layout.value}
