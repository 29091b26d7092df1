"""What the CUDA build of csrc/ compiles and how: sources, flags, CUTLASS's headers, the architecture list.

setup.py (loaded by path: the package itself imports torch) and the JIT build in cuda.py share it.
CUTLASS is a build dependency, not a copy: its headers come from the pinned `nvidia-cutlass` package
(`pip install nvidia-cutlass==4.2.0.0`, in the `gpu` extra), found through the package's install location.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re

CUTLASS_PACKAGE = "nvidia-cutlass==4.2.0.0"

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")

# -DNDEBUG: a device-side assert is a function call, and one inside CUTLASS's mainloop serializes its wgmma
# pipeline (ptxas warning C7510).
NVCC_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", "-DNDEBUG",
              "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "-U__CUDA_NO_HALF2_OPERATORS__"]
CXX_FLAGS = ["-O3"]


def sources(csrc: str = CSRC) -> list[str]:
    """Every translation unit under csrc/ (one folder per kernel family), paths under csrc."""
    found = sorted(glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "**", "*.cu"), recursive=True))
    # The JIT build names objects by file name, so names must be unique across the family folders.
    names = [os.path.basename(s) for s in found]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise RuntimeError(f"csrc/: source file names must be unique across folders, repeated: {dup}")
    return found


def cutlass_include_dirs() -> list[str]:
    """CUTLASS's include directories from the installed `nvidia-cutlass` package (module cutlass_library)."""
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the CUDA build needs CUTLASS's headers: pip install {CUTLASS_PACKAGE}")
    root = os.path.join(list(spec.submodule_search_locations)[0], "source")
    dirs = [os.path.join(root, "include"), os.path.join(root, "tools", "util", "include")]
    if not os.path.isfile(os.path.join(dirs[0], "cutlass", "cutlass.h")):
        raise RuntimeError(f"no CUTLASS headers under {root}: reinstall {CUTLASS_PACKAGE}")
    return dirs


def with_sm90a(arch_list: str) -> str:
    """`TORCH_CUDA_ARCH_LIST` with Hopper (9.0) built as sm_90a: the wgmma GEMM loop and the CUTLASS mixed-input
    kernels need the arch-specific target, and an sm_90a binary runs on every compute-capability 9.0 GPU.
    `9.0+PTX` keeps its portable PTX.

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
