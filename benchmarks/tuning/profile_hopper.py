"""Launch our Hopper GEMM at a config (and, with --machete, vLLM's machete_mm at the same shape) for Nsight
Compute: the 4-bit tiles against Machete, or the 2/3-bit units against the 4-bit tiles.

    ncu --clock-control none -k regex:device_kernel --section SpeedOfLight --section WarpStateStats \
        --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
        python benchmarks/tuning/profile_hopper.py --machete 70b.down:128:128x128_c2:3:1
    ncu --clock-control none -k regex:device_kernel --section WarpStateStats --section SourceCounters \
        python benchmarks/tuning/profile_hopper.py 70b.gate_up:64/4 70b.gate_up:64/2 70b.gate_up:64/3

Arguments: SHAPE:M:CONFIG:DECOMPOSITION:SPLITS (shapes of benchmarks/kernels.py, a config name of
`cuda.hopper_configs()`, decomposition 0 heuristic / 1 data-parallel / 2 split-K / 3 stream-K) or SHAPE:M for the
choice `selection` makes at that M for 4-bit (the one the 2/3-bit units take too), each optionally followed by
/BITS (4 by default; 2 and 3 run the unit mainloop on random units); symmetric g128 fp16, random weights.  Each
launch runs twice (a warm-up that ncu also records, then the one to read); Machete picks its own schedule (vLLM's
heuristic).  All are `cutlass::device_kernel<...>` instantiations, hence the `-k` filter.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/
from kernels import G, SHAPES, hopper_scales, load_vllm  # noqa: E402  (also puts the repo root on sys.path)


def main(points: list[str], machete: bool) -> None:
    from gptq_vllm.formats import marlin
    from gptq_vllm.kernels import cuda as ours
    from gptq_vllm.kernels import selection

    assert ours.available(), ours.load_error()
    V = load_vllm() if machete else None  # None, with the reason printed, where vLLM is not importable
    dev = torch.device("cuda")
    names = ours.hopper_configs()
    for arg in points:
        point, _, b = arg.partition("/")
        bits = int(b or 4)
        name, m, *forced = point.split(":")
        K, N = SHAPES[name]
        M = int(m)
        if forced:
            config, dec, splits = names.index(forced[0]), int(forced[1]), int(forced[2])
        else:
            choice = selection.hopper_choice(M, K, N)
            assert choice is not None, f"{name} M={M}: the selection runs the Marlin kernels there"
            config, dec, splits = choice
        q = torch.randint(-2**31, 2**31 - 1, marlin.qweight_shape(K, N, bits), dtype=torch.int32, device=dev)
        s = (torch.rand(K // G, N, device=dev) * 0.01 + 0.001).half()
        hs = hopper_scales(s, K)
        x = torch.randn(M, K, device=dev, dtype=torch.float16)
        for _ in range(2):
            ours.hopper_gemm(x, q, hs, None, bits, G, config, dec, splits)
        if V is not None:
            ops, st = V["ops"], V["st"]
            gq = torch.randint(-2**31, 2**31 - 1, (K // 8, N), dtype=torch.int32, device=dev)
            bq = ops.machete_prepack_B(gq.t().contiguous().t(), torch.float16, st.uint4b8, torch.float16)
            for _ in range(2):
                ops.machete_mm(a=x, b_q=bq, b_type=st.uint4b8, b_group_scales=s, b_group_size=G)
        torch.cuda.synchronize()
        print(arg, "launched", f"{bits}-bit", names[config], dec, splits,
              "(ours, Machete)" if V is not None else "(ours)", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("points", nargs="+", metavar="POINT",
                    help="SHAPE:M[:CONFIG:DECOMPOSITION:SPLITS][/BITS], as above; one launch pair each")
    ap.add_argument("--machete", action="store_true", help="also launch vLLM's machete_mm at each point")
    args = ap.parse_intermixed_args()  # --machete anywhere among the points
    main(args.points, args.machete)
