"""Kernel grids of benchmarks/kernels.py side by side: two builds, two GPUs or two runs of the same code.

    python benchmarks/compare_grids.py FIRST.json SECOND.json [MORE.json ...] [--kernels mygptq,mygptq_marlin]
    python benchmarks/compare_grids.py GRID.json --within mygptq [--kernels mygptq_w3,mygptq_w2]

A grid is a file's `rows`, or another run in the same file as `FILE.json#KEY` (`#second_run`, `#before`); runs joined
by `+` (`FILE.json#a+FILE.json#b`) are one grid of each point's fastest run.

For every (shape, M, kernel) that all grids time: each grid's time and, for every grid after the first, its time
over the first's (below 1: faster).  Then per kernel and M the geometric mean of those ratios over the shapes.
Reference kernels (cublas_fp16, vllm_*) are the same code in every build: their ratios show what the grids differ
by without any change (machine, clocks, run to run), the yardstick for ours.

With --within KERNEL, one grid: for every (shape, M) and other kernel, KERNEL's time over that kernel's (above 1:
the other kernel is faster), then the geometric means per kernel and M (e.g. the 4-bit op against the 2/3-bit ones).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from targets import load  # noqa: E402  (one reader of a grid: (shape, M, kernel) -> us)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("grids", nargs="+", help="kernel grid JSON files (benchmarks/kernels.py OUT_JSON); the first is "
                                             "the one the others are compared with")
    ap.add_argument("--kernels", help="comma list of kernels to show (default: every kernel all grids time)")
    ap.add_argument("--within", metavar="KERNEL", help="compare the kernels of one grid with this one instead")
    args = ap.parse_args(argv)
    if args.within:
        if len(args.grids) != 1:
            ap.error("--within takes one grid")
        return within(load(args.grids[0]), args.within, args.kernels.split(",") if args.kernels else None)
    if len(args.grids) < 2:
        ap.error("give at least two grids")
    grids = [load(g) for g in args.grids]
    keys = [k for k in grids[0] if all(k in g for g in grids[1:])]
    if args.kernels:
        wanted = args.kernels.split(",")
        keys = [k for k in keys if k[2] in wanted]
    names = [Path(file).stem + sep + run for file, sep, run in (g.partition("#") for g in args.grids)]
    print("| shape | M | kernel | " + " | ".join(f"{n} us" for n in names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    ratios: dict[tuple[str, int], list[list[float]]] = {}
    for shape, M, kernel in keys:
        times = [g[(shape, M, kernel)] for g in grids]
        cells = [f"{times[0]:.1f}"] + [f"{t:.1f} ({t / times[0]:.2f})" for t in times[1:]]
        print(f"| {shape} | {M} | {kernel} | " + " | ".join(cells) + " |")
        ratios.setdefault((kernel, M), []).append([t / times[0] for t in times[1:]])
    print("\n| kernel | M | shapes | " + " | ".join(f"{n} / {names[0]} (geomean)" for n in names[1:]) + " |")
    print("|---|---|---|" + "---|" * (len(names) - 1))
    for (kernel, M), per_shape in ratios.items():
        means = [math.exp(sum(math.log(r[i]) for r in per_shape) / len(per_shape)) for i in range(len(names) - 1)]
        print(f"| {kernel} | {M} | {len(per_shape)} | " + " | ".join(f"{m:.3f}" for m in means) + " |")


def within(grid: dict[tuple[str, int, str], float], base: str, wanted: list[str] | None) -> None:
    """BASE's time over each other kernel's, per (shape, M), then geometric means per kernel and M."""
    kernels = [k for k in dict.fromkeys(k for _, _, k in grid) if k != base and (wanted is None or k in wanted)]
    points = list(dict.fromkeys((s, m) for s, m, k in grid if k == base))
    if not kernels or not points:
        raise SystemExit(f"the grid has no {base!r} rows beside {wanted or 'other kernels'}")
    print("| shape | M | " + " | ".join(f"{base} / {k}" for k in kernels) + " |")
    print("|---|---|" + "---|" * len(kernels))
    ratios: dict[tuple[str, int], list[float]] = {}
    for s, m in points:
        cells = []
        for k in kernels:
            if (s, m, k) in grid:
                ratios.setdefault((k, m), []).append(grid[(s, m, base)] / grid[(s, m, k)])
                cells.append(f"{ratios[(k, m)][-1]:.2f}")
            else:
                cells.append("-")
        print(f"| {s} | {m} | " + " | ".join(cells) + " |")
    print(f"\n| kernel | M | shapes | {base} / kernel (geomean) |")
    print("|---|---|---|---|")
    for (k, m), r in sorted(ratios.items(), key=lambda x: (kernels.index(x[0][0]), x[0][1])):
        print(f"| {k} | {m} | {len(r)} | {statistics.geometric_mean(r):.3f} |")


if __name__ == "__main__":
    main()
