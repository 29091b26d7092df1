"""Operands of the Hopper mixed-input GEMM (csrc/hopper/, CUTLASS's SM90 mixed-input collective).

The weight itself is not copied: the Hopper GEMM reads the Marlin words in place (the Marlin 16x64 tile is
described to CUTLASS as a CuTe layout in csrc/hopper/marlin_layout.hpp, whose offsets `tile_offsets` below
restates from marlin.TILE_MAP and the GPU tests compare entry by entry).  What CUTLASS takes differently is
small and derived once at load from the Marlin tensors:

  scales  [K/G, N] plain (N contiguous, no Marlin permutation), the activation dtype;
  zeros   asymmetric weights only: s * (2^(b-1) - z) [K/G, N], the activation dtype, since the collective
          computes W = s * (q - 2^(b-1)) + zeros (q - 2^(b-1) is the exact conversion of the stored code).

Symmetric weights are therefore dequantized exactly as by the Marlin kernel and the reference (one rounding
of s * (q - z)); asymmetric ones carry two more roundings (of the zero term and of the sum).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import marlin
from .gptq import sym_zero

# The widths the Hopper GEMM reads: the 4/8-bit Marlin tiles through CUTLASS's mixed-input mainloop (converted by
# gptq_convert.hpp), the 2/3-bit Marlin units through ours (csrc/hopper/unit_mainloop.hpp), both with the operands
# below computed for the layer's own width.
HOPPER_BITS = (4, 8)
UNIT_BITS = (2, 3)
# Both mainloops apply one scale per k tile (64 rows of fp16/bf16 activations; CUTLASS's needs at least four
# 16-deep wgmma k blocks per tile): a group must be a multiple of it, or span all of K.
K_TILE = 64


@dataclass(frozen=True)
class HopperOperands:
    scales: torch.Tensor
    zeros: torch.Tensor | None


def unsupported(*, bits: int, group_size: int, in_rows: int, g_idx_sorted: bool) -> str | None:
    """Why the Hopper GEMM cannot run a Marlin weight of these facts (None: it can).  in_rows = K_pad."""
    if bits not in HOPPER_BITS + UNIT_BITS:
        return f"{bits}-bit codes"
    if g_idx_sorted:
        return "rows whose groups are not runs of G (a row-parallel act-order shard)"
    if not (group_size == -1 or group_size >= in_rows or group_size % K_TILE == 0):
        return f"group size {group_size} (the Hopper GEMM takes multiples of {K_TILE}, or one group)"
    return None


def operands(qzeros: torch.Tensor | None, scales: torch.Tensor, *, bits: int, group_size: int,
             in_rows: int) -> HopperOperands:
    """Plain scales and the zero term from a Marlin weight's scales / qzeros (kernel_layout.KernelWeight)."""
    plain = marlin.unpermute_scales(scales, group_size, in_rows)
    if qzeros is None:
        return HopperOperands(plain, None)
    z = marlin.unpack_zeros(qzeros, marlin.ZERO_BITS[bits], plain.shape[1]).to(torch.float32)
    zeros = (plain.to(torch.float32) * (sym_zero(bits) - z)).to(scales.dtype)
    return HopperOperands(plain, zeros.contiguous())


def tile_offsets(bits: int) -> torch.Tensor:
    """LongTensor [64 (n), 16 (k)]: the code offset of each weight entry inside a Marlin tile, as
    csrc/hopper/marlin_layout.hpp's CuTe atom gives it (here from marlin.TILE_MAP, the one definition)."""
    tmap = marlin.TILE_MAP[bits]  # [fields, words]: flat tile position k*64 + n of field f of word j
    fields = tmap.shape[0]
    offsets = torch.empty(marlin.TILE_N * marlin.TILE_K, dtype=torch.int64)
    words = torch.arange(tmap.shape[1], dtype=torch.int64)
    for f in range(fields):
        offsets[tmap[f]] = words * fields + f
    return offsets.view(marlin.TILE_K, marlin.TILE_N).t().contiguous()
