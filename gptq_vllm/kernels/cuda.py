"""Loader and thin Python wrappers for our CUDA kernels (csrc/), registered as `torch.ops.mygptq_cuda.*`.

How the extension is found (first hit wins; nothing here touches CUDA at import time):
  1. a prebuilt `gptq_vllm/_C*.so` from the pip source build on a CUDA machine
     (`pip install --no-build-isolation -e .`, or `python setup.py build_ext --inplace`);
  2. a JIT build with torch.utils.cpp_extension.load, cached under $GPTQ_VLLM_CACHE (default
     ~/.cache/gptq_vllm/<torch version>-<cuda version>), done on the first call of `available()` on a
     machine where CUDA is available and nvcc is found.  GPTQ_VLLM_JIT=0 disables it; GPTQ_VLLM_JIT=1 forces
     a rebuild check even when a prebuilt library exists.  TORCH_CUDA_ARCH_LIST picks the targets (the
     visible GPUs' by default).
On a machine without CUDA `available()` is False and the wrappers raise.

Ops (schemas in csrc/ops.cpp; fake implementations registered here so they trace under torch.compile):
  marlin_gemm(a, qweight, scales, qzeros?, g_idx_sorted?, bits, group_size, perm?=None) -> [M, N_pad]  (b 2/3/4/8)
  hopper_gemm(a, qweight, scales, zeros?, bits, group_size, config, decomposition=0, splits=1) -> [M, N_pad]
  exllama_gemm(a, qweight, qzeros?, scales, g_idx_sorted?, bits, group_size) -> [M, N]
  marlin_repack(qweight_gptq, perm?, bits, size_k, size_n) -> Marlin words [K/16, N*16*b/32]
  exllama_shuffle(qweight_gptq, perm?, bits, size_k) -> ExLlama words (same shape as the GPTQ qweight)
  marlin_widen(qweight, bits) -> 4-bit Marlin words [K/16, 2N] of 2/3-bit Marlin units, codes + 8 - 2^(b-1)
"""

from __future__ import annotations

import glob
import logging
import os
import threading

import torch

from . import build

logger = logging.getLogger(__name__)

_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_lock = threading.Lock()
_state: dict[str, object] = {"tried": False, "ok": False, "error": None, "path": None}


def _ops_registered() -> bool:
    try:
        return hasattr(torch.ops.mygptq_cuda, "marlin_gemm")
    except (AttributeError, RuntimeError):
        return False


def _prebuilt() -> str | None:
    hits = sorted(glob.glob(os.path.join(_PKG_DIR, "_C*.so")) + glob.glob(os.path.join(_PKG_DIR, "_C*.pyd")))
    return hits[0] if hits else None


def _cache_dir() -> str:
    base = os.environ.get("GPTQ_VLLM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "gptq_vllm"))
    tag = f"torch{torch.__version__}-cu{torch.version.cuda}".replace("+", "_")
    path = os.path.join(base, tag)
    os.makedirs(path, exist_ok=True)
    return path


def _jit_build() -> str:
    from torch.utils import cpp_extension

    if not os.path.isdir(build.CSRC):
        raise RuntimeError(f"no csrc/ next to the package ({build.CSRC}): install from a source checkout or use the prebuilt build")
    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError("CUDA_HOME / nvcc not found: cannot JIT-build the kernels")
    # The visible GPUs' architectures (what torch would pick), Hopper as sm_90a for the wgmma loop; the
    # process's own TORCH_CUDA_ARCH_LIST is restored afterwards.
    given = os.environ.get("TORCH_CUDA_ARCH_LIST")
    archs = given or ";".join(
        sorted({"{}.{}".format(*torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())}))
    os.environ["TORCH_CUDA_ARCH_LIST"] = build.with_sm90a(archs)
    try:
        cpp_extension.load(
            name="gptq_vllm_C",
            sources=build.sources(),
            extra_cflags=build.CXX_FLAGS,
            extra_cuda_cflags=build.NVCC_FLAGS,
            extra_include_paths=[build.CSRC] + build.cutlass_include_dirs(),
            build_directory=_cache_dir(),
            is_python_module=False,
            verbose=os.environ.get("GPTQ_VLLM_JIT_VERBOSE", "0") == "1",
        )
    finally:
        if given is None:
            del os.environ["TORCH_CUDA_ARCH_LIST"]
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = given
    return os.path.join(_cache_dir(), "gptq_vllm_C.so")


def _load() -> None:
    jit = os.environ.get("GPTQ_VLLM_JIT", "")
    if _ops_registered():
        _state["ok"] = True
        return
    if not torch.cuda.is_available():
        _state["error"] = "CUDA is not available"
        return
    pre = _prebuilt()
    if pre is not None and jit != "1":
        torch.ops.load_library(pre)
        _state["path"] = pre
    elif jit != "0":
        _state["path"] = _jit_build()
    else:
        _state["error"] = "no prebuilt gptq_vllm/_C library and GPTQ_VLLM_JIT=0"
        return
    _register_fakes()
    _state["ok"] = _ops_registered()


def available() -> bool:
    """True when our CUDA ops are loaded (loads or JIT-builds them on first call; never raises)."""
    if _state["tried"]:
        return bool(_state["ok"])
    with _lock:
        if not _state["tried"]:
            try:
                _load()
            except Exception as e:  # noqa: BLE001 - report and fall back to the reference path
                _state["error"] = f"{type(e).__name__}: {e}"
                logger.warning("gptq_vllm CUDA kernels unavailable: %s", _state["error"])
            _state["tried"] = True
    return bool(_state["ok"])


def load_error() -> str | None:
    return _state["error"]  # type: ignore[return-value]


def library_path() -> str | None:
    return _state["path"]  # type: ignore[return-value]


# ---- fake (meta) implementations ---------------------------------------------------------------------

_fakes_done = False


def _register_fakes() -> None:
    global _fakes_done
    if _fakes_done or not _ops_registered():
        return

    @torch.library.register_fake("mygptq_cuda::marlin_gemm")
    def _marlin_gemm_fake(a, qweight, scales, qzeros, g_idx_sorted, bits, group_size, perm=None):
        from ..formats import marlin

        rows = marlin.stored_rows(qweight, bits)
        if perm is None:
            torch._check(a.size(1) == rows)
        else:
            torch._check(a.size(1) <= rows)
        return a.new_empty((a.size(0), scales.size(1)))

    @torch.library.register_fake("mygptq_cuda::hopper_gemm")
    def _hopper_gemm_fake(a, qweight, scales, zeros, bits, group_size, config, decomposition=0, splits=1, perm=None):
        from ..formats import marlin

        torch._check(a.size(1) <= marlin.stored_rows(qweight, bits))
        return a.new_empty((a.size(0), scales.size(1)))

    @torch.library.register_fake("mygptq_cuda::exllama_gemm")
    def _exllama_gemm_fake(a, qweight, qzeros, scales, g_idx_sorted, bits, group_size):
        return a.new_empty((a.size(0), scales.size(1)))

    @torch.library.register_fake("mygptq_cuda::marlin_repack")
    def _marlin_repack_fake(qweight, perm, bits, size_k, size_n):
        return qweight.new_empty((size_k // 16, size_n * 16 * bits // 32))

    @torch.library.register_fake("mygptq_cuda::marlin_widen")
    def _marlin_widen_fake(qweight, bits):
        from ..formats import marlin

        n2 = qweight.size(1) * 4 // (marlin.UNIT_TILES[bits] * bits)  # 2N: 4-bit Marlin words per 16-row tile row
        return qweight.new_empty((marlin.stored_rows(qweight, bits) // 16, n2))

    @torch.library.register_fake("mygptq_cuda::exllama_shuffle")
    def _exllama_shuffle_fake(qweight, perm, bits, size_k):
        return qweight.new_empty(qweight.shape)

    _fakes_done = True


# ---- wrappers ------------------------------------------------------------------------------------------

def _require() -> None:
    if not available():
        raise RuntimeError(f"gptq_vllm CUDA kernels are not available: {load_error()}")


def marlin_gemm(a: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None,
                g_idx_sorted: torch.Tensor | None, bits: int, group_size: int,
                perm: torch.Tensor | None = None) -> torch.Tensor:
    """a @ Marlin weight -> [M, N_pad] in a's dtype.

    Without perm: a is [M, K_pad] (fp16/bf16), already gathered by the act-order permutation and zero-padded.
    With perm (int32 [K_pad], the format core's permutation over the padded rows): a is the raw [M, K_in]
    activation (K_in <= K_pad); column k of the GEMM's A is a[:, perm[k]] (zero where perm[k] >= K_in),
    gathered while staging A at M = 1 with K_pad <= 16384, else by one gather kernel before the GEMM (no pad or
    index_select of its own).
    """
    _require()
    if perm is None:
        return torch.ops.mygptq_cuda.marlin_gemm(a, qweight, scales, qzeros, g_idx_sorted, bits, group_size)
    return torch.ops.mygptq_cuda.marlin_gemm(a, qweight, scales, qzeros, g_idx_sorted, bits, group_size, perm)


def sm90a_code_runs() -> bool:
    """Whether this build's sm_90a code runs on the current device (a compute-capability 9.0 GPU and a build
    with the sm_90a target): the Marlin GEMM's wgmma loop and the Hopper mixed-input GEMMs need it."""
    _require()
    return bool(torch.ops.mygptq_cuda.sm90a_code_runs())


def hopper_gemm(a: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                bits: int, group_size: int, config: int, decomposition: int = 0, splits: int = 1,
                perm: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, K_pad] (gathered, zero-padded, contiguous) @ the Marlin weight -> [M, N_pad], on the Hopper GEMM
    (csrc/hopper/: CUTLASS's SM90 kernels; 4/8-bit tiles on its mixed-input mainloop, 2/3-bit units on ours, which
    needs N_pad a multiple of the config's tile features).  With perm (int32 [K_pad]) a is the raw [M, K_in] activation, gathered
    by one kernel first (act-order).  scales: plain [K_pad/G, N_pad] in a's dtype (formats.hopper); zeros:
    scale * (2^(b-1) - z) likewise, or None (symmetric).  config: an index of hopper_configs();
    decomposition 0 heuristic / 1 data-parallel / 2 split-K (`splits` parts) / 3 stream-K."""
    _require()
    return torch.ops.mygptq_cuda.hopper_gemm(a, qweight, scales, zeros, bits, group_size, config, decomposition,
                                             splits, perm)


def hopper_tile_offsets(bits: int) -> torch.Tensor:
    """[64, 16] code offsets of a Marlin tile under the CuTe atom the Hopper GEMM reads (for the tests)."""
    _require()
    return torch.ops.mygptq_cuda.hopper_tile_offsets(bits)


def hopper_configs() -> list[str]:
    """Names of the Hopper GEMM's tile configurations, by config index: '<weight rows>x<tokens>_c<cluster>'."""
    _require()
    return list(torch.ops.mygptq_cuda.hopper_configs())


def marlin_set_config(sb: int = 0, cs: int = 0, slices: int = 0, dense_min_m: int = 0, tile_rows: int = 0,
                      wgmma: int = 0, a_buffers: int = 0, solo: int = 0) -> None:
    """Benchmark-only: force the Marlin GEMM's strips per block / cluster split / global slices / dense
    threshold / block-tile rows (8, 16, 32 or 64) / wgmma loop for 64-row tiles (1 on, -1 off) / staged A
    buffers (1, or 2: the next chunk copied while this one is used) / build of 16-row tiles (1 the one-block-
    per-SM build, -1 the two-blocks-per-SM one) (0 = automatic, the default).  Process-global; not for
    production use."""
    _require()
    torch.ops.mygptq_cuda._marlin_set_config(sb, cs, slices, dense_min_m, tile_rows, wgmma, a_buffers, solo)


def exllama_gemm(a: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor | None, scales: torch.Tensor,
                 g_idx_sorted: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    """a [M, K] (gathered by perm) @ ExLlama weight (2/3/4/8-bit) -> [M, N] in a's dtype."""
    _require()
    return torch.ops.mygptq_cuda.exllama_gemm(a, qweight, qzeros, scales, g_idx_sorted, bits, group_size)


def marlin_repack(qweight_gptq: torch.Tensor, perm: torch.Tensor | None, bits: int, size_k: int,
                  size_n: int) -> torch.Tensor:
    """GPTQ qweight [K*b/32, N] -> Marlin words (== formats.marlin.repack_gptq), rows taken in perm order."""
    _require()
    return torch.ops.mygptq_cuda.marlin_repack(qweight_gptq, perm, bits, size_k, size_n)


def exllama_shuffle(qweight_gptq: torch.Tensor, perm: torch.Tensor | None, bits: int, size_k: int) -> torch.Tensor:
    """GPTQ qweight -> ExLlama words (== formats.exllama.shuffle), rows taken in perm order."""
    _require()
    return torch.ops.mygptq_cuda.exllama_shuffle(qweight_gptq, perm, bits, size_k)


def marlin_widen(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """2/3-bit Marlin units -> 4-bit Marlin words [K/16, 2N] holding the codes + 8 - 2^(b-1) (== formats.marlin.pack
    of them), the Hopper GEMM's input for large batches of a 2/3-bit layer."""
    _require()
    return torch.ops.mygptq_cuda.marlin_widen(qweight, bits)
