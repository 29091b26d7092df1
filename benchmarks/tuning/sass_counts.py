"""Instruction counts of compiled kernels, from `cuobjdump -sass` of an object built by build_sm90a.sh: per kernel
whose demangled name contains FILTER, its instructions and local loads / stores (spills), and its steady loop (the
shortest backward branch enclosing at least 4 HGMMA: the Hopper GEMM's mainloop; in kernels without wgmma, 4 HMMA: the
Marlin kernels' run loop, whose lean instantiations unroll a warp's run of 8 k-tiles) with its shared loads, and the
producer's loop (the shortest one issuing TMA or bulk copies without HGMMA) with the stages it covers.  FILTER may
also be a piece of the mangled name (c++filt leaves the names of CUTLASS's 4-bit kernels mangled): e.g.
`ILi4ELb0EEENS_6half_tEEEE` is the 4-bit fp16 kernel without zero points.

    python benchmarks/tuning/sass_counts.py build/sm90a/hopper_units_256x64_c2.cu.o "half_t, 3, false"
    python benchmarks/tuning/sass_counts.py build/sm90a/marlin_inst_f16_b3.cu.o "__half, 3"

cuobjdump comes from PyPI's nvidia-cuda-cuobjdump (CUOBJDUMP=path, else on PATH).  The figures of docs/kernels.md
"3-bit words by pair group" were counted with it.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess

INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
BRANCH = re.compile(r"\bBRA\b.*?0x([0-9a-f]+)")


def kernels(obj: str) -> dict[str, list[tuple[int, str]]]:
    sass = subprocess.run([os.environ.get("CUOBJDUMP", "cuobjdump"), "-sass", obj], check=True, capture_output=True,
                          text=True).stdout
    out = {}
    for fn in re.split(r"\n\s*Function : ", sass)[1:]:
        name = subprocess.run(["c++filt"], input=fn.split("\n", 1)[0].strip(), capture_output=True, text=True).stdout
        out[name.strip()] = [(int(a, 16), text) for a, text in INSTR.findall(fn)]
    return out


def shortest_loop(ins: list[tuple[int, str]], wanted) -> list[str] | None:
    """The shortest body of a backward branch for which wanted(body) holds."""
    index = {a: i for i, (a, _) in enumerate(ins)}
    best = None
    for i, (_, text) in enumerate(ins):
        m = BRANCH.search(text)
        start = index.get(int(m.group(1), 16)) if m else None
        if start is not None and start < i:
            body = [t for _, t in ins[start:i + 1]]
            if (best is None or len(body) < len(best)) and wanted(body):
                best = body
    return best


def steady_loop(ins: list[tuple[int, str]], mma: str = "HGMMA") -> list[str] | None:
    """The shortest backward branch enclosing at least 4 `mma` instructions (HGMMA: wgmma, HMMA: mma.sync)."""
    return shortest_loop(ins, lambda body: sum(mma in t for t in body) >= 4)


def producer_loop(ins: list[tuple[int, str]]) -> list[str] | None:
    """The shortest backward branch enclosing a TMA or bulk copy and no HGMMA (the producer's per-stage loop)."""
    return shortest_loop(ins, lambda body: any("UTMALDG" in t or "UBLKCP" in t for t in body)
                         and not any("HGMMA" in t for t in body))


def main(obj: str, want: str) -> None:
    for name, ins in kernels(obj).items():
        if want not in name:
            continue
        texts = [t for _, t in ins]
        line = f"{len(ins)} instructions, LDL {sum('LDL' in t for t in texts)}, STL {sum('STL' in t for t in texts)}"
        mma = "HGMMA" if any("HGMMA" in t for t in texts) else "HMMA"
        loop = steady_loop(ins, mma)
        if loop is not None:
            line += (f"; steady loop {len(loop)} instructions ({mma} {sum(mma in t for t in loop)}, "
                     f"LDS {sum('LDS' in t for t in loop)})")
        producer = producer_loop(ins)
        if producer is not None:
            stages = sum("SYNCS.PHASECHK" in t for t in producer)  # the producer waits once per stage for a free slot
            line += f"; producer loop {len(producer)} instructions over {stages} stages"
        print(f"{name[:160]}\n  {line}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("obj", metavar="OBJ", help="an object file built by build_sm90a.sh")
    ap.add_argument("filter", nargs="?", default="", metavar="FILTER",
                    help="count only kernels whose demangled (or mangled) name contains this (default: all)")
    args = ap.parse_args()
    main(args.obj, args.filter)
