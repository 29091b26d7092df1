"""The quantization grid of one group: min-max scale and zero, and round-to-nearest codes.

Conventions are AutoGPTQ's (quantizer.md §1), so that our checkpoints dequantize like theirs:
    xmin = min(w.min, 0), xmax = max(w.max, 0); symmetric: xmax = max(|xmin|, xmax), xmin = -xmax
    scale = (xmax - xmin) / (2^b - 1); zero = 2^(b-1) if symmetric else round(-xmin / scale)
    code = clamp(round(w / scale) + zero, 0, 2^b - 1)
Scales are rounded to their storage dtype here, before any code is computed, so the codes the loop
produces dequantize bit-exactly from the written checkpoint (quantizer.md §6.5).
"""

from __future__ import annotations

import torch

# The smallest normal fp16: smaller scales would be stored as subnormals or flushed to zero.
MIN_SCALE = 2.0**-14


def find_params(w: torch.Tensor, bits: int, sym: bool, scale_dtype: torch.dtype = torch.float16,
                min_zero: int = 0):
    """Per-row grid for w [rows, cols]: (scale [rows] fp32, zero [rows] int32).

    min_zero=1 keeps asymmetric zeros storable in GPTQ v1 (which writes z-1): a row whose fitted zero
    is 0 (all values >= 0) gets zero 1, i.e. one grid step below 0 and one less at the top.
    """
    maxq = 2**bits - 1
    w = w.to(torch.float32)
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(empty, torch.full_like(xmax, 1.0), xmax)
    scale = ((xmax - xmin) / maxq).clamp(min=MIN_SCALE).to(scale_dtype).to(torch.float32)
    if sym:
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        zero = torch.round(-xmin / scale).clamp(min_zero, maxq)
    return scale, zero.to(torch.int32)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of w [rows, cols] on the per-row grid (scale, zero): int32 in [0, 2^b)."""
    q = torch.round(w.to(torch.float32) / scale.unsqueeze(1)) + zero.unsqueeze(1).to(torch.float32)
    return q.clamp(0, 2**bits - 1).to(torch.int32)

