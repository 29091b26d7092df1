"""CUDA architecture list for building csrc/ (setup.py and the JIT build in cuda.py share it)."""

from __future__ import annotations

import re


def with_sm90a(arch_list: str) -> str:
    """`TORCH_CUDA_ARCH_LIST` with Hopper (9.0) built as sm_90a: the wgmma GEMM loop needs the arch-specific
    target, and an sm_90a binary runs on every compute-capability 9.0 GPU.  `9.0+PTX` keeps its portable PTX.

    >>> with_sm90a("8.0;8.9;9.0")
    '8.0;8.9;9.0a'
    >>> with_sm90a("9.0+PTX 8.0")
    '9.0a;9.0+PTX;8.0'
    """
    out = []
    for arch in re.split(r"[;\s]+", arch_list.strip()):
        if arch == "9.0":
            out.append("9.0a")
        elif arch == "9.0+PTX":
            out += ["9.0a", "9.0+PTX"]
        elif arch:
            out.append(arch)
    return ";".join(out)
