"""How much faster than 4-bit a 2/3-bit layer can be at M = 1 when only its bytes shrink: from a grid of
benchmarks/kernels.py with VARIANTS=base,w3,w2 (one or more runs: each point's fastest is taken).

    python benchmarks/tuning/lowbit_m1_bounds.py 'benchmarks/results/kernels-lowbit-h100-2026-12-07.json#unit_layout_2_1' ...

Model: the 4-bit op's time is a fixed part plus its weight and scale bytes streamed at the fastest rate any kernel
of the grid reached at M = 1 (cuBLAS fp16 on the large shapes, usually); a 2/3-bit op with the same fixed part
streams fewer bytes.  The bound is 4-bit time / (4-bit time - the bytes saved at that rate): a ratio above it
would need a smaller fixed part than the 4-bit kernel's.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kernels import G, SHAPES  # noqa: E402
from targets import load  # noqa: E402

KERNELS = {16: "cublas_fp16", 4: "mygptq", 3: "mygptq_w3", 2: "mygptq_w2"}


def weight_bytes(k: int, n: int, bits: int) -> float:
    """Bytes a call at M = 1 must read: the codes and, for quantized weights, one fp16 scale per group and column."""
    return k * n * bits / 8 + (0 if bits == 16 else (k // G) * n * 2)


def main(paths: list[str]) -> None:
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
    for s in shapes:
        k, n = SHAPES[s]
        t4 = fastest(s, KERNELS[4])
        cells = []
        for b in (3, 2):
            bound = t4 / (t4 - (weight_bytes(k, n, 4) - weight_bytes(k, n, b)) / rate)
            cells.append(f"{t4 / fastest(s, KERNELS[b]):.2f} ({bound:.2f})")
        print(f"| {s} | {t4:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(sys.argv[1:])
