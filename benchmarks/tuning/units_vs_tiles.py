"""The Hopper GEMM on the 2/3-bit units against the same config on the 4-bit tiles, from two sweeps
(`SWEEP=hopper` rows of benchmarks/kernels.py: a `BITS=4` one and a `BITS=2` / `BITS=3` one).

    python benchmarks/tuning/units_vs_tiles.py FOUR_BIT_SWEEP.json LOW_BIT_SWEEP.json

A sweep is a file's `rows`, or another run in the same file as `FILE.json#KEY`.

Per width, M and config: the geometric mean over the shapes both sweeps time of (the units' time / the 4-bit
tiles' time), each the config's fastest decomposition; and beside it cuBLAS fp16 of the second sweep over the first's at the
same width and M, which is what the two runs differ by without any change in our code (other machine, clocks): 1.00
when both sweeps ran in one call.  Above that yardstick the units lose to CUTLASS's 4-bit mainloop in the same tile.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict


def fastest(rows: list[dict]) -> dict[tuple[int, str, int, str], float]:
    """(bits, shape, M, config) -> the config's fastest decomposition in µs; config "cublas_fp16" for cuBLAS."""
    best: dict[tuple[int, str, int, str], float] = {}
    for r in rows:
        if "/" not in r["kernel"] and r["kernel"] != "cublas_fp16":
            continue
        key = (r.get("bits", 4), r["shape"], r["M"], r["kernel"].split("/")[0])
        best[key] = min(best.get(key, math.inf), r["us"])
    return best


def sweep_rows(arg: str) -> list[dict]:
    path, _, key = arg.partition("#")
    with open(path) as f:
        runs = json.load(f)
    key = key or "rows"
    if key not in runs:
        raise SystemExit(f"{path}: no run {key!r} (it has {', '.join(k for k in runs if k != 'meta')})")
    return runs[key]


def main(four_path: str, low_path: str) -> None:
    four = {k[1:]: v for k, v in fastest(sweep_rows(four_path)).items() if k[0] == 4}
    low = fastest(sweep_rows(low_path))
    ratios: dict[tuple[int, int, str], list[float]] = defaultdict(list)
    for (bits, shape, m, config), us in low.items():
        if (shape, m, config) in four:
            ratios[(bits, m, config)].append(us / four[(shape, m, config)])
    if not ratios:
        raise SystemExit("the two sweeps time no (shape, M) point in common")
    # A sweep file may hold several runs (a width's rows at some M from one machine, others from another): the
    # yardstick is per width and M.
    print("| bits | M | config | shapes | units / 4-bit tiles (geomean) | cuBLAS, second / first (yardstick) |")
    print("|---|---|---|---|---|---|")
    for (bits, m, config), xs in sorted(ratios.items()):
        if config != "cublas_fp16":
            print(f"| {bits} | {m} | {config} | {len(xs)} | {statistics.geometric_mean(xs):.3f} | {statistics.geometric_mean(ratios[(bits, m, 'cublas_fp16')]):.3f} |")

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("four", metavar="FOUR_BIT_SWEEP", help="the BITS=4 sweep: FILE.json or FILE.json#KEY")
    ap.add_argument("low", metavar="LOW_BIT_SWEEP", help="the BITS=2 / BITS=3 sweep: FILE.json or FILE.json#KEY")
    args = ap.parse_args()
    main(args.four, args.low)
