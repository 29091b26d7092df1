"""Kernel selection: the one place that decides which layout and GEMM serve a quantized layer.

Inputs are static facts about the layer (bits, group size, this rank's K and N, whether its rows carry
per-row group ids, activation dtype, device).  The linear method asks once, at load time, and converts
the weight to the chosen layout; `apply` then calls the op of that layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats import marlin
from ..formats.kernel_layout import Layout

# The Marlin GEMM (ours and vLLM's) handles these group sizes, and works on K in multiples of 128 and
# N in multiples of 64 (formats.md §4.5); other shapes are zero-padded at load.
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
MARLIN_K_MULTIPLE = 128
MARLIN_N_MULTIPLE = marlin.TILE_N

_DTYPES = {
    "cuda": (torch.float16, torch.bfloat16),
    # The CPU op is the reference math, which takes any float activation vLLM runs on the CPU.
    "cpu": (torch.float16, torch.bfloat16, torch.float32),
}


class KernelSelectionError(ValueError):
    """No kernel serves the layer; the message says why and what would."""


@dataclass(frozen=True)
class Selection:
    layout: Layout
    reason: str


def check_device(dtype: torch.dtype, device_type: str, name: str) -> None:
    if device_type not in _DTYPES:
        raise KernelSelectionError(f"{name}: mygptq runs on CUDA GPUs and on the CPU, not on {device_type!r}")
    if dtype not in _DTYPES[device_type]:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in _DTYPES[device_type])
        raise KernelSelectionError(f"{name}: activations in {dtype} are not supported on {device_type}; "
                                   f"run the model with --dtype in ({allowed})")


def select(*, bits: int, group_size: int, in_features: int, out_features: int, row_groups: bool,
           dtype: torch.dtype, device_type: str, name: str) -> Selection:
    """Layout for a GPTQ layer that is converted at load (any layout is possible).

    in_features/out_features are this rank's K and N.  row_groups: this rank's rows may carry any group
    ids, with the scales of every group (a row-parallel shard of an act-order layer, or of one whose
    groups straddle the rank boundary), so the kernel may need g_idx_sorted and the weight cannot be
    padded (padding appends groups).
    """
    check_device(dtype, device_type, name)
    if bits not in marlin.MARLIN_BITS:
        return Selection(Layout.EXLLAMA, f"{bits}-bit codes have no Marlin layout")
    if group_size not in MARLIN_GROUP_SIZES:
        return Selection(Layout.EXLLAMA, f"the Marlin GEMM takes group sizes {MARLIN_GROUP_SIZES}, not {group_size}")
    if row_groups and (in_features % MARLIN_K_MULTIPLE or out_features % MARLIN_N_MULTIPLE):
        return Selection(Layout.EXLLAMA, f"K={in_features}, N={out_features} would need zero-padding for Marlin, "
                                         f"which a shard with per-row group ids does not allow")
    return Selection(Layout.MARLIN, f"{bits}-bit, group size {group_size}")


def check_stored(layout: Layout, *, bits: int, group_size: int, in_features: int, out_features: int,
                 dtype: torch.dtype, device_type: str, name: str) -> Selection:
    """A converted checkpoint fixes the layout; check that its kernel can run this rank's part as stored."""
    check_device(dtype, device_type, name)
    if layout is Layout.MARLIN:
        problems = []
        if bits not in marlin.MARLIN_BITS:
            problems.append(f"{bits}-bit codes")
        if group_size not in MARLIN_GROUP_SIZES:
            problems.append(f"group size {group_size} (Marlin takes {MARLIN_GROUP_SIZES})")
        if in_features % MARLIN_K_MULTIPLE or out_features % MARLIN_N_MULTIPLE:
            problems.append(f"K={in_features}, N={out_features} on this rank (Marlin needs K % {MARLIN_K_MULTIPLE} "
                            f"== 0 and N % {MARLIN_N_MULTIPLE} == 0; a converted checkpoint cannot be re-padded)")
        if problems:
            raise KernelSelectionError(
                f"{name}: the converted Marlin layout cannot serve {'; '.join(problems)}. Serve the GPTQ source "
                f"checkpoint with --quantization mygptq (it converts and pads at load), use a tensor-parallel "
                f"size that keeps the shapes aligned, or convert with --layout exllama")
    return Selection(layout, "stored in the checkpoint")
