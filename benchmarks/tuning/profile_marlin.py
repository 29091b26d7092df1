"""Launch our Marlin-layout GEMM on a few shapes so that Nsight Compute can profile each launch.

    ncu --clock-control none -k regex:marlin_gemm_kernel --section SpeedOfLight --section WarpStateStats \
        --section SchedulerStats --section Occupancy --section LaunchStats \
        python benchmarks/tuning/profile_marlin.py 70b.gate_up:1 8b.qkv:1 8b.qkv:16

Arguments: SHAPE:M pairs (shapes of benchmarks/kernels.py); 4-bit symmetric g128 fp16, random weights.
Each pair is launched twice (a warm-up that ncu also records, then the one to read).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/
from kernels import G, SHAPES  # noqa: E402  (benchmarks/kernels.py, which also puts the repo root on sys.path)


def main(pairs: list[str]) -> None:
    from gptq_vllm.kernels import cuda as ours

    assert ours.available(), ours.load_error()
    dev = torch.device("cuda")
    for pair in pairs:
        name, m = pair.split(":")
        K, N = SHAPES[name]
        q = torch.randint(-2**31, 2**31 - 1, (K // 16, N * 2), dtype=torch.int32, device=dev)
        s = (torch.rand(K // G, N, device=dev) * 0.01 + 0.001).half()
        x = torch.randn(int(m), K, device=dev, dtype=torch.float16)
        for _ in range(2):
            ours.marlin_gemm(x, q, s, None, None, 4, G)
        torch.cuda.synchronize()
        print(pair, "launched", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
