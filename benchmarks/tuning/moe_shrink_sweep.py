"""Why starved MoE experts shrink their routed Hessian toward the all-token one with lambda = 1
(converters/quantize/moe.py; the table in docs/quantizer.md, "MoE experts").

    python benchmarks/tuning/moe_shrink_sweep.py        # CPU, a few minutes

A synthetic expert: 64 inputs from a correlated, unevenly scaled Gaussian; its tokens are the top 10 % along a
random router direction.  Each 64-row weight is quantized 4-bit g32 (static groups) by GPTQ against
H = (n·H_routed + lambda·n0·H_all) / (n + lambda·n0), n0 = in_features = 64, from n routed calibration tokens
(lambda = 0: routed only; inf: all-token only), and scored on 20k held-out routed tokens as a fraction of
round-to-nearest's output error; mean over 6 seeds.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # repo root
from converters.quantize.moe import shrink  # noqa: E402
from converters.quantize.rtn import rtn_quantize  # noqa: E402
from converters.quantize.solver import QuantSpec, gptq_solve  # noqa: E402
from gptq_vllm.formats.reference import dequantize  # noqa: E402

C, R = 64, 64
TOKENS = (8, 16, 32, 48, 64, 128, 256, 512, 1024)
LAMBDAS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, math.inf)


def hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.t() @ x / x.shape[0]


def main() -> None:
    spec = QuantSpec(4, 32, True, "static")
    ratios: dict[tuple[int, float], list[float]] = {}
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        mix = torch.randn(C, C, generator=g) / math.sqrt(C) + torch.eye(C)
        scale = torch.exp(torch.randn(C, generator=g) * 0.7)
        direction = torch.randn(C, generator=g)
        pool = (torch.randn(400000, C, generator=g) @ mix) * scale
        score = pool @ direction
        routed = pool[score > score.quantile(0.9)]
        held = routed[-20000:]
        H_all = hessian(pool[:4096])
        W = torch.randn(R, C, generator=g) * 0.05
        err = lambda Q: float(((W - Q) @ held.t()).pow(2).mean())  # noqa: E731
        e_rtn = err(dequantize(rtn_quantize(W, 4, 32, True)).t())
        for n in TOKENS:
            H_r = hessian(routed[torch.randperm(routed.shape[0] - 20000, generator=g)[:n]])
            for lam in LAMBDAS:
                H = H_all if math.isinf(lam) else shrink(H_r, n, H_all, C, lam)
                ratios.setdefault((n, lam), []).append(err(gptq_solve(W, H, spec).dequantize()) / e_rtn)
    print("n      " + " ".join(f"{'l=' + str(lam):>7}" for lam in LAMBDAS))
    for n in TOKENS:
        print(f"{n:<6} " + " ".join(f"{sum(ratios[(n, lam)]) / 6:7.2f}" for lam in LAMBDAS))


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
