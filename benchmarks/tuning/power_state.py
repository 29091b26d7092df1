"""Whether a Hopper GEMM's timing depends on the card's power state: burst (5 x 5 graph replays, as the grid times and
the Hopper sweep did before SWEEP_WARMUP_S), warmed (the Hopper sweep's timing now) and sustained (100 replays per
repetition) timings of the same kernels, with the SM clock, power draw and temperature nvidia-smi reads after each.

    python benchmarks/tuning/power_state.py

On 1xH100 (2026-12-05, two runs, docs/kernels.md "Burst and sustained timings"): under sustained load the card
sits at its 700 W limit and the SM clock drops from ~1.9 GHz to 1.2-1.4 GHz; the mixed-input GEMMs slow by 4-15 %,
by how much depending on the config, which reorders close candidates; warmed timings come within ~4 % of sustained.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/, for kernels.py
from kernels import SWEEP_WARMUP_S, G, hopper_scales, sweep_weights, timed  # noqa: E402

from gptq_vllm.kernels import cuda as ours  # noqa: E402

# (K, N, M) and the candidates: where the 2026-12-05 sweep's pick depended on the power state.  64x256_c2_pp comes
# twice per decomposition sequence, first and last: the same kernel before and after the others.
POINTS = ((8192, 57344, 256), (4096, 6144, 256), (4096, 6144, 1024))
CANDIDATES = (("cublas", 0), ("64x256_c2_pp", 0), ("64x256_c2_pp", 1), ("128x256_c2", 0), ("128x128_c2", 0),
              ("64x256_c2_pp", 0))


def card_state() -> str:
    return subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw,temperature.gpu", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.strip()


def main() -> None:
    dev = torch.device("cuda")
    config = {name: i for i, name in enumerate(ours.hopper_configs())}
    for K, N, M in POINTS:
        _, mq, sc, fw = sweep_weights(K, N, 4, dev)
        hs = [hopper_scales(s, K) for s in sc]
        x = torch.randn(M, K, device=dev, dtype=torch.float16)

        def calls(name: str, dec: int):
            if name == "cublas":
                return [lambda w=w: torch.nn.functional.linear(x, w) for w in fw]
            c = config[name]
            return [lambda q=q, h=h: ours.hopper_gemm(x, q, h, None, 4, G, c, dec, 1) for q, h in zip(mq, hs)]

        # burst twice, warmed (benchmarks/kernels.py's SWEEP_WARMUP_S of replays first), sustained
        modes = (("burst", 5, 0.0), ("burst", 5, 0.0), ("warmed", 5, SWEEP_WARMUP_S), ("sustained", 100, 0.0))
        for mode, iters, warmup_s in modes:
            for name, dec in CANDIDATES:
                us = timed(calls(name, dec), iters=iters, warmup_s=warmup_s)
                print(f"K={K} N={N} M={M} {mode:9s} {name}/{dec}: {us:7.1f} us  [{card_state()}]", flush=True)
        del mq, sc, hs, fw
        torch.cuda.empty_cache()


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
