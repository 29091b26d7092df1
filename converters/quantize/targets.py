"""Which tensors of a decoder-only checkpoint are quantized: every linear weight inside a decoder layer."""

from __future__ import annotations

import re

# model.layers.3.self_attn.q_proj.weight, model.decoder.layers.0.fc1.weight (OPT), transformer.h.0...
LAYER_RE = re.compile(r"^(?P<prefix>.*?\.(?:layers|h|blocks)\.(?P<index>\d+))\.(?P<module>.+)\.weight$")


def quantizable_module(name: str, shape: tuple[int, ...]) -> str | None:
    """The module name (without .weight) when `name` is a 2-D linear weight inside a decoder layer."""
    m = LAYER_RE.match(name)
    if m is None or len(shape) != 2:
        return None
    module = m.group("module")
    if "norm" in module.split(".")[-1] or "embed" in module:
        return None
    return name[: -len(".weight")]


def layer_index(name: str) -> int | None:
    m = LAYER_RE.match(name if name.endswith(".weight") else name + ".weight")
    return int(m.group("index")) if m else None
