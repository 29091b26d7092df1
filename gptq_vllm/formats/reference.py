"""Reference dequantization and matmul: the oracle every kernel and layout is tested against."""

from __future__ import annotations

import torch

from .gptq import QuantizedWeight


def dequantize(weight: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [K, N] = scales[g_idx] * (codes - zeros[g_idx]), computed in fp32 then cast."""
    g = weight.g_idx.to(torch.int64)
    s = weight.scales.to(torch.float32)[g]
    z = weight.zeros.to(torch.float32)[g]
    return (s * (weight.codes.to(torch.float32) - z)).to(dtype)


def reference_matmul(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W (+ bias), accumulated in fp32 and returned in x's dtype."""
    y = x.to(torch.float32) @ dequantize(weight, torch.float32).to(x.device)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)
