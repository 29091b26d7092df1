"""Kernel selection: the one place that decides which layout and GEMM serve a quantized layer.

Inputs are static facts about the layer (bits, group size, this rank's K and N, whether its rows carry
per-row group ids, activation dtype, device).  The linear method asks once, at load time, and converts
the weight to the chosen layout; `apply` then calls the op of that layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats import hopper, marlin
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
    # Marlin holds every GPTQ width (2/3 bit in its units, marlin.py), so only the group size and the shapes decide.
    if group_size not in MARLIN_GROUP_SIZES:
        return Selection(Layout.EXLLAMA, f"the Marlin GEMM takes group sizes {MARLIN_GROUP_SIZES}, not {group_size}")
    if row_groups and (in_features % MARLIN_K_MULTIPLE or out_features % MARLIN_N_MULTIPLE):
        return Selection(Layout.EXLLAMA, f"K={in_features}, N={out_features} would need zero-padding for Marlin, "
                                         f"which a shard with per-row group ids does not allow")
    return Selection(Layout.MARLIN, f"{bits}-bit, group size {group_size}")


def marlin_stored_problems(group_size: int, in_features: int, out_features: int) -> list[str]:
    """Why the Marlin kernels cannot run a converted (unpadded) Marlin module as stored; empty when they can.
    The one rule for `check_stored` (at load) and for the writers of converted checkpoints (convert, quantize)."""
    problems = []
    if group_size not in MARLIN_GROUP_SIZES:
        problems.append(f"group size {group_size} (Marlin takes {MARLIN_GROUP_SIZES})")
    if in_features % MARLIN_K_MULTIPLE or out_features % MARLIN_N_MULTIPLE:
        problems.append(f"K={in_features}, N={out_features} (Marlin needs K % {MARLIN_K_MULTIPLE} == 0 and "
                        f"N % {MARLIN_N_MULTIPLE} == 0; a converted checkpoint cannot be re-padded)")
    return problems


def check_stored(layout: Layout, *, bits: int, group_size: int, in_features: int, out_features: int,
                 dtype: torch.dtype, device_type: str, name: str) -> Selection:
    """A converted checkpoint fixes the layout; check that its kernel can run this rank's part as stored."""
    check_device(dtype, device_type, name)
    if layout is Layout.MARLIN:
        problems = marlin_stored_problems(group_size, in_features, out_features)  # this rank's K and N
        if problems:
            raise KernelSelectionError(
                f"{name}: the converted {bits}-bit Marlin layout cannot serve {'; '.join(problems)}. Serve the "
                f"GPTQ source checkpoint with --quantization mygptq (it converts and pads at load), use a "
                f"tensor-parallel size that keeps the shapes aligned, or convert with --layout exllama")
    return Selection(layout, "stored in the checkpoint")


# ---- per call: the Hopper mixed-input GEMM for larger batches (sm_90) -----------------------------------
#
# On a compute-capability 9.0 GPU a Marlin-layout layer also gets the Hopper GEMM's operands at load
# (formats.hopper: plain scales, zero term), and each call picks by its batch size M: the Marlin kernels for
# decode-sized M, CUTLASS's mixed-input GEMM (csrc/hopper/) above.  M is static per captured CUDA graph, so
# a captured batch size always runs the same kernel.  The choice per shape and M bucket is the table below,
# picked from device sweeps by benchmarks/pick_hopper.py (the fastest Hopper choice where it beats the Marlin
# path by >= 5 %); shapes outside it use the default row.

# M <= 8 always runs the Marlin kernels' 8-row tiles (the sweep measures M = 16 for the bucket 9..16, where
# both paths pad to 16 rows; at M = 1 the Hopper GEMM's 16-token tile is up to 1.6x slower).
HOPPER_MIN_M = 9
# 2/3-bit layers (formats.hopper UNIT_BITS) take the same table (with a width's own choices where its sweep found
# faster ones: HOPPER_UNITS_TUNED) between bounds of their own, measured on the H100
# (docs/kernels.md, issue 14).  Below UNITS_MIN_M the Marlin kernels stay (faster at M = 32 for 3 bit).  From there
# the Hopper GEMM reads the units in place (csrc/hopper/unit_mainloop.hpp), where the config's tile features divide
# N (it copies whole tiles); 3-bit layers from WIDEN_MIN_M on read a 4-bit copy of the weight made for the call
# (marlin_widen) instead: the unit mainloop decodes each weight once per token tile, ALU work that grows with M.
# With the units' own tile choices (HOPPER_UNITS_TUNED, 2026-12-07) the units beat the copy at 3 bits on 7 of 8
# shapes at M = 512 (1.06-1.13x; 8b.o 0.96x) and at 1024 (1.02-1.07x; 8b.qkv 0.95x); above 1024 the copy is
# unmeasured against them and stays.  Measured on unit layout 1; layout 2 made the 3-bit units 1.04-1.12x faster
# (geometric means at M = 64-512) and was not timed against the copy again.  At 2 bits the units are faster
# everywhere measured.
UNITS_MIN_M = 33  # the buckets from 64 on
WIDEN_MIN_M = {3: 1025}  # the buckets from 2048 on
# Upper bounds of the M buckets; M above the last bucket uses the last one.
HOPPER_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 8192)

# (config name, decomposition, splits): decomposition 0 heuristic, 1 data-parallel, 2 split-K, 3 stream-K
# (csrc/hopper/configs.h).  None: the Marlin path.
HopperChoice = tuple[str, int, int]
# Ping-pong configs (names ending "_pp") run data-parallel only: decomposition 0 or 1, one split.
PINGPONG_SUFFIX = "_pp"


def hopper_decompositions(config: str, candidates: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    """The (decomposition, splits) pairs of `candidates` that `config` runs."""
    if config.endswith(PINGPONG_SUFFIX):
        return tuple(c for c in candidates if c[0] <= 1 and c[1] == 1)
    return candidates


HOPPER_DEFAULT: dict[int, HopperChoice | None] = {
    16: None, 32: ("128x32_c2", 3, 1), 64: ("128x64_c1", 3, 1), 128: ("128x128_c2", 0, 1), 256: ("128x128_c2", 0, 1),
    512: ("128x256_c2", 0, 1), 1024: ("128x256_c2", 0, 1), 2048: ("128x256_c2", 0, 1), 8192: ("256x128_c2", 0, 1),
}

# (K, N) -> {bucket: choice}, from the sweeps
#   benchmarks/results/hopper-sweep-h100-2026-12-05.json
#   benchmarks/results/hopper-sweep-h200-2026-12-06.json
#   benchmarks/results/hopper-sweep-h100-2026-12-06.json
HOPPER_TUNED: dict[tuple[int, int], dict[int, HopperChoice | None]] = {
    (4096, 6144): {
        16: None, 32: None, 64: ("128x64_c1", 2, 2), 128: ("64x128_c2_pp", 0, 1), 256: ("64x256_c2_pp", 0, 1),
        512: ("256x128_c2", 1, 1), 1024: ("64x256_c2_pp", 0, 1), 2048: ("128x256_c2", 0, 1),
        8192: ("256x128_c2", 1, 1),
    },
    (4096, 4096): {
        16: None, 32: None, 64: None, 128: ("128x64_c1", 2, 2), 256: ("64x128_c2_pp", 0, 1),
        512: ("64x256_c2_pp", 0, 1), 1024: ("128x256_c2", 0, 1), 2048: ("128x256_c2", 0, 1),
        8192: ("256x128_c2", 1, 1),
    },
    (4096, 28672): {
        16: None, 32: ("256x32_c2", 0, 1), 64: ("256x64_c2", 1, 1), 128: ("256x128_c2", 0, 1),
        256: ("128x256_c1", 0, 1), 512: ("128x256_c2", 3, 1), 1024: ("128x256_c2", 0, 1), 2048: ("256x128_c2", 1, 1),
        8192: ("256x128_c2", 3, 1),
    },
    (14336, 4096): {
        16: None, 32: ("128x32_c2", 0, 1), 64: ("128x64_c1", 3, 1), 128: ("128x128_c2", 3, 1),
        256: ("128x128_c2", 0, 1), 512: ("256x128_c2", 3, 1), 1024: ("128x256_c2", 0, 1), 2048: ("128x256_c2", 1, 1),
        8192: ("256x128_c2", 0, 1),
    },
    (8192, 10240): {
        16: None, 32: ("128x32_c2", 3, 1), 64: ("256x64_c2", 3, 1), 128: ("128x128_c2", 3, 1),
        256: ("128x256_c1", 3, 1), 512: ("128x256_c2", 3, 1), 1024: ("128x256_c2", 3, 1), 2048: ("256x128_c2", 0, 1),
        8192: ("256x128_c2", 3, 1),
    },
    (8192, 8192): {
        16: None, 32: ("128x32_c2", 2, 2), 64: ("128x64_c1", 2, 2), 128: ("128x128_c2", 2, 2),
        256: ("256x128_c2", 2, 2), 512: ("128x256_c1", 1, 1), 1024: ("128x256_c2", 0, 1), 2048: ("128x256_c2", 0, 1),
        8192: ("256x128_c2", 3, 1),
    },
    (8192, 57344): {
        16: None, 32: ("256x32_c2", 3, 1), 64: ("256x64_c2", 3, 1), 128: ("256x128_c2", 3, 1),
        256: ("128x256_c2", 3, 1), 512: ("128x256_c2", 3, 1), 1024: ("128x256_c2", 3, 1), 2048: ("256x128_c2", 3, 1),
        8192: ("128x256_c2", 3, 1),
    },
    (28672, 8192): {
        16: None, 32: ("256x32_c2", 3, 1), 64: ("128x64_c1", 2, 2), 128: ("128x128_c2", 2, 2),
        256: ("128x256_c1", 2, 2), 512: ("128x256_c2", 1, 1), 1024: ("128x256_c1", 1, 1), 2048: ("128x256_c2", 1, 1),
        8192: ("256x128_c2", 3, 1),
    },
    (4096, 3072): {
        16: None, 32: None, 64: None, 128: None, 256: ("64x128_c2_pp", 0, 1), 512: ("64x256_c2_pp", 0, 1),
        1024: ("128x256_c1", 1, 1),
    },
    (2048, 4096): {
        16: None, 32: ("64x64_c2_pp", 0, 1), 64: ("64x64_c2_pp", 0, 1), 128: ("64x64_c2_pp", 0, 1),
        256: ("64x128_c2_pp", 0, 1), 512: ("64x256_c2_pp", 0, 1), 1024: ("128x256_c2", 0, 1),
    },
    (4096, 14336): {
        16: None, 32: ("128x32_c1", 0, 1), 64: ("128x64_c1", 0, 1), 128: ("128x128_c2", 0, 1),
        256: ("128x256_c2", 1, 1), 512: ("128x256_c2", 0, 1), 1024: ("128x256_c2", 0, 1),
    },
    (7168, 4096): {
        16: None, 32: ("128x32_c2", 3, 1), 64: ("128x64_c2", 0, 1), 128: ("128x128_c2", 3, 1),
        256: ("128x128_c2", 3, 1), 512: ("128x256_c2", 3, 1), 1024: ("128x256_c2", 0, 1),
    },
    (8192, 5120): {
        16: None, 32: ("128x32_c1", 3, 1), 64: ("128x64_c2", 0, 1), 128: ("128x128_c2", 0, 1),
        256: ("128x128_c2", 3, 1), 512: ("128x256_c2", 3, 1), 1024: ("128x256_c1", 3, 1),
    },
    (4096, 8192): {
        16: None, 32: ("128x32_c1", 2, 2), 64: ("128x64_c1", 2, 2), 128: ("64x128_c2_pp", 0, 1),
        256: ("64x256_c2_pp", 0, 1), 512: ("128x256_c2", 0, 1), 1024: ("128x256_c2", 0, 1),
    },
    (8192, 28672): {
        16: None, 32: ("256x32_c1", 0, 1), 64: ("256x64_c2", 0, 1), 128: ("256x128_c2", 3, 1),
        256: ("128x256_c1", 3, 1), 512: ("128x256_c2", 3, 1), 1024: ("128x256_c2", 3, 1),
    },
    (14336, 8192): {
        16: ("256x16_c1", 0, 1), 32: ("128x32_c1", 2, 2), 64: ("128x64_c2", 0, 1), 128: ("128x128_c2", 2, 2),
        256: ("128x256_c2", 3, 1), 512: ("128x256_c1", 0, 1), 1024: ("128x256_c2", 1, 1),
    },
}

# 2/3-bit layers reading their units in place: (bits) -> (K, N) -> {bucket: choice} where the units' own sweep
# (`SWEEP=hopper BITS=b`) found a config >= 5 % faster than the shared table's (benchmarks/pick_hopper.py --units);
# every other point takes the shared table's choice.  From the sweeps
#   benchmarks/results/hopper-sweep-lowbit-h100-2026-12-07.json
HOPPER_UNITS_TUNED: dict[int, dict[tuple[int, int], dict[int, HopperChoice]]] = {
    3: {
        (8192, 57344): {
            128: ("128x128_c2", 3, 1), 256: ("128x256_c1", 3, 1), 512: ("128x256_c1", 0, 1),
        },
        (8192, 8192): {
            256: ("64x256_c2_pp", 0, 1), 512: ("128x256_c2", 0, 1),
        },
        (8192, 10240): {
            64: ("128x64_c1", 3, 1), 256: ("128x256_c2", 3, 1),
        },
        (14336, 4096): {
            512: ("64x256_c2_pp", 0, 1),
        },
        (4096, 4096): {
            128: ("64x64_c2_pp", 0, 1),
        },
        (4096, 6144): {
            64: ("64x64_c2_pp", 0, 1), 512: ("128x256_c1", 0, 1),
        },
    },
    2: {
        (28672, 8192): {
            128: ("128x128_c2", 0, 1), 256: ("128x256_c2", 0, 1),
        },
        (8192, 57344): {
            64: ("256x64_c2", 0, 1),
        },
        (8192, 8192): {
            256: ("64x256_c2_pp", 0, 1),
        },
        (8192, 10240): {
            64: ("128x64_c1", 3, 1), 256: ("128x256_c2", 3, 1),
        },
        (4096, 4096): {
            128: ("64x64_c2_pp", 0, 1),
        },
        (4096, 6144): {
            64: ("64x64_c2_pp", 0, 1),
        },
    },
}

_config_ids: dict[str, int] = {}


def hopper_available(device: torch.device) -> bool:
    """Whether layers on this device get the Hopper GEMM's operands: a CC 9.0 GPU running our sm_90a code."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        return False
    from . import cuda

    with torch.cuda.device(device):
        return cuda.available() and cuda.sm90a_code_runs()


def hopper_choice(m: int, k: int, n: int, bits: int = 4) -> tuple[int, int, int] | None:
    """(config id, decomposition, splits) of the Hopper GEMM for a call with m rows of activations on a
    [k, n] weight (padded sizes; `table_choice`), or None for the Marlin path."""
    if m < (UNITS_MIN_M if bits in hopper.UNIT_BITS else HOPPER_MIN_M):
        return None
    choice = table_choice(m, k, n, 4 if widened(m, bits) else bits)
    if choice is None:
        return None
    if not _config_ids:
        from . import cuda

        _config_ids.update({name: i for i, name in enumerate(cuda.hopper_configs())})
    name, decomposition, splits = choice
    if bits in hopper.UNIT_BITS and not widened(m, bits) and n % tile_features(name):
        return None
    return _config_ids[name], decomposition, splits


def table_choice(m: int, k: int, n: int, bits: int = 4) -> HopperChoice | None:
    """The tables' entry for m rows on a [k, n] weight of this width, bounds aside: the shared table's (the
    default row for shapes it lacks), or for 2/3-bit units the width's own where it has one."""
    bucket = next((b for b in HOPPER_BUCKETS if m <= b), HOPPER_BUCKETS[-1])
    choice = HOPPER_TUNED.get((k, n), HOPPER_DEFAULT).get(bucket, HOPPER_DEFAULT[bucket])
    if choice is None or bits not in hopper.UNIT_BITS:
        return choice
    return HOPPER_UNITS_TUNED.get(bits, {}).get((k, n), {}).get(bucket, choice)


def widened(m: int, bits: int) -> bool:
    """Whether a call with m rows on a layer of this width runs the Hopper GEMM on a 4-bit copy of its units."""
    return bits in WIDEN_MIN_M and m >= WIDEN_MIN_M[bits]


def tile_features(config: str) -> int:
    """Output features per tile of a Hopper config named "<W>x<T>_c<C>[_pp]" (csrc/hopper/configs.h)."""
    return int(config.split("x", 1)[0])
