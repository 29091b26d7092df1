"""What the Marlin atom's shared-memory bank conflicts cost the Hopper GEMM (issue 17; docs/kernels.md).

Times the Hopper GEMM as shipped (Marlin atom: each A-fragment load a 4-way bank conflict) against the same
kernels with the conflict-free "row-spread" atom of row_spread_gemm.cu (same bytes, rows assigned to other
wgmma rows, output features permuted within 64-blocks), same configs and decompositions, 4-bit g128 fp16,
L2 defeated, CUDA graphs (benchmarks/kernels.py's timer).  Checks first that the row-spread output is the
shipped output with its features permuted (bit for bit, recorded per row).  Needs an sm_90 GPU:

    [SHAPES=8b.o,70b.down] python benchmarks/tuning/row_spread/measure.py [out.json] [row_spread.so]

Without a prebuilt library it builds row_spread_gemm.cu first (torch's JIT, CUTLASS from the nvidia-cutlass
package, the flags of gptq_vllm/kernels/build.py; a few minutes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # benchmarks/, for kernels.py

from kernels import G, HOPPER_DECOMPOSITIONS, SHAPES, hopper_scales, sweep_weights, timed  # noqa: E402

CONFIGS = {"128x32_c2": 2, "256x32_c1": 3, "128x64_c2": 4, "256x64_c2": 5, "128x128_c2": 6, "128x256_c2": 8}
MS = (32, 64, 128, 256)


def row_map(ours) -> torch.Tensor:
    """pi[m]: the Marlin-atom row that the row-spread atom's logical row m reads (same offsets at every k)."""
    marlin = ours.hopper_tile_offsets(4)
    spread = torch.ops.mygptq_tuning.row_spread_offsets()
    where = {int(o): n for n, o in enumerate(marlin[:, 0])}
    pi = torch.tensor([where[int(o)] for o in spread[:, 0]])
    assert torch.equal(marlin[pi], spread), "row-spread atom is not a row permutation of the Marlin atom"
    return pi


def load_experiment(prebuilt: str | None) -> None:
    """The row_spread_gemm ops: a prebuilt library, else a JIT build of row_spread_gemm.cu."""
    if prebuilt:
        torch.ops.load_library(prebuilt)
        return
    from torch.utils import cpp_extension

    from gptq_vllm.kernels import build

    cpp_extension.load(name="gptq_vllm_row_spread", sources=[os.path.join(HERE, "row_spread_gemm.cu")],
                       extra_cuda_cflags=build.NVCC_FLAGS + ["-gencode=arch=compute_90a,code=sm_90a"],
                       extra_include_paths=build.cutlass_include_dirs() + [build.CSRC], is_python_module=False,
                       verbose=False)


def main(out_path: str | None, library: str | None) -> int:
    from gptq_vllm.kernels import cuda as ours

    out_path = out_path or f"row-spread-{datetime.date.today().isoformat()}.json"
    load_experiment(library)
    dev = torch.device("cuda")
    pi = row_map(ours)
    rows = []
    names = os.environ.get("SHAPES")
    shapes = {k: SHAPES[k] for k in names.split(",")} if names else SHAPES
    for name, (K, N) in shapes.items():
        _, mq, sc, _ = sweep_weights(K, N, 4, dev)
        hs = [hopper_scales(s, K) for s in sc]
        perm = (torch.arange(0, N, 64).view(-1, 1) + pi.view(1, -1)).flatten().to(dev)
        hs_rs = [h[:, perm].contiguous() for h in hs]
        for M in MS:
            x = torch.randn(M, K, device=dev, dtype=torch.float16)
            for cname, cfg in CONFIGS.items():
                if int(cname.split("x")[1].split("_")[0]) not in (M // 2, M, 2 * M):
                    continue
                for dec, splits in HOPPER_DECOMPOSITIONS:
                    ref = ours.hopper_gemm(x, mq[0], hs[0], None, 4, G, cfg, dec, splits)
                    got = torch.ops.mygptq_tuning.row_spread_gemm(x, mq[0], hs_rs[0], cfg, dec, splits)
                    want = ref[:, perm]
                    exact = torch.equal(got, want)
                    assert exact or torch.allclose(got.float(), want.float(), rtol=2e-3, atol=2e-3), (
                        f"{name} M={M} {cname}/{dec}/{splits}: row-spread output is not the permuted output")
                    t_marlin = timed([lambda q=q, h=h: ours.hopper_gemm(x, q, h, None, 4, G, cfg, dec, splits)
                                      for q, h in zip(mq, hs)], iters=5)
                    t_spread = timed([lambda q=q, h=h: torch.ops.mygptq_tuning.row_spread_gemm(x, q, h, cfg, dec,
                                                                                             splits)
                                      for q, h in zip(mq, hs_rs)], iters=5)
                    rows.append(dict(shape=name, K=K, N=N, M=M, kernel=f"{cname}/{dec}/{splits}", bit_exact=exact,
                                     marlin_atom_us=round(t_marlin, 2), row_spread_us=round(t_spread, 2)))
            best_m = min((r["marlin_atom_us"], r["kernel"]) for r in rows if r["shape"] == name and r["M"] == M)
            best_s = min((r["row_spread_us"], r["kernel"]) for r in rows if r["shape"] == name and r["M"] == M)
            print(f"{name:12s} M={M:<4d} best Marlin atom {best_m[1]:18s} {best_m[0]:7.1f} us   "
                  f"best row-spread {best_s[1]:18s} {best_s[0]:7.1f} us   {best_m[0] / best_s[0]:.3f}x", flush=True)
        del mq, sc, hs, hs_rs
        torch.cuda.empty_cache()
    meta = dict(gpu=torch.cuda.get_device_name(0), date=datetime.date.today().isoformat(), torch=torch.__version__,
                command="python benchmarks/tuning/row_spread/measure.py")
    with open(out_path, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print("wrote", out_path)
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", help="the JSON to write (default row-spread-DATE.json)")
    ap.add_argument("library", nargs="?", help="a prebuilt row_spread_gemm library (default: build it here)")
    args = ap.parse_args()
    sys.exit(main(args.out, args.library))
