"""QEP, quantization error propagation (Arai & Ichikawa, arXiv 2504.09629), on top of GPTQ.

Layer-wise GPTQ fits each layer to its own inputs X̂, which already carry the error of everything
quantized before it, so errors pile up through the depth of the model.  QEP fits the layer to the
full-precision model instead.  With X the layer's inputs in the full-precision model (columns are
tokens, the layer computes y = W x), δ = X − X̂ and Ĥ = X̂X̂ᵀ:

    min over Ŵ of ‖W X − Ŵ X̂‖²  has the least-squares solution  W* = W X X̂ᵀ Ĥ⁻¹ = W + W δ X̂ᵀ Ĥ⁻¹,

and ‖W X − Ŵ X̂‖² = ‖(W* − Ŵ) X̂‖² + a constant, so GPTQ on W* with Ĥ minimises it.  QEP scales the
correction, W* = W + α W δ X̂ᵀ Ĥ⁻¹ with α ∈ [0, 1]: at α = 1 the layer fits the calibration tokens'
propagated error fully, which overfits them (the paper tunes α per layer type).  Ĥ is the damped
Hessian GPTQ factorises anyway, and Ĥ⁻¹ is applied by triangular solves with that factor
(solver.hessian_factor); δX̂ᵀ is accumulated next to Ĥ (hessian.Hessian, cross=True).

α is chosen per module by rules "REGEX=ALPHA" (re.search on the full module name, first match wins)
and a bare "ALPHA" for every other module.  DEFAULT_ALPHA was chosen by measurement (docs/quantizer.md, QEP).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .hessian import full_precision_matmul

DEFAULT_ALPHA: tuple[tuple[str, float], ...] = ((r"(down_proj|\.w2|fc2)$", 1.0), (r"", 0.5))


@dataclass(frozen=True)
class QEP:
    """QEP settings of a quantize job: the α rules, and whether each solve is repeated without the
    correction so that the report can show both output errors (compare)."""

    alpha: tuple[tuple[str, float], ...] = DEFAULT_ALPHA
    compare: bool = False

    def __post_init__(self):
        for pattern, a in self.alpha:
            if not 0 <= a <= 1:
                raise ValueError(f"QEP alpha must be in [0, 1], not {a} (for {pattern or 'every module'!r})")
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"QEP alpha rule {pattern!r}: bad regex ({e})") from None

    def alpha_for(self, module: str) -> float:
        """α of one module (full name without .weight); 0 when no rule matches."""
        for pattern, a in self.alpha:
            if re.search(pattern, module):
                return a
        return 0.0

    @staticmethod
    def parse_alpha(values: list[str] | tuple[str, ...]) -> tuple[tuple[str, float], ...]:
        """CLI values "REGEX=ALPHA" (in order) and at most one bare "ALPHA" (the rest); rules the values
        leave out keep DEFAULT_ALPHA's, after the given ones."""
        rules, rest = [], None
        for value in values:
            pattern, _, number = value.rpartition("=")
            try:
                a = float(number)
            except ValueError:
                raise ValueError(f"--qep-alpha {value!r}: expected ALPHA or REGEX=ALPHA, ALPHA a number") from None
            if not pattern and "=" not in value:
                if rest is not None:
                    raise ValueError("--qep-alpha: give at most one bare ALPHA (the value for every other module)")
                rest = a
            else:
                rules.append((pattern, a))
        defaults = [(p, a) for p, a in DEFAULT_ALPHA if p] if rest is None else []
        tail = [("", rest if rest is not None else dict(DEFAULT_ALPHA)[""])]
        return tuple(rules + defaults + tail)


def target_shift(W: torch.Tensor, cross: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor | None:
    """α W δX̂ᵀ per row (W [R, C], cross = δX̂ᵀ [C, C] on H's scale, alpha [R]): the shift gptq_solve
    multiplies by Ĥ⁻¹; None when every α is 0 (plain GPTQ, bit for bit)."""
    if not bool(alpha.any()):
        return None
    with full_precision_matmul():
        return (W.to(torch.float32) @ cross.to(W.device, torch.float32)).mul_(alpha.to(W.device).unsqueeze(1))
