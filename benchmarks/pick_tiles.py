"""Pick the Marlin GEMM's block-tile rows, wgmma loop and split per Llama-3 shape and batch bucket from H200 sweeps.

    python benchmarks/pick_tiles.py

Step 1 (run 3): the `SWEEP=1 ROWS=32` and `ROWS=64` runs of benchmarks/kernels.py in benchmarks/results/
(16 (strips per block, cluster ranks) per shape and M, plus `auto`: at M = 32/64 the 16-row tiles with the tuned
split, at M = 128 dequantize + cuBLAS): a wide tile replaces the 16-row / dense choice when it is at least MARGIN
faster (one run; run-to-run noise is about 5 %).
Step 2 (run 5, built with the step-1 table): the `SWEEP=1 ROWS=64 WGMMA=1` run, where the configurations with
4 or 8 strips per block use the wgmma loop; one of those replaces the step-1 choice (that run's `auto`) when it
is at least MARGIN faster.
Prints the `TUNED` rows of csrc/marlin/marlin_gemm.cu (rows 0 = dequantize + cuBLAS; wg 1 = wgmma loop).
"""

from __future__ import annotations

import argparse

from kernels import SHAPES
from tuning.sweep_logs import parse_sweep

SWEEPS = {32: "kernels-h200-2026-11-22-issue7-run3-sweep-rows32.txt",
          64: "kernels-h200-2026-11-22-issue7-run3-sweep-rows64.txt"}
WGMMA_SWEEP = "kernels-h200-2026-11-22-issue7-run5-sweep-rows64-wgmma.txt"
# The 16-row split of buckets 32 / 64 (the table before the wide tiles): the fastest of the run-2 sweep.
R16_SWEEP = "kernels-h200-2026-11-22-issue7-run2-split-sweep.txt"
MARGIN = 1.05


def main() -> None:
    r16 = {key: min(cfgs, key=cfgs.get) for key, (_, cfgs) in parse_sweep(R16_SWEEP).items()}
    runs = {rows: parse_sweep(name) for rows, name in SWEEPS.items()}
    wg_run = parse_sweep(WGMMA_SWEEP)
    print("    // shape M: step 1 16-row/dense us (both runs), best wide us; step 2 auto us, best wgmma us")
    for name, M in sorted(runs[64], key=lambda k: (list(SHAPES).index(k[0]), k[1])):
        if M > 128:
            continue
        K, N = SHAPES[name]
        base = min(runs[rows][(name, M)][0] for rows in runs)
        (t, rows, (sb, cs)) = min((t, rows, c) for rows in runs for c, t in runs[rows][(name, M)][1].items())
        if t * MARGIN > base:
            rows, (sb, cs) = (0, (0, 0)) if M == 128 else (16, r16[(name, M)])
        auto2, cfgs2 = wg_run[(name, M)]
        (t2, (sb2, cs2)) = min((t, c) for c, t in cfgs2.items() if c[0] >= 4)
        wg = 0
        if t2 * MARGIN <= auto2:
            rows, sb, cs, wg = 64, sb2, cs2, 1
        print(f"    {{{K}, {N}, {M}, {rows}, {sb}, {cs}, {wg}}},  // {name} M={M}: "
              f"{'/'.join(f'{runs[r][(name, M)][0]:.1f}' for r in runs)}, {t:.1f}; {auto2:.1f}, {t2:.1f}")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
