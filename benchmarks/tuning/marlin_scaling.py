"""Our Marlin kernels' time at M = 16 (or the M given) as K grows, beside vLLM's Marlin: fixed cost against steady state.

    python benchmarks/tuning/marlin_scaling.py [N=4096] [M=16]      (vLLM importable for its column)
    ROWS=32 python benchmarks/tuning/marlin_scaling.py 4096 32      (the forced splits with that block-tile rows)

For K = 1024 … 16384 (N fixed): ours with a few forced splits (strips per block : cluster ranks, as the split sweep
forces them; `auto` = the op's own choice) and vLLM's `marlin_gemm`, timed as benchmarks/kernels.py times the grid
(CUDA graphs, L2 defeated by rotating weight copies).  Then per kernel a least-squares line t = a + b·K: a is what a
launch costs whatever its size (launch gap, prologue, reduction, epilogue), b the steady state per 1024 rows of K.
A gap to vLLM in a says the fixed part, in b the streaming loop (docs/kernel-tuning.md).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/
from kernels import G, load_vllm, sweep_weights, timed  # noqa: E402  (also puts the repo root on sys.path)

KS = (1024, 2048, 4096, 8192, 16384)
SPLITS = {"auto": (0, 0), "8:8": (8, 8), "4:4": (4, 4), "1:2": (1, 2)}
ROWS = int(os.environ.get("ROWS", "0"))  # force the block-tile rows of the forced splits (0: the op's choice)


def main(n: int, m: int) -> None:
    from gptq_vllm.kernels import cuda as ours

    assert ours.available(), ours.load_error()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from profile_marlin import vllm_marlin_random

    V = load_vllm()  # None, with the reason printed, where vLLM is not importable (its column skipped)
    dev = torch.device("cuda")
    times: dict[str, list[float]] = {}
    for k in KS:
        _, qs, ss, fw = sweep_weights(k, n, 4, dev)
        del fw
        x = torch.randn(m, k, device=dev, dtype=torch.float16)
        for name, (sb, cs) in SPLITS.items():
            forced = ROWS if sb else 0  # `auto` stays the op's own choice
            ours.marlin_set_config(sb=sb, cs=cs, dense_min_m=100000 if forced else 0, tile_rows=forced)
            try:
                t = timed([lambda q=q, s=s: ours.marlin_gemm(x, q, s, None, None, 4, G) for q, s in zip(qs, ss)])
            except RuntimeError as e:  # a split the op refuses for this K
                print(f"K={k} {name}: {str(e).splitlines()[0]}")
                t = math.nan
            times.setdefault(name, []).append(t)
        ours.marlin_set_config()
        if V:
            fns = [vllm_marlin_random(V, k, n, dev) for _ in qs]
            times.setdefault("vllm_marlin", []).append(timed([lambda f=f: f(x) for f in fns]))
        del qs, ss
        torch.cuda.empty_cache()
    print(f"N = {n}, M = {m}" + (f", forced splits with {ROWS}-row tiles" if ROWS else "") + ": us per call")
    print("| kernel | " + " | ".join(f"K={k}" for k in KS) + " | a (us) | b (us per 1024 K) |")
    print("|---|" + "---|" * (len(KS) + 2))
    for name, all_ts in times.items():
        kx, ts = zip(*[(k / 1024, t) for k, t in zip(KS, all_ts) if not math.isnan(t)])
        mk, mt = sum(kx) / len(kx), sum(ts) / len(ts)
        b = sum((u - mk) * (t - mt) for u, t in zip(kx, ts)) / sum((u - mk) ** 2 for u in kx)
        print(f"| {name} | " + " | ".join(f"{t:.1f}" for t in all_ts) + f" | {mt - b * mk:.2f} | {b:.2f} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("n", nargs="?", type=int, default=4096, metavar="N", help="output features, fixed (default 4096)")
    ap.add_argument("m", nargs="?", type=int, default=16, metavar="M", help="batch rows (default 16)")
    args = ap.parse_args()
    main(args.n, args.m)
