"""How much faster than 4-bit a 2/3-bit layer can be at M = 1 when only its bytes shrink: from a grid of
benchmarks/kernels.py with VARIANTS=base,w3,w2 (one or more runs: each point's fastest is taken).

    python benchmarks/tuning/lowbit_m1_bounds.py GRID [GRID...] [--e2e E2E]
    e.g. F=benchmarks/results/kernels-lowbit-h100-2026-12-07.json, E=benchmarks/results/e2e-throughput-h100-2026-12-07.json:
    python benchmarks/tuning/lowbit_m1_bounds.py "$F#rows_third" "$F#rows_fourth" --e2e "$E#1"

Model: the 4-bit op's time is a fixed part plus its weight and scale bytes streamed at the fastest rate any kernel
of the grid reached at M = 1 (cuBLAS fp16 on the large shapes, usually); a 2/3-bit op with the same fixed part
streams fewer bytes.  The bound is 4-bit time / (4-bit time - the bytes saved at that rate): a ratio above it
would need a smaller fixed part than the 4-bit kernel's.

--e2e carries that to the 8B model's decode at batch 1 (the e2e-3bit run of benchmarks/e2e_throughput.py): the
share of the 4-bit step spent in the layers' four GEMMs is what the measured end-to-end ratio and the grid's ratio
over those GEMMs (summed 4-bit time / summed 3-bit time) imply when the GEMMs are all that changed; with the same
share, the GEMMs at their bounds give the end-to-end bound.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kernels import G, SHAPES  # noqa: E402
from targets import load  # noqa: E402

KERNELS = {16: "cublas_fp16", 4: "mygptq", 3: "mygptq_w3", 2: "mygptq_w2"}
MODEL_8B = ("8b.qkv", "8b.o", "8b.gate_up", "8b.down")  # the GEMMs of one layer of e2e_throughput.py's model


def weight_bytes(k: int, n: int, bits: int) -> float:
    """Bytes a call at M = 1 must read: the codes and, for quantized weights, one fp16 scale per group and column."""
    return k * n * bits / 8 + (0 if bits == 16 else (k // G) * n * 2)


def e2e_b1_ratio(path: str) -> float:
    """The 3-bit / 4-bit decode ratio at batch 1 of an e2e-3bit result: FILE (its own report) or FILE#I (runs[I]
    of a results file)."""
    file, _, index = path.partition("#")
    report = json.loads(Path(file).read_text())
    run = report["runs"][int(index)] if index else report
    return run["mygptq-3bit_over_mygptq"]["decode-b1"]


def main(paths: list[str], e2e: str | None) -> None:
    grids = [load(p) for p in paths]

    def fastest(shape: str, kernel: str) -> float | None:
        times = [g[(shape, 1, kernel)] for g in grids if (shape, 1, kernel) in g]
        return min(times) if times else None

    shapes = [s for s in SHAPES if all(fastest(s, k) for k in KERNELS.values())]
    if not shapes:
        raise SystemExit("no shape has M = 1 rows of " + ", ".join(KERNELS.values()))
    rate = max(weight_bytes(*SHAPES[s], b) / fastest(s, k) for s in shapes for b, k in KERNELS.items())  # bytes/us
    print(f"fastest stream at M = 1: {rate / 1e6:.2f} TB/s\n")
    print("| shape | 4-bit us | 3-bit: 4-bit time / 3-bit time (bound) | 2-bit (bound) |")
    print("|---|---|---|---|")
    bound_us = {}  # (shape, bits) -> the time at the bound
    for s in shapes:
        k, n = SHAPES[s]
        t4 = fastest(s, KERNELS[4])
        cells = []
        for b in (3, 2):
            bound_us[s, b] = t4 - (weight_bytes(k, n, 4) - weight_bytes(k, n, b)) / rate
            cells.append(f"{t4 / fastest(s, KERNELS[b]):.2f} ({t4 / bound_us[s, b]:.2f})")
        print(f"| {s} | {t4:.1f} | " + " | ".join(cells) + " |")
    if e2e is None:
        return
    if not all(s in shapes for s in MODEL_8B):
        raise SystemExit("--e2e needs M = 1 rows of " + ", ".join(MODEL_8B))
    t4 = sum(fastest(s, KERNELS[4]) for s in MODEL_8B)
    gemms = t4 / sum(fastest(s, KERNELS[3]) for s in MODEL_8B)
    gemms_bound = t4 / sum(bound_us[s, 3] for s in MODEL_8B)
    measured = e2e_b1_ratio(e2e)
    if gemms <= 1:  # the GEMMs explain no gain: their share of the step cannot be inferred
        raise SystemExit(f"the four 8B GEMMs are not faster at 3 bits in these grids ({gemms:.3f}x): no batch-1 share")
    share = (1 - 1 / measured) / (1 - 1 / gemms)
    print(f"\n3-bit at batch 1: the four 8B GEMMs {gemms:.3f}x (bound {gemms_bound:.3f}x), end to end {measured:.3f}x, "
          f"so {share:.0%} of the 4-bit step in those GEMMs; with them at their bounds: "
          f"{1 / (1 - share + share / gemms_bound):.3f}x end to end")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grids", nargs="+", help="kernel grid JSON files (FILE or FILE#RUN, RUN+RUN as in targets.py)")
    parser.add_argument("--e2e", help="an e2e-3bit result (FILE or FILE#I for runs[I]): also bound batch-1 decode")
    args = parser.parse_args()
    main(args.grids, args.e2e)
