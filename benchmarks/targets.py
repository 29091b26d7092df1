"""The large-batch kernel targets (issue 17, docs/kernels.md) from one kernel grid of benchmarks/kernels.py.

    python benchmarks/targets.py GRID.json [BASELINE.json]

Prints the grid as a markdown table, then per shape: M = 32 / 64 / 128 over the faster of vLLM's marlin_gemm
and machete_mm (target 1.0, stretch 1.15), M = 256 / 1024 over cuBLAS fp16 (target 0.9, stretch 0.95), the
act-order overhead at M = 32 / 64 / 256 / 1024 (target <= 5 %), bf16 and 8-bit over cuBLAS fp16 at M = 64 / 1024
(reported), and with BASELINE (the grid at the issue's start) M = 1 / 16 against it (target: at most 3 % slower).
`mygptq` is what the plugin's op runs; a baseline from before it existed names that `mygptq_marlin`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import table  # noqa: E402


def read_rows(path: str) -> list[dict]:
    """A grid file's `rows`, or another run in the same file with `FILE.json#KEY` (e.g. `#second_run`, `#before`)."""
    file, _, run = path.partition("#")
    runs = json.loads(Path(file).read_text())
    key = run or "rows"
    if key not in runs:
        raise KeyError(f"{file}: no run {key!r} (it has {', '.join(k for k in runs if k != 'meta')})")
    return runs[key]


def load(path: str) -> dict[tuple[str, int, str], float]:
    """(shape, M, kernel) -> us of the grid `path` names (see read_rows); `RUN+RUN+...` (e.g. two runs of one build
    in an A/B that alternated builds) is each point's fastest over the runs, where every run times it."""
    runs = [{(r["shape"], r["M"], r["kernel"]): r["us"] for r in read_rows(p)} for p in path.split("+")]
    return {k: min(run[k] for run in runs) for k in runs[0] if all(k in run for run in runs[1:])}


def main(path: str, baseline: str | None = None) -> None:
    rows = read_rows(path)
    table(rows)
    us = load(path)
    base = load(baseline) if baseline else None
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    print("\n| shape | M=32 / 64 / 128 vs best vLLM (target 1.0) | M=256 / 1024 vs cuBLAS (target 0.9) "
          "| act-order M=32 / 64 / 256 / 1024 (target ≤ 5 %) | bf16 M=64 / 1024 vs cuBLAS | 8-bit M=64 / 1024 vs cuBLAS "
          "| M=1 / 16 time vs baseline (target ≤ +3 %) |")
    print("|---|---|---|---|---|---|---|")
    for s in shapes:
        def t(M, k):  # our / a reference kernel's time, None where the grid does not time it
            return us.get((s, M, k))

        def ratio(num, den):
            return None if num is None or den is None else num / den

        def vs_cublas(M, k="mygptq"):
            return ratio(t(M, "cublas_fp16"), t(M, k))

        def vs_vllm(M):
            refs = [x for x in (t(M, "vllm_marlin"), t(M, "vllm_machete")) if x is not None]
            return ratio(min(refs) if refs else None, t(M, "mygptq"))

        def act(M):
            r = ratio(t(M, "mygptq_actorder"), t(M, "mygptq"))
            return None if r is None else 100 * (r - 1)

        def vs_base(M):
            old = base.get((s, M, "mygptq"), base.get((s, M, "mygptq_marlin")))
            r = ratio(t(M, "mygptq"), old)
            return None if r is None else 100 * (r - 1)

        def cell(values, fmt="{:.2f}"):  # a point the grid lacks (a partial grid, e.g. an A/B run) shows as "-"
            return " / ".join("-" if v is None else fmt.format(v) for v in values)

        cells = [cell([vs_vllm(M) for M in (32, 64, 128)]),
                 cell([vs_cublas(M) for M in (256, 1024)]),
                 cell([act(M) for M in (32, 64, 256, 1024)], "{:+.0f}%"),
                 cell([vs_cublas(M, "mygptq_bf16") for M in (64, 1024)]),
                 cell([vs_cublas(M, "mygptq_w8") for M in (64, 1024)]),
                 cell([vs_base(M) for M in (1, 16)], "{:+.1f}%") if base else "-"]
        print(f"| {s} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("grid", metavar="GRID",
                    help="a kernel grid JSON of benchmarks/kernels.py: its `rows`, or another run as FILE.json#KEY")
    ap.add_argument("baseline", nargs="?", metavar="BASELINE",
                    help="the grid at the issue's start (as GRID, or RUN+RUN: each point's fastest over the runs); "
                         "adds M = 1 / 16 against it")
    args = ap.parse_args()
    main(args.grid, args.baseline)
