"""Time our Marlin kernels (the raw `marlin_gemm` op, its automatic split) at a few points, with an output checksum.

    PYTHONPATH=. [SHAPES=8b.o,70b.o] [MS=16,32] python benchmarks/tuning/marlin_ab.py LABEL

Run it once per library build, alternating, to A/B two builds of csrc/marlin: one line per run, `shape@M us md5`
per point (4-bit symmetric g128 fp16, the same random weights and activations in every run, so equal checksums mean
bit-identical outputs).  Timed as benchmarks/kernels.py times the grid (CUDA graphs, L2 defeated by rotating weight
copies), without its reference kernels, so a run takes seconds (docs/kernel-tuning.md).
"""

from __future__ import annotations

import hashlib
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/
from kernels import G, L2_DEFEAT, SHAPES, timed  # noqa: E402  (benchmarks/kernels.py, which also puts the repo root on sys.path)


def main(label: str) -> None:
    from gptq_vllm.kernels import cuda as ours

    assert ours.available(), ours.load_error()
    dev = torch.device("cuda")
    points = []
    for name in os.environ.get("SHAPES", "8b.o,70b.o,8b.qkv,70b.qkv").split(","):
        K, N = SHAPES[name]
        copies = max(1, min(64, math.ceil(L2_DEFEAT / (K * N // 2))))
        g = torch.Generator(device=dev).manual_seed(0)
        qs = [torch.randint(-2**31, 2**31 - 1, (K // 16, N * 2), dtype=torch.int32, device=dev, generator=g)
              for _ in range(copies)]
        ss = [(torch.rand(K // G, N, device=dev, generator=g) * 0.01 + 0.001).half() for _ in range(copies)]
        for M in (int(m) for m in os.environ.get("MS", "16,32").split(",")):
            x = torch.randn(M, K, device=dev, generator=g).half()
            y = ours.marlin_gemm(x, qs[0], ss[0], None, None, 4, G)
            digest = hashlib.md5(y.cpu().numpy().tobytes()).hexdigest()[:8]
            us = timed([lambda q=q, s=s: ours.marlin_gemm(x, q, s, None, None, 4, G) for q, s in zip(qs, ss)])
            points.append(f"{name}@{M} {us:.2f} {digest}")
    print(label, " | ".join(points), flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "run")
