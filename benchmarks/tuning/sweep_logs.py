"""Reading the split sweeps (`SWEEP=1 ... python benchmarks/kernels.py`) committed in benchmarks/results/."""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "results"


def parse_sweep(name: str) -> dict[tuple[str, int], tuple[float, dict[tuple[int, int], float]]]:
    """(shape, M) -> (the `auto` choice's us, {(strips per block, cluster ranks): us}) of one sweep log."""
    out = {}
    for line in (RESULTS / name).read_text().splitlines():
        m = re.match(r"(\S+)\s+M=(\d+)\s.*?auto=([\d.]+)", line)
        if m:
            cfgs = {(int(sb), int(cs)): float(t) for sb, cs, t in re.findall(r"(\d):(\d)=([\d.]+)", line)}
            out[(m.group(1), int(m.group(2)))] = (float(m.group(3)), cfgs)
    return out
