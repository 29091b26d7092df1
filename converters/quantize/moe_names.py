"""Where the experts of a transformers-5 MoE block live in a checkpoint.

transformers 5 holds the experts of one sparse MoE block as two fused 3-D parameters of one module,
`experts.gate_up_proj` [E, 2I, H] (each expert's gate rows, then its up rows) and `experts.down_proj`
[E, H, I].  Its save_pretrained converts them back to the Hub layout (checked with transformers 5.19
for Mixtral, Qwen2-MoE and Qwen3-MoE), one 2-D weight per expert and projection:
    Mixtral      model.layers.L.block_sparse_moe.experts.E.{w1,w3,w2}.weight   (gate, up, down)
    Qwen2/3-MoE  model.layers.L.mlp.experts.E.{gate_proj,up_proj,down_proj}.weight
and the Mixtral router back to block_sparse_moe.gate.  A checkpoint written straight from a state dict
keeps the fused names.  Both are read.  Experts are always written per expert: under the source's own
per-expert names, which are what vLLM's GPTQ MoE loader expects; for a fused source, under the fused
module's prefix with the model family's leaf names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch

FUSED = ("gate_up_proj", "down_proj")
MIXTRAL_LEAVES = ("w1", "w3", "w2")
LEAVES = ("gate_proj", "up_proj", "down_proj")
FAMILY_LEAVES = {"mixtral": MIXTRAL_LEAVES, "minimax": MIXTRAL_LEAVES}
# transformers-5 module path -> the Hub checkpoint's (Mixtral's block_sparse_moe is `mlp` in transformers 5)
RENAMES = ((".mlp.", ".block_sparse_moe."),)
FUSED_NAME = re.compile(r"^(?P<module>.+\.experts)\.(?P<param>gate_up_proj|down_proj)$")


def stored_name(name: str, names: Collection[str]) -> str | None:
    """The checkpoint name of the transformers tensor `name` (itself, or its Hub spelling), None if absent."""
    if name in names:
        return name
    for old, new in RENAMES:
        renamed = name.replace(old, new, 1)
        if old in name and renamed in names:
            return renamed
    return None


@dataclass(frozen=True)
class ExpertNames:
    module: str  # the transformers module holding the fused parameters: model.layers.0.mlp.experts
    stored: str  # the checkpoint prefix of the per-expert modules: model.layers.0.block_sparse_moe.experts
    leaves: tuple[str, str, str]  # gate, up, down
    fused: bool  # the checkpoint holds module.gate_up_proj and module.down_proj

    def expert(self, e: int, k: int) -> str:
        """Full module name of projection k (0 gate, 1 up, 2 down) of expert e."""
        return f"{self.stored}.{e}.{self.leaves[k]}"

    @staticmethod
    def projections(param: str) -> tuple[int, ...]:
        """The per-expert projections whose rows make up one fused parameter, in row order."""
        return (0, 1) if param == "gate_up_proj" else (2,)

    def sources(self, param: str, num: int) -> list[str]:
        """The per-expert checkpoint weights one fused parameter is made of."""
        return [f"{self.expert(e, k)}.weight" for e in range(num) for k in self.projections(param)]

    def assemble(self, param: str, num: int, weight: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """The fused parameter [E, rows, cols] from weight(per-expert module name) -> 2-D float weight."""
        return torch.stack([torch.cat([weight(self.expert(e, k)) for k in self.projections(param)])
                            for e in range(num)])


def resolve(module: str, names: Collection[str], model_type: str) -> ExpertNames:
    """How the checkpoint with tensor `names` stores the experts of the transformers module `module`."""
    for prefix in dict.fromkeys([module] + [module.replace(old, new, 1) for old, new in RENAMES if old in module]):
        for leaves in (MIXTRAL_LEAVES, LEAVES):
            first = f"{prefix}.0.{leaves[0]}"
            if f"{first}.weight" in names or f"{first}.qweight" in names:
                return ExpertNames(module, prefix, leaves, fused=False)
    if all(f"{module}.{p}" in names for p in FUSED):
        return ExpertNames(module, module, FAMILY_LEAVES.get(model_type, LEAVES), fused=True)
    raise KeyError(f"the checkpoint holds the experts of {module} neither per expert (…experts.0.w1 or "
                   f"…experts.0.gate_proj) nor fused ({module}.gate_up_proj)")


def split_fused(tensors: dict[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    """tensors with every fused expert parameter replaced by its per-expert 2-D weights (written names)."""
    out = {}
    for name, t in tensors.items():
        m = FUSED_NAME.match(name)
        if m is None or t.dim() != 3:
            out[name] = t
            continue
        names = ExpertNames(m["module"], m["module"], FAMILY_LEAVES.get(model_type, LEAVES), fused=True)
        ks = names.projections(m["param"])
        for e in range(t.shape[0]):
            for k, rows in zip(ks, t[e].chunk(len(ks))):
                out[f"{names.expert(e, k)}.weight"] = rows.contiguous()
    return out
