"""Round-to-nearest quantization of one linear weight: the baseline GPTQ is measured against."""

from __future__ import annotations

import torch

from gptq_vllm.formats.act_order import default_g_idx, effective_group_size, num_groups
from gptq_vllm.formats.gptq import QuantizedWeight

from .grid import find_params, quantize_codes


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int, sym: bool,
                 scale_dtype: torch.dtype = torch.float16, min_zero: int = 0, mse: float = 0.0) -> QuantizedWeight:
    """nn.Linear weight [N, K] -> QuantizedWeight with groups of G consecutive input channels, min-max
    or MSE-searched grids (on weight's device; min_zero and mse as in grid.find_params)."""
    N, K = weight.shape
    G = effective_group_size(K, group_size)
    ng = num_groups(K, group_size)
    w = weight.to(torch.float32)
    codes = torch.empty(N, K, dtype=torch.int32, device=w.device)
    scales = torch.empty(ng, N, dtype=torch.float32, device=w.device)
    zeros = torch.empty(ng, N, dtype=torch.int32, device=w.device)
    for g in range(ng):
        cols = slice(g * G, min(K, (g + 1) * G))
        s, z = find_params(w[:, cols], bits, sym, scale_dtype, min_zero, mse)
        codes[:, cols] = quantize_codes(w[:, cols], s, z, bits)
        scales[g], zeros[g] = s, z
    return QuantizedWeight(
        codes=codes.t().contiguous(),
        scales=scales.to(scale_dtype),
        zeros=zeros,
        g_idx=default_g_idx(K, group_size, w.device),
        bits=bits,
        group_size=group_size,
        sym=sym,
    )

