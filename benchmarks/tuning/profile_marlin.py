"""Launch our Marlin-layout GEMM (and, with --vllm, vLLM's marlin_gemm) on a few shapes for Nsight Compute.

    ncu --clock-control none -k regex:"marlin_gemm_kernel|Marlin" --section SpeedOfLight --section WarpStateStats \
        --section SchedulerStats --section Occupancy --section LaunchStats \
        python benchmarks/tuning/profile_marlin.py --vllm 8b.o:16 8b.o:32

Arguments: SHAPE:M pairs (shapes of benchmarks/kernels.py); 4-bit symmetric g128 fp16, random weights.  A pair
may force our kernel's split as SHAPE:M:STRIPS:RANKS, and its block-tile rows (8/16/32/64) as
SHAPE:M:STRIPS:RANKS:ROWS (`cuda.marlin_set_config`, as the split sweep does with ROWS=...).
Each launch runs twice (a warm-up that ncu also records, then the one to read).  --vllm launches vLLM's
`marlin_gemm` on GPTQ words of the same shape right after ours (vLLM importable: `source
/tmp/vllm-site/activate.sh` on the device), with the arguments `benchmarks/kernels.py` times it with.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/
from kernels import G, SHAPES, load_vllm, vllm_marlin  # noqa: E402  (also puts the repo root on sys.path)


def vllm_marlin_random(V: dict, K: int, N: int, dev: torch.device):
    """vLLM's marlin_gemm as the grid calls it (kernels.vllm_marlin) on random 4-bit g128 GPTQ words of shape K x N;
    V from kernels.load_vllm()."""
    gq = torch.randint(-2**31, 2**31 - 1, (K // 8, N), dtype=torch.int32, device=dev)
    s = (torch.rand(K // G, N, device=dev) * 0.01 + 0.001).half()
    return vllm_marlin(V, gq, s, K, N, V["ws"](dev))


def main(pairs: list[str], with_vllm: bool) -> None:
    from gptq_vllm.kernels import cuda as ours

    assert ours.available(), ours.load_error()
    V = load_vllm() if with_vllm else None  # None, with the reason printed, where vLLM is not importable
    dev = torch.device("cuda")
    for pair in pairs:
        name, m, *split = pair.split(":")
        K, N = SHAPES[name]
        q = torch.randint(-2**31, 2**31 - 1, (K // 16, N * 2), dtype=torch.int32, device=dev)
        s = (torch.rand(K // G, N, device=dev) * 0.01 + 0.001).half()
        x = torch.randn(int(m), K, device=dev, dtype=torch.float16)
        if split:
            sb, cs, *rows = map(int, split)
            # forced rows: never dense, as the sweep forces them
            ours.marlin_set_config(sb=sb, cs=cs, dense_min_m=100000 if rows else 0, tile_rows=rows[0] if rows else 0)
        for _ in range(2):
            ours.marlin_gemm(x, q, s, None, None, 4, G)
        ours.marlin_set_config()
        theirs = vllm_marlin_random(V, K, N, dev) if V else None
        if theirs is not None:
            for _ in range(2):
                theirs(x)
        torch.cuda.synchronize()
        print(pair, "launched", "(ours, vLLM)" if theirs is not None else "(ours)", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pairs", nargs="+", metavar="PAIR",
                    help="SHAPE:M[:STRIPS:RANKS[:ROWS]], as above; one launch pair each")
    ap.add_argument("--vllm", action="store_true", help="also launch vLLM's marlin_gemm on each shape, after ours")
    args = ap.parse_intermixed_args()  # --vllm anywhere among the pairs
    main(args.pairs, args.vllm)
