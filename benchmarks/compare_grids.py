"""Kernel grids of benchmarks/kernels.py side by side: two builds, two GPUs or two runs of the same code.

    python benchmarks/compare_grids.py FIRST.json SECOND.json [MORE.json ...] [--kernels mygptq,mygptq_marlin]

A grid is a file's `rows`, or another run in the same file as `FILE.json#KEY` (`#second_run`, `#before`).

For every (shape, M, kernel) that all grids time: each grid's time and, for every grid after the first, its time
over the first's (below 1: faster).  Then per kernel and M the geometric mean of those ratios over the shapes.
Reference kernels (cublas_fp16, vllm_*) are the same code in every build: their ratios show what the grids differ
by without any change (machine, clocks, run to run), the yardstick for ours.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from targets import load  # noqa: E402  (one reader of a grid: (shape, M, kernel) -> us)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("grids", nargs="+", help="kernel grid JSON files (benchmarks/kernels.py OUT_JSON); the first is "
                                             "the one the others are compared with")
    ap.add_argument("--kernels", help="comma list of kernels to show (default: every kernel all grids time)")
    args = ap.parse_args(argv)
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


if __name__ == "__main__":
    main()
