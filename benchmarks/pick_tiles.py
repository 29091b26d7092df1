"""Pick the Marlin GEMM's block-tile rows and split per Llama-3 shape and batch bucket from one H200 sweep run.

    python benchmarks/pick_tiles.py

Reads the `SWEEP=1 ROWS=32` and `ROWS=64` runs of benchmarks/kernels.py in benchmarks/results/ (16 (strips per
block, cluster ranks) per shape and M, plus `auto`: at M = 32/64 the 16-row tiles with the tuned split, at
M = 128 dequantize + cuBLAS) and prints, for each shape and bucket, the fastest of the 16-row / dense choice and
every wide-tile configuration, as the `TUNED` rows of csrc/marlin_gemm.cu (rows 0 = dequantize + cuBLAS).
A wide tile replaces the 16-row / dense choice only when it is at least MARGIN faster (one run; run-to-run noise
is about 5 %).
"""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SWEEPS = {32: "kernels-h200-2026-11-22-issue7-run3-sweep-rows32.txt",
          64: "kernels-h200-2026-11-22-issue7-run3-sweep-rows64.txt"}
SHAPES = {"8b.qkv": (4096, 6144), "8b.o": (4096, 4096), "8b.gate_up": (4096, 28672), "8b.down": (14336, 4096),
          "70b.qkv": (8192, 10240), "70b.o": (8192, 8192), "70b.gate_up": (8192, 57344), "70b.down": (28672, 8192)}
MARGIN = 1.05
# The 16-row split table for buckets 32 / 64 as it stood before the wide tiles (csrc/marlin_gemm.cu, run 2).
R16 = {(4096, 6144, 32): (8, 4), (4096, 4096, 32): (2, 2), (4096, 28672, 32): (8, 2), (14336, 4096, 32): (2, 2),
       (8192, 10240, 32): (8, 8), (8192, 8192, 32): (4, 2), (8192, 57344, 32): (8, 1), (28672, 8192, 32): (4, 2),
       (4096, 6144, 64): (8, 4), (4096, 4096, 64): (4, 2), (4096, 28672, 64): (8, 1), (14336, 4096, 64): (4, 2),
       (8192, 10240, 64): (8, 4), (8192, 8192, 64): (4, 2), (8192, 57344, 64): (8, 2), (28672, 8192, 64): (4, 2)}


def main() -> None:
    auto: dict[tuple[str, int], list[float]] = {}
    wide: dict[tuple[str, int], dict[tuple[int, int, int], float]] = {}
    for rows, name in SWEEPS.items():
        for line in (RESULTS / name).read_text().splitlines():
            m = re.match(r"(\S+)\s+M=(\d+)\s.*?auto=([\d.]+)", line)
            if not m:
                continue
            key = (m.group(1), int(m.group(2)))
            auto.setdefault(key, []).append(float(m.group(3)))
            for sb, cs, t in re.findall(r"(\d):(\d)=([\d.]+)", line):
                wide.setdefault(key, {})[(rows, int(sb), int(cs))] = float(t)
    print("    // shape, bucket: 16-row/dense us (both runs), best wide config us")
    for (name, M), cands in sorted(wide.items(), key=lambda kv: (list(SHAPES).index(kv[0][0]), kv[0][1])):
        if M > 128:
            continue
        K, N = SHAPES[name]
        base = min(auto[(name, M)])
        (rows, sb, cs), t = min(cands.items(), key=lambda kv: kv[1])
        if t * MARGIN > base:
            rows, (sb, cs) = (0, (0, 0)) if M == 128 else (16, R16[(K, N, M)])
        print(f"    {{{K}, {N}, {M}, {rows}, {sb}, {cs}}},  // {name} M={M}: 16-row/dense "
              f"{'/'.join(f'{a:.1f}' for a in auto[(name, M)])}, wide best {t:.1f}")


if __name__ == "__main__":
    main()
