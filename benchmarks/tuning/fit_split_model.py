"""Refit the Marlin GEMM's fallback split model (csrc/marlin/marlin_gemm.cu) from the committed H200 sweeps.

    python benchmarks/tuning/fit_split_model.py

Reads the split sweeps in benchmarks/results/ (`SWEEP=1 MS=1,16` and `SWEEP=1 ROWS=16 MS=32,64` runs of
benchmarks/kernels.py: 16 (strips per block, cluster ranks) per shape and M), fits log(time) by least squares on
the features the kernel's host code uses, and prints the coefficients and how much slower than the measured best
the model's picks are (mean = geometric mean over shape x M, and worst), next to the previous rule ('auto' in the
M = 1/16 sweep).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/, for kernels.py
from kernels import SHAPES  # noqa: E402
from sweep_logs import parse_sweep  # noqa: E402

SWEEP = "kernels-h200-2026-11-22-issue7-run2-split-sweep.txt"
SMS, WARPS, RUN_ROWS = 132, 8, 128


def features(name: str, M: int, sb: int, parts: int) -> list[float]:
    """Those of the fallback in marlin_gemm(): work on the busiest SM in strip-runs, split parts, k-phases,
    more than one block per SM, blocks per SM, a grid shorter than half the SMs."""
    K, N = SHAPES[name]
    runs = math.ceil(K / RUN_ROWS)
    mblocks = math.ceil(M / (8 if M <= 8 else 16))
    blocks = N // 64 // sb * parts * mblocks
    per_sm = math.ceil(blocks / SMS)
    work = per_sm * sb * math.ceil(runs / parts)
    return [1.0, math.log(work), math.log2(parts), math.log2(WARPS // sb), float(per_sm > 1), math.log(per_sm),
            float(2 * blocks < SMS)]


def main() -> None:
    rows, auto = [], {}
    for (name, M), (t_auto, cfgs) in parse_sweep(SWEEP).items():
        if M >= 100:
            continue
        auto[(name, M)] = t_auto
        rows += [(name, M, sb, cs, t) for (sb, cs), t in cfgs.items()]
    X = np.array([features(n, M, sb, cs) for n, M, sb, cs, _ in rows])
    y = np.log([t for *_, t in rows])
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    print(f"{len(rows)} timings; coefficients (const, log work, log2 parts, log2 k-phases, per_sm > 1, log per_sm, "
          f"short grid): {np.round(coef, 3).tolist()}")
    model, old = [], []
    for name, M in sorted({(n, M) for n, M, *_ in rows}):
        cand = {(sb, cs): t for n, m, sb, cs, t in rows if (n, m) == (name, M)}
        best = min(cand.values())
        pick = min(cand, key=lambda c: float(np.dot(features(name, M, *c), coef)))
        model.append(cand[pick] / best)
        if M <= 16:  # the M = 32/64 sweep's 'auto' was the since removed m16-tile kernel, not a split rule
            old.append(auto[(name, M)] / best)
        print(f"  {name:12s} M={M:<3d} best {best:6.1f} us, model picks {pick[0]}:{pick[1]} = {cand[pick]:6.1f} us")
    gmean = lambda r: math.exp(sum(map(math.log, r)) / len(r))  # noqa: E731
    print(f"model: {gmean(model):.2f}x the best on average, {max(model):.2f}x worst ({len(model)} points)")
    print(f"previous rule (M = 1/16): {gmean(old):.2f}x on average, {max(old):.2f}x worst ({len(old)} points)")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
