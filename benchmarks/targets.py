"""The issue-7 target table (docs/kernels.md) from one kernel grid of benchmarks/kernels.py.

    python benchmarks/targets.py benchmarks/results/kernels-h200-2026-11-22-issue7-run7-vllm026.json

Prints the grid as a markdown table, then per shape: M = 1 / 16 over cuBLAS fp16, M = 32 / 64 / 128 over the
faster of vLLM's marlin_gemm and machete_mm, M = 256 / 1024 over cuBLAS fp16, the act-order overhead at
M = 1 / 16 / 64 / 1024 and 8-bit M = 1 over cuBLAS fp16, each next to its target.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import table  # noqa: E402

TARGET_SMALL_M = {"8b": 2.5, "70b": 3.3}


def main(path: str) -> None:
    rows = json.loads(Path(path).read_text())["rows"]
    table(rows)
    us = {(r["shape"], r["M"], r["kernel"]): r["us"] for r in rows}
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    print("\n| shape | M=1 x (target) | M=16 x (target) | M=32 / 64 / 128 vs best vLLM (target 1.15) "
          "| M=256 / 1024 x (target 0.95) | act-order M=1 / 16 / 64 / 1024 (target ≤ 5 %) | 8-bit M=1 x (target 1.8) |")
    print("|---|---|---|---|---|---|---|")
    for s in shapes:
        def vs_cublas(M, k="mygptq_marlin"):
            return us[(s, M, "cublas_fp16")] / us[(s, M, k)]

        def vs_vllm(M):
            return min(us[(s, M, "vllm_marlin")], us[(s, M, "vllm_machete")]) / us[(s, M, "mygptq_marlin")]

        def act(M):
            return 100 * (us[(s, M, "mygptq_marlin_actorder")] / us[(s, M, "mygptq_marlin")] - 1)

        t = TARGET_SMALL_M[s.split(".")[0]]
        print(f"| {s} | {vs_cublas(1):.2f} ({t}) | {vs_cublas(16):.2f} ({t}) | "
              f"{vs_vllm(32):.2f} / {vs_vllm(64):.2f} / {vs_vllm(128):.2f} | {vs_cublas(256):.2f} / {vs_cublas(1024):.2f} | "
              f"{' / '.join(f'{act(M):+.0f}%' for M in (1, 16, 64, 1024))} | {vs_cublas(1, 'mygptq_marlin_w8'):.2f} |")


if __name__ == "__main__":
    main(sys.argv[1])
