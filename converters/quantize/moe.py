"""MoE experts in the GPTQ pipeline: per-expert routed Hessians and a rule for starved experts.

transformers 5 runs the experts of a sparse MoE block (Mixtral, Qwen2-MoE, Qwen3-MoE, ...) as one module
with fused 3-D parameters, gate_up_proj [E, 2I, H] and down_proj [E, H, I], called after the router as
experts(hidden_states, top_k_index, top_k_weights).  GPTQ sees expert e as two modules: its gate and up
rows, which read the block input, and its down rows, which read act(gate) * up.  Each has a Hessian
accumulated only from the tokens the router sends to e.  A forward pre-hook on the experts module reads
the real routing and computes nothing the forward uses, so the layer output is exactly the uncaptured
one; the down input is recomputed in the hook from e's current (already quantized) gate/up rows with
the module's own gating function.  The router stays in float (pipeline.ROUTER).

Starved experts (quantizer.md §7.5, §8).  With n routed tokens an expert's H has rank <= n:
  * n == 0: there is nothing to solve against; the expert is rounded to nearest.
  * 0 < n < in_features: GPTQ would fit the weights to the n tokens it saw and push the error into the
    input directions it never saw, which other tokens will use.  H is shrunk toward the all-token H of
    the same input (the block input for gate/up; for down, e's own intermediate on every token):
        H = (n H_r + LAMBDA n0 H_all) / (n + LAMBDA n0),   n0 = in_features
    so the prior weighs as much as LAMBDA * in_features tokens.  LAMBDA = 1: the measurement behind the
    choice is in docs/quantizer.md (MoE).
  * n >= in_features: the routed H alone.
Every starved expert is logged with its token count, and the per-layer report lists them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .hessian import Hessian
from .moe_names import ExpertNames

log = logging.getLogger(__name__)

LAMBDA = 1.0
STAGES = ("gate_up_proj", "down_proj")  # the two inputs of an expert, in execution order


def fused_experts(layer: nn.Module) -> dict[str, nn.Module]:
    """The layer's experts modules this pipeline quantizes, by name: fused, concatenated [gate; up],
    not transposed, no biases (the transformers-5 layout of Mixtral and the Qwen MoE families)."""
    out = {}
    for name, m in layer.named_modules():
        gate_up, down = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
        if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == 3):
            continue
        if (getattr(m, "has_gate", False) and getattr(m, "is_concatenated", False) and hasattr(m, "_apply_gate")
                and not getattr(m, "is_transposed", True) and not getattr(m, "has_bias", True)):
            out[name] = m
    return out


def hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    """The tensor an experts call reads (the same object the block's other readers get)."""
    return args[0] if args else kwargs["hidden_states"]


def routing(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden_states [T, H], top_k_index [T, k]) of one experts call."""
    x = hidden_states(args, kwargs)
    index = args[1] if len(args) > 1 else kwargs["top_k_index"]
    return x.reshape(-1, x.shape[-1]), index.reshape(-1, index.shape[-1])


class RoutedHessians:
    """Per-expert Hessians of one expert input (stage), each from the tokens routed to that expert.

    broad: experts whose down input also needs its all-token Hessian (the starved ones, for the shrink).
    fp_gate_up (QEP): the experts' full-precision gate_up_proj; each expert then also accumulates QEP's
    cross term, pairing its routed tokens with the same tokens of the full-precision stream (the
    quantized model's routing decides which tokens an expert serves, in both streams).
    """

    def __init__(self, module: nn.Module, stage: str, broad: set[int] = frozenset(),
                 fp_gate_up: torch.Tensor | None = None):
        self.module, self.stage, self.fp_gate_up = module, stage, fp_gate_up
        E, _, H = module.gate_up_proj.shape
        columns = H if stage == "gate_up_proj" else module.down_proj.shape[2]
        device = module.gate_up_proj.device
        self.routed = [Hessian(columns, device, cross=fp_gate_up is not None) for _ in range(E)]
        self.everyone = {e: Hessian(columns, device) for e in broad}

    def _input(self, x: torch.Tensor, e: int, gate_up: torch.Tensor | None = None) -> torch.Tensor:
        if self.stage == "gate_up_proj":
            return x
        return self.module._apply_gate(F.linear(x, (self.module.gate_up_proj if gate_up is None else gate_up)[e]))

    def add(self, args: tuple, kwargs: dict, fp: torch.Tensor | None = None) -> None:
        """fp (QEP): the experts' input in the full-precision model, the same tokens as args'."""
        x, index = routing(args, kwargs)
        fp = None if fp is None else fp.reshape(x.shape)
        for e, acc in enumerate(self.routed):
            tokens = (index == e).any(dim=-1).nonzero().squeeze(1)  # top-k experts are distinct per token
            acc.add(self._input(x[tokens], e),
                    fp=None if fp is None else self._input(fp[tokens], e, self.fp_gate_up))
            if e in self.everyone:
                self.everyone[e].add(self._input(x, e))

    @property
    def tokens(self) -> list[int]:
        return [acc.tokens for acc in self.routed]


@dataclass
class ExpertSolve:
    """One expert's rows for one input: what to solve, against which H (None: round to nearest)."""

    expert: int
    parts: list[tuple[str, torch.Tensor]]  # (module name relative to the layer, weight rows, a view)
    H: torch.Tensor | None
    tokens: int
    fallback: str | None  # None, "rtn" (no token) or "shrink" (fewer tokens than in_features)
    cross: torch.Tensor | None = None  # QEP's δX̂ᵀ on H's scale; None for starved experts (see expert_solves)


def shrink(H_routed: torch.Tensor, n: int, H_all: torch.Tensor, n0: int, lam: float = LAMBDA) -> torch.Tensor:
    prior = lam * n0
    return (n * H_routed + prior * H_all) / (n + prior)


def starved(tokens: list[int], threshold: int) -> set[int]:
    return {e for e, n in enumerate(tokens) if 0 < n < threshold}


def expert_solves(module: nn.Module, names: ExpertNames, prefix: str, stage: str, acc: RoutedHessians,
                  H_all: torch.Tensor | None) -> list[ExpertSolve]:
    """The per-expert solves of one stage; H_all is the block input's all-token H (gate/up stage)."""
    weights = getattr(module, stage)
    threshold = weights.shape[2]
    out = []
    for e, routed in enumerate(acc.routed):
        n = routed.tokens
        rows = weights[e].chunk(len(names.projections(stage)))
        parts = [(names.expert(e, k)[len(prefix) + 1:], w) for k, w in zip(names.projections(stage), rows)]
        where = f"{names.stored}.{e} ({stage})"
        if n == 0:
            log.warning("%s: no calibration token routed to this expert: rounded to nearest", where)
            out.append(ExpertSolve(e, parts, None, 0, "rtn"))
        elif n < threshold:
            everyone = H_all if stage == "gate_up_proj" else acc.everyone[e].finalize()
            log.warning("%s: only %d calibration tokens (< %d inputs): H shrunk toward the all-token H",
                        where, n, threshold)
            out.append(ExpertSolve(e, parts, shrink(routed.finalize(), n, everyone, threshold), n, "shrink"))
        else:
            # QEP only here: fitting a starved expert's few tokens' propagated error would overfit them
            out.append(ExpertSolve(e, parts, routed.finalize(), n, None,
                                   routed.finalize_cross() if routed.cross is not None else None))
    return out
