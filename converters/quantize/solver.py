"""The GPTQ solver: quantize the rows of W [R, C] against a Hessian H [C, C] (Frantar et al., 2022).

Objective per row w: minimise (w - q) H (w - q)^T with H = 2/N * X X^T.  Columns are quantized one at
a time; the error of column i is spread over the columns not yet quantized with the OBS update, whose
coefficients are row i of U, the upper Cholesky factor of H^-1 (H^-1 = U^T U):
    err = (w_i - q_i) / U_ii;   w_j -= err * U_ij  (j > i);   loss += (w_i - q_i)^2 / U_ii^2 / 2
Rows are independent, so the rows of every module that reads the same input are stacked into one W
and solved together (exact: identical to separate solves).

Choices, and why (quantizer.md §1, §6, §8):
  * U from ONE fp64 Cholesky of the reversed, damped H: with J the reversal, chol(J H J) = L gives
    U = J L^-1 J (no explicit H^-1, no second factorisation).  fp64 because fp32 factorisations of
    large or rank-deficient H fail or lose accuracy; the damping ladder retries with more damping
    before giving up to round-to-nearest (loudly), never to NaN.
  * Dead columns (diag H == 0, the input channel was always 0) get the mean diagonal of H and keep
    their weights: they are decoupled, so they are rounded to nearest and move no other column.
    The reference zeroes them, which is wrong when the zero is a calibration coverage gap.
  * Lazy blocks of 128 columns: the in-block updates are rank-1, the rest of W gets one GEMM per block.
    Blocks are aligned to groups so that a group's parameters are always fitted on up-to-date columns
    (the reference fits them on stale columns when group_size < block, quantizer.md P1).
  * act_order "desc": columns in decreasing diag(H) order, groups formed in that order (non-trivial
    g_idx).  "static": same column order, but groups (and their scales) are fitted on the original
    contiguous layout before the loop, so g_idx stays trivial and kernels need no gather.
  * Scales are rounded to their storage dtype inside find_params, and the codes written to the
    checkpoint are the loop's own codes, so the checkpoint dequantizes bit-exactly to what the loop
    measured its error against.
  * mse > 0: every group's (scale, zero) comes from grid.find_params' MSE clipping search, wherever
    the group is fitted (static tables, block starts, group starts inside a block).
  * On CUDA the in-block column loop is one Triton kernel per block (triton_block.py, same arithmetic):
    the eager loop is ~14 tiny launches per column, which bounds its speed on a GPU.  The kernel fits
    groups smaller than the block itself with min-max only, so with mse and such groups (group_size
    < 128 with act_order none/desc) the solver runs the eager loop instead; with the tables (static,
    or groups of 128 or more, which start at block starts) the fused kernel is used with mse too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

import torch

from gptq_vllm.formats.act_order import default_g_idx, effective_group_size, num_groups
from gptq_vllm.formats.gptq import QuantizedWeight

from .grid import find_params
from .hessian import full_precision_matmul

log = logging.getLogger(__name__)

ACT_ORDERS = ("none", "static", "desc")
# Relative damping tried in turn after the requested one; beyond 1.0 H is mostly the identity anyway.
DAMP_LADDER = (0.02, 0.05, 0.1, 0.3, 1.0)


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: str = "static"
    damp: float = 0.01
    block_size: int = 128
    min_zero: int = 0  # 1 for asymmetric GPTQ v1, which cannot store a zero point of 0
    mse: float = 0.0  # norm of the MSE clipping search of every group's grid (grid.find_params); 0: min-max

    def __post_init__(self):
        if self.act_order not in ACT_ORDERS:
            raise ValueError(f"act_order must be one of {ACT_ORDERS}, not {self.act_order!r}")
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"bits must be 2, 3, 4 or 8, not {self.bits}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size must be -1 or positive, not {self.group_size}")
        if not self.mse >= 0:
            raise ValueError(f"mse must be a norm > 0, or 0 for min-max, not {self.mse}")


@dataclass
class Solution:
    """The loop's output for the stacked rows: codes [R, C] and groups in input-channel order."""

    codes: torch.Tensor  # int32 [R, C]
    scales: torch.Tensor  # fp32 [NG, R], every value exact in fp16 (the checkpoints' scale dtype)
    zeros: torch.Tensor  # int32 [NG, R]
    g_idx: torch.Tensor  # int32 [C]
    loss: torch.Tensor  # [R]: sum over columns of (w - q)^2 / U_ii^2 / 2 (the output MSE per token)
    damp: float | None  # the damping that factorised H; None when the solve fell back to RTN
    spec: QuantSpec

    def rows(self, start: int, stop: int) -> "Solution":
        return Solution(self.codes[start:stop], self.scales[:, start:stop], self.zeros[:, start:stop], self.g_idx,
                        self.loss[start:stop], self.damp, self.spec)

    def dequantize(self) -> torch.Tensor:
        """Q [R, C] fp32 = scale * (code - zero), exactly the loop's q in fp32."""
        g = self.g_idx.to(torch.int64)
        return self.scales[g].t() * (self.codes.to(torch.float32) - self.zeros[g].t().to(torch.float32))

    def weight(self) -> QuantizedWeight:
        s = self.spec
        return QuantizedWeight(codes=self.codes.t().contiguous(), scales=self.scales.to(torch.float16),
                               zeros=self.zeros, g_idx=self.g_idx, bits=s.bits, group_size=s.group_size, sym=s.sym)


def hessian_factor(H: torch.Tensor, perm: torch.Tensor, damp: float, dtype: torch.dtype = torch.float32,
                   rhs: torch.Tensor | None = None):
    """(U, damp used): U upper triangular with U^T U = (H[perm][:, perm] + damp * mean(diag) I)^-1.

    None, None when every rung of the damping ladder fails (H not positive definite even then).
    rhs [R, C] fp64 (columns in perm order), if given, is replaced in place by rhs times that inverse,
    by two triangular solves with the same Cholesky factor (QEP's target shift, qep.py).
    """
    rev = perm.flip(0)
    A = H.index_select(0, rev).index_select(1, rev).to(torch.float64)  # J P H P^T J in one gather
    diag = A.diagonal()
    live = diag != 0
    mean = diag[live].mean() if bool(live.any()) else torch.ones((), dtype=A.dtype, device=A.device)
    diag[~live] = mean  # dead columns: decoupled unit-scale rows, see the module docstring
    applied = 0.0
    for d in (damp, *(x for x in DAMP_LADDER if x > damp)):
        diag.add_((d - applied) * mean)
        applied = d
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0:
            break
        log.info("Cholesky failed at damp %.3g (minor %d); retrying with more damping", d, int(info))
    else:
        return None, None
    if rhs is not None:  # rhs (JAJ)^-1 = (J A^-1 J rhs^T)^T with A = L L^T; A is symmetric
        Bt = rhs.t().flip(0)  # a copy, solved in place
        torch.linalg.solve_triangular(L, Bt, upper=False, out=Bt)
        torch.linalg.solve_triangular(L.mT, Bt, upper=True, out=Bt)
        rhs.copy_(Bt.flip(0).t())
        del Bt
    A.zero_().diagonal().fill_(1)  # A's memory becomes the identity, then L^-1 (in place: 2 fp64 C x C at peak)
    Linv = torch.linalg.solve_triangular(L, A, upper=False, out=A)
    del L
    return Linv.to(dtype).flip((0, 1)).contiguous(), applied


def _fused_available() -> bool:
    try:
        from . import triton_block  # noqa: F401
    except ImportError:
        return False
    return True


def _block_eager(Wp, U, i1, i2, scales, zeros, group_of, codes, E1, loss, bits, sym, min_zero, in_block, mse):
    """Columns [i1, i2) of Wp, one at a time (the reference loop: CPU, and fp64 in the tests)."""
    threads = torch.get_num_threads()
    if Wp.device.type == "cpu":
        torch.set_num_threads(1)  # ops on one column are far too small to split: threads only add sync
    try:
        _columns(Wp, U, i1, i2, scales, zeros, group_of, codes, E1, loss, bits, sym, min_zero, in_block, mse)
    finally:
        torch.set_num_threads(threads)


def _columns(Wp, U, i1, i2, scales, zeros, group_of, codes, E1, loss, bits, sym, min_zero, in_block, mse):
    W1, U1 = Wp[:, i1:i2], U[i1:i2, i1:i2]  # W1 is a view: updated in place
    maxq, loaded = 2**bits - 1, None
    for i in range(i2 - i1):
        j = i1 + i
        if in_block and j % in_block == 0:  # fitted on the current, error-updated columns
            scales[j // in_block], zeros[j // in_block] = find_params(W1[:, i:i + in_block], bits, sym,
                                                                      min_zero=min_zero, mse=mse)
            loaded = None
        if group_of[j] != loaded:
            loaded = group_of[j]
            s, z = scales[loaded].to(W1.dtype), zeros[loaded].to(W1.dtype)
        w = W1[:, i]
        code = torch.clamp(torch.round(w / s) + z, 0, maxq)
        codes[:, j] = code.to(torch.int32)
        err = (w - s * (code - z)) / U1[i, i]
        loss += err * err
        W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
        E1[:, i] = err


def gptq_solve(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, dtype: torch.dtype = torch.float32,
               fused: bool | None = None, shift: torch.Tensor | None = None) -> Solution:
    """Quantize W [R, C] (rows of one or more modules reading one input) against H [C, C].

    dtype is the loop's precision: float32 in production, float64 for exactness tests.  fused runs the
    in-block loop as one Triton kernel per block (triton_block.py; the default on CUDA), else eager torch.
    shift [R, C] (QEP, qep.py): the rows quantized are W + shift H^-1, with the damped H and its factor;
    the loss is then measured against those rows.
    """
    R, C = W.shape
    if H.shape != (C, C):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected ({C}, {C}) for W of shape {tuple(W.shape)}")
    if not torch.isfinite(H).all():
        raise ValueError("H has NaN or inf entries")
    device = W.device
    G = effective_group_size(C, spec.group_size)
    perm = (torch.argsort(torch.diagonal(H), descending=True, stable=True) if spec.act_order != "none"
            else torch.arange(C, device=device))
    if shift is not None and shift.shape != W.shape:
        raise ValueError(f"shift has shape {tuple(shift.shape)}, expected {tuple(W.shape)}")
    rhs = None if shift is None else shift.to(torch.float64)[:, perm]
    with full_precision_matmul():
        U, damp = hessian_factor(H, perm, spec.damp, dtype, rhs)
    if U is None:
        log.warning("H is not positive definite even at damp %.2f: falling back to round-to-nearest", DAMP_LADDER[-1])
        U = torch.eye(C, dtype=dtype, device=device)
    elif rhs is not None:  # the static tables below are fitted on these rows too
        W = (W.to(torch.float64) + rhs[:, torch.argsort(perm)]).to(W.dtype)
    del rhs

    Wp = W.to(dtype)[:, perm].contiguous()
    ng = num_groups(C, spec.group_size)
    scales = torch.empty(ng, R, device=device)
    zeros = torch.empty(ng, R, dtype=torch.int32, device=device)
    fit = lambda cols: find_params(cols, spec.bits, spec.sym, min_zero=spec.min_zero, mse=spec.mse)  # noqa: E731
    if spec.act_order == "static":  # groups of the original layout, fitted before any update
        for g in range(ng):
            scales[g], zeros[g] = fit(W[:, g * G:(g + 1) * G])
        group_of = perm // G
    else:
        group_of = torch.arange(C, device=device) // G
    codes = torch.empty(R, C, dtype=torch.int32, device=device)
    loss = torch.zeros(R, dtype=dtype, device=device)
    # Blocks aligned to groups: a group starting inside a block ends inside it (fitted in the block
    # loop); one starting at a block start may extend past it, and is fitted here, when its columns
    # beyond the block are up to date too.
    bs = spec.block_size
    if G < C:
        bs = bs - bs % G if G <= bs else (bs if G % bs == 0 else G)
    in_block = G if spec.act_order != "static" and G < bs else 0
    if fused is None:
        fused = W.is_cuda and _fused_available()
    # The kernel fits in-block groups with min-max only (module docstring): mse needs the eager loop there.
    if fused and dtype == torch.float32 and bs <= 128 and not (spec.mse and in_block):
        from .triton_block import quantize_block as block
        group_of = group_of.to(torch.int32)
    else:
        block = partial(_block_eager, mse=spec.mse)
        group_of = group_of.tolist()

    with full_precision_matmul():
        for i1 in range(0, C, bs):
            i2 = min(i1 + bs, C)
            if spec.act_order != "static" and not in_block and i1 % G == 0:
                scales[i1 // G], zeros[i1 // G] = fit(Wp[:, i1:i1 + G])
            E1 = torch.empty(R, i2 - i1, dtype=dtype, device=device)
            block(Wp, U, i1, i2, scales, zeros, group_of, codes, E1, loss, spec.bits, spec.sym, spec.min_zero, in_block)
            Wp[:, i2:] -= E1 @ U[i1:i2, i2:]

    inv = torch.argsort(perm)
    g_idx = default_g_idx(C, spec.group_size, device)
    if spec.act_order == "desc":
        g_idx = g_idx[inv]
    return Solution(codes[:, inv].contiguous(), scales, zeros, g_idx, loss / 2, damp, spec)
