"""The quantization grid of one group: min-max scale and zero, and round-to-nearest codes.

Conventions are AutoGPTQ's (quantizer.md §1), so that our checkpoints dequantize like theirs:
    xmin = min(w.min, 0), xmax = max(w.max, 0); symmetric: xmax = max(|xmin|, xmax), xmin = -xmax
    scale = (xmax - xmin) / (2^b - 1); zero = 2^(b-1) if symmetric else round(-xmin / scale)
    code = clamp(round(w / scale) + zero, 0, 2^b - 1)
Scales are rounded to their storage dtype here, before any code is computed, so the codes the loop
produces dequantize bit-exactly from the written checkpoint (quantizer.md §6.5).

Optional MSE clipping search (the reference quantizer's `mse` option, quantizer.md §1; GPTQModel's
`mse` float): per row, the range is shrunk to p·[xmin, xmax] for p = 1 - i/100, i < 80 (1.00 … 0.21),
and the p with the smallest Σ|Q(x) - x|^norm is kept.  Clipping a few large values buys a finer step
for all the others.  p = 1 is tried first and only a strictly smaller error replaces it, so the search
never does worse than the min-max grid in that norm.
"""

from __future__ import annotations

import torch

# The smallest normal fp16: smaller scales would be stored as subnormals or flushed to zero.
MIN_SCALE = 2.0**-14
# The reference's search grid: shrink factors 1 - i/MSE_GRID for i < MSE_MAXSHRINK * MSE_GRID.
MSE_GRID = 100
MSE_MAXSHRINK = 0.8
MSE_CHUNK_ELEMENTS = 1 << 24  # fp32 elements of one chunk's error tensor (64 MB)


def find_params(w: torch.Tensor, bits: int, sym: bool, scale_dtype: torch.dtype = torch.float16,
                min_zero: int = 0, mse: float = 0.0):
    """Per-row grid for w [rows, cols]: (scale [rows] fp32, zero [rows] int32).

    min_zero=1 keeps asymmetric zeros storable in GPTQ v1 (which writes z-1): a row whose fitted zero
    is 0 (all values >= 0) gets zero 1, i.e. one grid step below 0 and one less at the top.
    mse > 0 runs the clipping search with that norm (2.4 in the reference tools); 0 is min-max.
    """
    w = w.to(torch.float32)
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(empty, torch.full_like(xmax, 1.0), xmax)
    if mse <= 0:
        scale, zero = _grid(xmin, xmax, bits, sym, scale_dtype, min_zero)
        return scale, zero.to(torch.int32)
    # All shrink factors are scored at once, in chunks that keep the [chunk, rows, cols] error tensor near
    # MSE_CHUNK_ELEMENTS: a handful of kernels per group instead of ~20 per candidate (GPU launch cost).
    shrink = torch.tensor([1 - i / MSE_GRID for i in range(int(MSE_MAXSHRINK * MSE_GRID))],
                          dtype=torch.float32, device=w.device).unsqueeze(1)
    chunk = max(1, MSE_CHUNK_ELEMENTS // max(1, w.numel()))
    best = scale = zero = None
    for c0 in range(0, shrink.shape[0], chunk):
        p = shrink[c0:c0 + chunk]
        s, z = _grid(p * xmin, p * xmax, bits, sym, scale_dtype, min_zero)  # [chunk, rows]
        err = _lp_error(w, s, z, bits, mse)
        # argmin keeps the first (largest p) of equal errors: a smaller p must be strictly better.
        err_min, k = err.min(dim=0)
        s_k, z_k = s.gather(0, k.unsqueeze(0)).squeeze(0), z.gather(0, k.unsqueeze(0)).squeeze(0)
        if best is None:
            best, scale, zero = err_min, s_k, z_k
        else:
            better = err_min < best
            best = torch.where(better, err_min, best)
            scale, zero = torch.where(better, s_k, scale), torch.where(better, z_k, zero)
    return scale, zero.to(torch.int32)


def _grid(xmin, xmax, bits, sym, scale_dtype, min_zero):
    """(scale, zero) fp32 of the range [xmin, xmax], the scale already rounded to scale_dtype, so the
    codes (and, in the MSE search, the error they are scored by) are those of the stored grid."""
    maxq = 2**bits - 1
    scale = ((xmax - xmin) / maxq).clamp(min=MIN_SCALE).to(scale_dtype).to(torch.float32)
    if sym:
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        zero = torch.round(-xmin / scale).clamp(min_zero, maxq)
    return scale, zero


def _lp_error(w, scale, zero, bits, norm):
    """sum over columns of |scale·(code - zero) - w|^norm, for grids [..., rows] of w [rows, cols]."""
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    q = torch.clamp(torch.round(w / s) + z, 0, 2**bits - 1)
    return (s * (q - z) - w).abs_().pow_(norm).sum(dim=-1)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of w [rows, cols] on the per-row grid (scale, zero): int32 in [0, 2^b)."""
    q = torch.round(w.to(torch.float32) / scale.unsqueeze(1)) + zero.unsqueeze(1).to(torch.float32)
    return q.clamp(0, 2**bits - 1).to(torch.int32)

