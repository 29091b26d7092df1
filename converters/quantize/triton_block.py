"""The solver's in-block column loop as one Triton kernel (CUDA): one launch per block of 128 columns.

The eager loop costs ~14 small kernel launches per column, which on a GPU is launch-bound (an 8B model
has ~850k column steps).  Rows are independent, so each program owns ROWS rows of the block, keeps
them in registers and walks the columns sequentially: the same arithmetic as solver.py's torch loop,
op for op (IEEE division, round-half-even, no FMA contraction), so both give the same codes.

Group parameters either come from the scale/zero tables (static groups, or groups starting at a block
start, fitted by the caller) or, for groups smaller than the block (GS > 0), are fitted in the kernel
on the current, error-updated columns exactly as grid.find_params does without its MSE search (with
mse on, solver.py runs the eager loop for such groups instead: the search is untested on a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .grid import MIN_SCALE

ROWS = 16


@triton.jit
def _round_half_even(x):
    f = tl.floor(x)
    d = x - f
    odd = f - 2.0 * tl.floor(f * 0.5)
    return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, f + odd))


@triton.jit
def _block_kernel(W, sw, U, su, S, Z, sg, colgroup, codes, sc, E, se, loss, R, NB, j0,
                  MAXQ: tl.constexpr, SYM: tl.constexpr, MIN_ZERO: tl.constexpr, MIN_S: tl.constexpr,
                  GS: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    rmask = rows < R
    cmask = cols < NB
    w = tl.load(W + rows[:, None] * sw + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
    acc = tl.zeros([ROWS], dtype=tl.float32)
    s = tl.zeros([ROWS], dtype=tl.float32) + 1.0
    z = tl.zeros([ROWS], dtype=tl.float32)
    for i in range(0, NB):
        if GS > 0:
            if (j0 + i) % GS == 0:  # fit the group starting here on the current columns
                gm = (cols[None, :] >= i) & (cols[None, :] < i + GS) & cmask[None, :]
                xmin = tl.minimum(tl.min(tl.where(gm, w, float("inf")), axis=1), 0.0)
                xmax = tl.maximum(tl.max(tl.where(gm, w, float("-inf")), axis=1), 0.0)
                if SYM:
                    xmax = tl.maximum(tl.abs(xmin), xmax)
                    xmin = tl.where(xmin < 0, -xmax, xmin)
                empty = (xmin == 0.0) & (xmax == 0.0)
                xmin = tl.where(empty, -1.0, xmin)
                xmax = tl.where(empty, 1.0, xmax)
                s = tl.maximum(tl.math.div_rn(xmax - xmin, MAXQ * 1.0), MIN_S).to(tl.float16).to(tl.float32)
                if SYM:
                    z = tl.zeros([ROWS], dtype=tl.float32) + (MAXQ + 1) // 2
                else:
                    z = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(-xmin, s)), MIN_ZERO * 1.0), MAXQ * 1.0)
                g = (j0 + i) // GS
                tl.store(S + g * sg + rows, s, mask=rmask)
                tl.store(Z + g * sg + rows, z.to(tl.int32), mask=rmask)
        else:
            g = tl.load(colgroup + j0 + i)
            s = tl.load(S + g * sg + rows, mask=rmask, other=1.0)
            z = tl.load(Z + g * sg + rows, mask=rmask, other=0).to(tl.float32)
        wi = tl.sum(tl.where(cols[None, :] == i, w, 0.0), axis=1)
        code = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(wi, s)) + z, 0.0), MAXQ * 1.0)
        d = tl.load(U + i * su + i)
        err = tl.math.div_rn(wi - s * (code - z), d)
        acc += err * err
        h = tl.load(U + i * su + cols, mask=(cols >= i) & cmask, other=0.0)
        w = w - err[:, None] * h[None, :]
        tl.store(codes + rows * sc + j0 + i, code.to(tl.int32), mask=rmask)
        tl.store(E + rows * se + i, err, mask=rmask)
    tl.store(loss + rows, tl.load(loss + rows, mask=rmask, other=0.0) + acc, mask=rmask)


def quantize_block(Wp: torch.Tensor, U: torch.Tensor, i1: int, i2: int, scales: torch.Tensor, zeros: torch.Tensor,
                   colgroup: torch.Tensor, codes: torch.Tensor, E1: torch.Tensor, loss: torch.Tensor, bits: int,
                   sym: bool, min_zero: int, group_in_block: int) -> None:
    """Quantize columns [i1, i2) of Wp in place of the torch loop (fp32, contiguous, one device).

    group_in_block: the group size when groups start inside blocks (fitted here), else 0 (tables).
    """
    R, C = Wp.shape
    NB = i2 - i1
    Wb = Wp[:, i1:]
    Ub = U[i1:, i1:]
    _block_kernel[(triton.cdiv(R, ROWS),)](
        Wb, Wp.stride(0), Ub, U.stride(0), scales, zeros, scales.stride(0), colgroup, codes, codes.stride(0),
        E1, E1.stride(0), loss, R, NB, i1,
        MAXQ=2**bits - 1, SYM=sym, MIN_ZERO=min_zero, MIN_S=MIN_SCALE, GS=group_in_block, BLOCK=128, ROWS=ROWS,
        enable_fp_fusion=False,
    )
