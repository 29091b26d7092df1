"""Hessians of the layer-wise GPTQ objective: H = 2/N * sum over tokens of x x^T, in fp32.

One accumulator per distinct module input (q/k/v share one, gate/up share one), counted in tokens,
scaled once at the end (quantizer.md §3): no per-batch O(C^2) rescale as in the reference, and the
scale is the same whatever the batching.  The overall scale of H never changes the solution (damping
is relative to mean(diag H) and the updates are invariant to it); 2/N makes the solver's loss the
mean squared output error per token.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

log = logging.getLogger(__name__)
_HALF_MM = [True]  # cleared once if this torch build lacks torch.mm(..., out_dtype=float32)


@contextmanager
def full_precision_matmul():
    """TF32 and reduced-precision bf16/fp16 reductions off, for this scope only (quantizer.md §6.1).

    A TF32 Hessian or solve carries ~1e-3 relative error, enough to break the Cholesky of an
    ill-conditioned H; the previous settings are restored on exit rather than changed at import.
    """
    cuda = torch.backends.cuda.matmul
    saved = (cuda.allow_tf32, torch.backends.cudnn.allow_tf32, cuda.allow_bf16_reduced_precision_reduction,
             cuda.allow_fp16_reduced_precision_reduction)
    cuda.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    cuda.allow_bf16_reduced_precision_reduction = cuda.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        (cuda.allow_tf32, torch.backends.cudnn.allow_tf32, cuda.allow_bf16_reduced_precision_reduction,
         cuda.allow_fp16_reduced_precision_reduction) = saved


def _add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a^T b in fp32 for token rows a, b [N, C]."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and _HALF_MM[0]:
        # Half inputs, fp32 accumulation and output on the tensor cores: no fp32 copy of the inputs and
        # ~10x the speed of an fp32 GEMM (quantizer.md §12.2); the inputs are half already.
        try:
            out += torch.mm(a.t(), b, out_dtype=torch.float32)
            return
        except (TypeError, RuntimeError, NotImplementedError) as e:  # torch without mm(out_dtype)
            log.warning("half-input fp32-output GEMM unavailable (%s): upcasting inputs", e)
            _HALF_MM[0] = False
    a32 = a.to(torch.float32)
    out.addmm_(a32.t(), a32 if b is a else b.to(torch.float32))


class Hessian:
    """Running sum of x x^T over the tokens of one module input.

    cross=True also sums QEP's cross term (x_fp - x) x^T, where x_fp is the same token's input in the
    full-precision model (qep.py), in the same pass and precision as x x^T.
    """

    def __init__(self, columns: int, device: torch.device | str, cross: bool = False):
        self.sum = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.cross = torch.zeros_like(self.sum) if cross else None
        self.tokens = 0

    def add(self, x: torch.Tensor, keep: torch.Tensor | None = None, fp: torch.Tensor | None = None) -> None:
        """Add the tokens of x [..., C]; keep (bool, x's leading shape) drops padding positions; fp
        (x's shape) is the full-precision model's input, required with cross."""
        x = x.reshape(-1, x.shape[-1])
        if self.cross is not None:
            if fp is None or fp.shape[-1] != x.shape[-1] or fp.numel() != x.numel():
                raise ValueError("QEP needs the full-precision input of every token, in the input's shape")
            fp = fp.reshape(-1, x.shape[-1])
        if keep is not None:
            keep = keep.reshape(-1).to(x.device)
            x = x[keep]
            fp = fp[keep] if self.cross is not None else None
        with full_precision_matmul():
            _add_product(self.sum, x, x)
            if self.cross is not None:
                _add_product(self.cross, fp.to(x.dtype) - x, x)
        self.tokens += x.shape[0]

    def finalize(self) -> torch.Tensor:
        """2/N * sum x x^T; refuses an empty or non-finite H (an fp16 overflow upstream, quantizer.md §6.2)."""
        return self._scaled(self.sum, "the Hessian")

    def finalize_cross(self) -> torch.Tensor:
        """2/N * sum (x_fp - x) x^T, on the scale of finalize's H (QEP's delta X^T)."""
        return self._scaled(self.cross, "the QEP cross term")

    def _scaled(self, total: torch.Tensor, what: str) -> torch.Tensor:
        if self.tokens == 0:
            raise ValueError("no calibration tokens reached this module")
        out = total.mul_(2.0 / self.tokens)
        if not torch.isfinite(out).all():
            raise ValueError(f"{what} has NaN or inf entries: the calibration forward overflowed "
                             "(run it in the checkpoint's dtype, or in float32)")
        return out
