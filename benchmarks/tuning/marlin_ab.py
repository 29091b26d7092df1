"""Time our Marlin kernels (the raw `marlin_gemm` op, its automatic split) at a few points, with an output checksum.

    PYTHONPATH=. [SHAPES=8b.o,70b.o] [MS=16,32] [ZEROS=1] python benchmarks/tuning/marlin_ab.py LABEL
    python benchmarks/tuning/marlin_ab.py --compare LINES BASE NEW      (no GPU)

Run it once per library build, alternating, to A/B two builds of csrc/marlin: one line per run, `shape@M us md5`
per point (4-bit symmetric g128 fp16, the same random weights and activations in every run, so equal checksums mean
bit-identical outputs; ZEROS=1: asymmetric, random zero points, which the general kernels serve).  Timed as benchmarks/kernels.py times the grid (CUDA graphs, L2 defeated by rotating weight
copies, its `sweep_weights`), without the grid's reference kernels, copy-bandwidth probe and JSON: four runs took 18 s
of device time on an H100, and unlike `kernels.py` grids fed to `compare_grids.py` it compares the outputs too
(docs/kernel-tuning.md).  --compare reads such lines (a text file, or FILE.json#KEY: a list of them, as
benchmarks/results keeps them) and prints per point the best of BASE's runs, of NEW's, NEW / BASE and whether the
checksums agree, then the geometric mean of NEW / BASE.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/
from kernels import G, SHAPES, sweep_weights, timed  # noqa: E402  (also puts the repo root on sys.path)


def main(label: str) -> None:
    from gptq_vllm.kernels import cuda as ours

    assert ours.available(), ours.load_error()
    dev = torch.device("cuda")
    points = []
    for name in os.environ.get("SHAPES", "8b.o,70b.o,8b.qkv,70b.qkv").split(","):
        K, N = SHAPES[name]
        torch.manual_seed(0)  # the same weights and activations in every run: checksums compare builds
        _, qs, ss, _ = sweep_weights(K, N, 4, dev)
        # Marlin zero points: [groups, N * 4 / 32] words of 4-bit fields (formats/marlin.py), any value is valid
        zs = ([torch.randint(-2**31, 2**31 - 1, (K // G, N // 8), dtype=torch.int32, device=dev) for _ in qs]
              if os.environ.get("ZEROS") == "1" else [None] * len(qs))
        for M in (int(m) for m in os.environ.get("MS", "16,32").split(",")):
            x = torch.randn(M, K, device=dev, dtype=torch.float16)
            y = ours.marlin_gemm(x, qs[0], ss[0], zs[0], None, 4, G)
            digest = hashlib.md5(y.cpu().numpy().tobytes()).hexdigest()[:8]
            us = timed([lambda q=q, s=s, z=z: ours.marlin_gemm(x, q, s, z, None, 4, G) for q, s, z in zip(qs, ss, zs)])
            points.append(f"{name}@{M} {us:.2f} {digest}")
    print(label, " | ".join(points), flush=True)


def read_lines(path: str) -> list[str]:
    """The run lines of a text file, or of FILE.json#KEY (a JSON list of them)."""
    name, _, key = path.partition("#")
    if key:
        with open(name) as f:
            return json.load(f)[key]
    with open(name) as f:
        return [line for line in f.read().splitlines() if line.strip()]


def compare(lines: list[str], base: str, new: str) -> float:
    """Prints the A/B per point and returns the geometric mean of NEW's best time over BASE's."""
    runs: dict[str, dict[str, list[tuple[float, str]]]] = defaultdict(lambda: defaultdict(list))
    for line in lines:
        label, _, rest = line.partition(" ")
        for point in rest.split(" | "):
            name, us, digest = point.split()
            runs[name][label].append((float(us), digest))
    logs = []
    print(f"| point | {base} us | {new} us | {new} / {base} | outputs |")
    print("|---|---|---|---|---|")
    for name, by_label in runs.items():
        t_base, t_new = (min(us for us, _ in by_label[label]) for label in (base, new))
        same = {d for _, d in by_label[base]} == {d for _, d in by_label[new]}
        logs.append(math.log(t_new / t_base))
        print(f"| {name} | {t_base:.2f} | {t_new:.2f} | {t_new / t_base:.3f} | {'same' if same else 'DIFFER'} |")
    mean = math.exp(sum(logs) / len(logs))
    print(f"geometric mean {new} / {base} over {len(logs)} points: {mean:.4f}")
    return mean


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("label", nargs="?", default="run", metavar="LABEL",
                      help="this run's label, the first word of its line (default: run)")
    mode.add_argument("--compare", nargs=3, metavar=("LINES", "BASE", "NEW"),
                      help="summarise run lines instead (no GPU): LINES a text file of them or FILE.json#KEY (a JSON "
                           "list), BASE and NEW two of their labels")
    args = ap.parse_args()
    if args.compare:
        compare(read_lines(args.compare[0]), *args.compare[1:])
    else:
        main(args.label)
