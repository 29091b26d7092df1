"""The `mygptq` torch custom ops: one GEMM per kernel layout, each with a fake (meta) implementation.

vLLM compiles the model forward with torch.compile(fullgraph=True) on the GPU and on the CPU, so the
linear method's `apply` is a single call of one of these ops, traced through its fake implementation.

    mygptq::marlin_gemm(a, qweight, scales, qzeros?, perm?, g_idx_sorted?, hopper_scales?, hopper_zeros?, bits,
                        group_size, size_k, size_n)
    mygptq::exllama_gemm(a, qweight, qzeros, scales, perm?, g_idx_sorted?, bits, group_size, size_k, size_n)

a is [M, size_k] (the layer's K on this rank, unpadded) in fp16/bf16 (fp32 too on the CPU); the weight
tensors are those of formats.kernel_layout.KernelWeight; the result is [M, size_n] in a's dtype.  Each op
zero-pads a to the layout's rows (Marlin: marlin.stored_rows, qweight.shape[0] * 16 * U with U k-tiles per
unit, 1 for 4/8 bit) and gathers its columns by perm, then multiplies by the stored rows, so both
implementations below see the same [M, K_rows] activations:

  CPU   the reference math of the format core: from_kernel -> dequantize (rounded to a's dtype, as the
        GPU kernels dequantize) -> fp32 matmul.  It does not depend on any kernel and is their oracle.
  CUDA  gptq_vllm.kernels.cuda (the compiled kernels) when built, else the same reference math on the
        GPU.  With hopper_scales (formats.hopper, made at load on sm_90 GPUs) the batch size M of each call
        picks between the Marlin kernels and the Hopper mixed-input GEMM on the same Marlin words
        (selection.hopper_choice; static per captured CUDA-graph batch size).  That fallback reads tensors back to the host while it validates, which a CUDA graph cannot
        capture: it raises during capture and needs enforce_eager=True.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats import marlin
from ..formats.kernel_layout import KernelWeight, Layout, from_kernel
from ..formats.reference import dequantize
from . import selection

NAMESPACE = "mygptq"

MARLIN_GEMM_SCHEMA = (
    "marlin_gemm(Tensor a, Tensor qweight, Tensor scales, Tensor? qzeros, Tensor? perm, Tensor? g_idx_sorted, "
    "Tensor? hopper_scales, Tensor? hopper_zeros, int bits, int group_size, SymInt size_k, SymInt size_n) -> Tensor"
)
EXLLAMA_GEMM_SCHEMA = (
    "exllama_gemm(Tensor a, Tensor qweight, Tensor qzeros, Tensor scales, Tensor? perm, Tensor? g_idx_sorted, "
    "int bits, int group_size, SymInt size_k, SymInt size_n) -> Tensor"
)

# FRAGMENT: the compiled extension may add ops of its own to the same namespace.
_lib = torch.library.Library(NAMESPACE, "FRAGMENT")


def _gather_rows(a: torch.Tensor, rows: int, perm: torch.Tensor | None) -> torch.Tensor:
    """a [M, K] -> [M, rows]: zero-padded to the stored row count, columns taken in perm order."""
    if a.shape[1] < rows:
        a = F.pad(a, (0, rows - a.shape[1]))
    if perm is not None:
        a = a.index_select(1, perm)
    return a.contiguous()


def _reference_gemm(a_rows: torch.Tensor, kw: KernelWeight) -> torch.Tensor:
    w = dequantize(from_kernel(kw), a_rows.dtype)
    return (a_rows.float() @ w.float()).to(a_rows.dtype)


def _marlin_weight(qweight, scales, qzeros, g_idx_sorted, bits, group_size) -> KernelWeight:
    # The op sees the stored rows (already permuted and padded), so the weight is described as such.
    return KernelWeight(layout=Layout.MARLIN, bits=bits, group_size=group_size, sym=qzeros is None,
                        in_features=marlin.stored_rows(qweight, bits), out_features=scales.shape[1],
                        qweight=qweight, scales=scales, qzeros=qzeros, perm=None, g_idx_sorted=g_idx_sorted)


def _exllama_weight(qweight, qzeros, scales, g_idx_sorted, bits, group_size, size_k) -> KernelWeight:
    # ExLlama stores exact zeros for every layer, symmetric or not.
    return KernelWeight(layout=Layout.EXLLAMA, bits=bits, group_size=group_size, sym=False,
                        in_features=size_k, out_features=scales.shape[1],
                        qweight=qweight, scales=scales, qzeros=qzeros, perm=None, g_idx_sorted=g_idx_sorted)


def _refuse_capture(op: str) -> None:
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"mygptq::{op}: the CUDA kernels are not built, and the torch fallback cannot be captured in a "
            f"CUDA graph; build gptq_vllm's CUDA extension or run vLLM with enforce_eager=True")


def marlin_gemm_cpu(a, qweight, scales, qzeros, perm, g_idx_sorted, hopper_scales, hopper_zeros, bits, group_size,
                    size_k, size_n):
    # The Hopper operands only choose a GPU kernel; the reference math reads the Marlin tensors.
    a_rows = _gather_rows(a, marlin.stored_rows(qweight, bits), perm)
    y = _reference_gemm(a_rows, _marlin_weight(qweight, scales, qzeros, g_idx_sorted, bits, group_size))
    return y[:, :size_n].contiguous()


def marlin_gemm_cuda(a, qweight, scales, qzeros, perm, g_idx_sorted, hopper_scales, hopper_zeros, bits, group_size,
                     size_k, size_n):
    from . import cuda  # the extension is loaded on first use, never at import

    rows = marlin.stored_rows(qweight, bits)
    if cuda.available():
        # With perm the op gathers and zero-pads the activations itself.
        a_in = a.contiguous() if perm is not None else _gather_rows(a, rows, None)
        choice = None if hopper_scales is None else selection.hopper_choice(a.shape[0], rows, scales.shape[1], bits)
        if choice is not None:
            # Large 2/3-bit calls read a 4-bit copy of the units made for this call (selection.widened).
            q, qbits = (cuda.marlin_widen(qweight, bits), 4) if selection.widened(a.shape[0], bits) else (qweight, bits)
            y = cuda.hopper_gemm(a_in, q, hopper_scales, hopper_zeros, qbits, group_size, *choice, perm=perm)
        else:
            y = cuda.marlin_gemm(a_in, qweight, scales, qzeros, g_idx_sorted, bits, group_size, perm)
    else:
        _refuse_capture("marlin_gemm")
        y = _reference_gemm(_gather_rows(a, rows, perm),
                            _marlin_weight(qweight, scales, qzeros, g_idx_sorted, bits, group_size))
    return y[:, :size_n].contiguous()


def exllama_gemm_cpu(a, qweight, qzeros, scales, perm, g_idx_sorted, bits, group_size, size_k, size_n):
    a_rows = _gather_rows(a, size_k, perm)
    y = _reference_gemm(a_rows, _exllama_weight(qweight, qzeros, scales, g_idx_sorted, bits, group_size, size_k))
    return y[:, :size_n].contiguous()


def exllama_gemm_cuda(a, qweight, qzeros, scales, perm, g_idx_sorted, bits, group_size, size_k, size_n):
    from . import cuda

    a_rows = _gather_rows(a, size_k, perm)
    if cuda.available():
        y = cuda.exllama_gemm(a_rows, qweight, qzeros, scales, g_idx_sorted, bits, group_size)
    else:
        _refuse_capture("exllama_gemm")
        y = _reference_gemm(a_rows, _exllama_weight(qweight, qzeros, scales, g_idx_sorted, bits, group_size,
                                                    size_k))
    return y[:, :size_n].contiguous()


def _gemm_fake(a, *args):
    # The schemas end in (..., size_k, size_n); the output is [M, size_n] in a's dtype.
    return a.new_empty((a.shape[0], args[-1]))


_lib.define(MARLIN_GEMM_SCHEMA)
_lib.impl("marlin_gemm", marlin_gemm_cpu, "CPU")
_lib.impl("marlin_gemm", marlin_gemm_cuda, "CUDA")
torch.library.register_fake(f"{NAMESPACE}::marlin_gemm", _gemm_fake, lib=_lib)

_lib.define(EXLLAMA_GEMM_SCHEMA)
_lib.impl("exllama_gemm", exllama_gemm_cpu, "CPU")
_lib.impl("exllama_gemm", exllama_gemm_cuda, "CUDA")
torch.library.register_fake(f"{NAMESPACE}::exllama_gemm", _gemm_fake, lib=_lib)
