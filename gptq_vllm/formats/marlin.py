"""Marlin weight layout for 4- and 8-bit codes (vLLM gptq_marlin_repack, IST-DASLab Marlin).

The weight is cut into 16 (k) x 64 (n) tiles.  Tile (kt, nt) becomes 1024*b/32 consecutive int32 words
of output row kt, so the result is [K/16, N*16*b/32]: [K/16, 2N] for 4 bit, [K/16, 4N] for 8 bit.
Inside a tile the words are ordered so that one 32-bit load per thread gives each lane of each of the
4 warps exactly the B fragments of two mma.m16n8k16 n8 sub-tiles (formats.md §4.1):

    lane t owns rows k = 2*(t%4) + {0, 1} (register b0) and k + 8 (register b1), at column n = t//4
    of an n8 sub-tile; warp w owns the 16 columns 16*w .. 16*w+15 of the tile (two n8 sub-tiles).

TILE_MAP[bits] lists, for every field of every word of a tile, the flat tile position k*64 + n it holds.
unpack scatters through it; pack produces the same words with strided byte moves (fast on huge weights),
and the tests check it against a gather through TILE_MAP: one definition, two directions.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from . import bitpack
from .errors import FormatError
from .gptq import QuantizedWeight

TILE_K = 16
TILE_N = 64
MARLIN_BITS = (4, 8)


def _tile_map(bits: int) -> torch.Tensor:
    """LongTensor [32/b fields, 1024*b/32 words]: flat tile position (k*64 + n) of each field of each word."""
    pf = 32 // bits
    words = TILE_K * TILE_N // pf
    pos = torch.empty(pf, words, dtype=torch.int64)
    for j in range(words):
        if bits == 4:
            # 128 words per tile: word 4*t + w holds lane t of warp w, both n8 sub-tiles, rows r, r+1, r+8, r+9.
            t, w = divmod(j, 4)
            col = 16 * w + t // 4
            row = 2 * (t % 4)
            # Field order (low nibble first) puts (row, row+8) pairs of one column next to each other so
            # that the lop3 dequant extracts nibbles (0,4), (1,5), (2,6), (3,7) straight into half2s.
            fields = [(row, col), (row + 8, col), (row, col + 8), (row + 8, col + 8),
                      (row + 1, col), (row + 9, col), (row + 1, col + 8), (row + 9, col + 8)]
        else:
            # 256 words per tile: word 8*t + 2*w + h holds lane t of warp w, n8 sub-tile h (column +8*h).
            t, rem = divmod(j, 8)
            w, h = divmod(rem, 2)
            col = 16 * w + t // 4 + 8 * h
            row = 2 * (t % 4)
            fields = [(row, col), (row + 8, col), (row + 1, col), (row + 9, col)]
        for i, (r, c) in enumerate(fields):
            pos[i, j] = r * TILE_N + c
    return pos


TILE_MAP = {bits: _tile_map(bits) for bits in MARLIN_BITS}


def check_shape(in_features: int, out_features: int, bits: int) -> None:
    if bits not in MARLIN_BITS:
        raise FormatError(f"the Marlin layout holds 4- or 8-bit codes, not {bits}-bit")
    if in_features % TILE_K or out_features % TILE_N:
        raise FormatError(
            f"Marlin layout needs K % {TILE_K} == 0 and N % {TILE_N} == 0, got K={in_features}, N={out_features}; "
            f"pad the weight first (marlin.pad)"
        )


def pack(codes: torch.Tensor, bits: int, perm: torch.Tensor | None = None) -> torch.Tensor:
    """Codes [K, N] (rows taken in the order perm when given) -> Marlin words [K/16, N*16*b/32] int32."""
    K, N = codes.shape
    check_shape(K, N, bits)
    if sys.byteorder == "little":
        return _pack_bytewise(codes, bits, perm)
    return _pack_tile_map(codes, bits, perm)


def _pack_tile_map(codes: torch.Tensor, bits: int, perm: torch.Tensor | None) -> torch.Tensor:
    """pack() by gathering every field through TILE_MAP (the definition; slow, int64)."""
    K, N = codes.shape
    q = codes if perm is None else codes[perm.to(torch.int64)]
    tmap = TILE_MAP[bits].to(q.device)
    # [K, N] -> tiles [K/16, N/64, 1024] with flat index k*64 + n inside the tile.
    tiles = q.to(torch.int64).reshape(K // TILE_K, TILE_K, N // TILE_N, TILE_N).permute(0, 2, 1, 3)
    tiles = tiles.reshape(K // TILE_K, N // TILE_N, TILE_K * TILE_N)
    words = torch.zeros(K // TILE_K, N // TILE_N, tmap.shape[1], dtype=torch.int64, device=q.device)
    for i in range(tmap.shape[0]):
        words |= tiles[:, :, tmap[i]] << (bits * i)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.reshape(K // TILE_K, -1)


def _pack_bytewise(codes: torch.Tensor, bits: int, perm: torch.Tensor | None) -> torch.Tensor:
    """pack() as strided byte moves (same words as TILE_MAP, checked by the tests; little-endian hosts).

    In TILE_MAP's terms a tile position is row 8b + 2t_lo + a, column 16w + 8h + t_hi (lane t = 4t_hi +
    t_lo, warp w).  4 bit: word 16t_hi + 4t_lo + w, field 4a + 2h + b, so byte 2a + h of the word is the
    nibble pair (b=0, b=1).  8 bit: word 32t_hi + 8t_lo + 2w + h, byte 2a + b.
    """
    K, N = codes.shape
    kt, nt = K // TILE_K, N // TILE_N
    q = codes.to(torch.uint8)
    if bits == 4:
        if perm is None:
            rows = q.view(kt, 2, 8, N)  # [kt, b, (t_lo, a), n]
            low, high = rows[:, 0], rows[:, 1] << 4
        else:
            # The b = 0 and b = 1 rows of every tile are gathered separately, straight into the two
            # halves of the nibble pairs: the permuted codes are never materialised.
            p = perm.to(device=q.device, dtype=torch.int64).view(kt, 2, 8)
            low = torch.index_select(q, 0, p[:, 0].reshape(-1)).view(kt, 8, N)
            high = torch.index_select(q, 0, p[:, 1].reshape(-1)).view(kt, 8, N)
            high <<= 4
        pairs = (low | high).view(kt, 4, 2, N)  # [kt, t_lo, a, n]
        if q.device.type == "cpu":
            # numpy: one strided byte copy per byte 2a + h of the words, straight into place; faster than the
            # torch steps below (measured on 4096x11008: 43 vs 46-55 ms; packing is most of the converter's time).
            src = pairs.numpy().reshape(kt, 4, 2, nt, 4, 2, 8)  # [kt, t_lo, a, nt, w, h, t_hi]
            dst = np.empty((kt, 4, nt, 8, 4, 2, 2), dtype=np.uint8)  # [kt, t_lo, nt, t_hi, w, a, h]
            for a in range(2):
                for h in range(2):
                    dst[..., a, h] = src[:, :, a, :, :, h, :].transpose(0, 1, 2, 4, 3)
            words = torch.from_numpy(dst).view(kt, 4, nt, 8, 16).view(torch.int32)  # [kt, t_lo, nt, t_hi, w]
        else:
            planes = torch.zeros(kt, 4, N, 4, dtype=torch.uint8, device=q.device)
            planes[..., 0] = pairs[:, :, 0]  # byte 2a + h with h = 0; h = 1 is shifted in below
            planes[..., 2] = pairs[:, :, 1]
            p = planes.view(kt, 4, N * 4).view(torch.int32).view(kt, 4, nt, 4, 2, 8)  # [kt, t_lo, nt, w, h, t_hi]
            words = torch.empty(kt, 4, nt, 8, 4, dtype=torch.int32, device=q.device)  # [kt, t_lo, nt, t_hi, w]
            torch.bitwise_or(p[:, :, :, :, 0], p[:, :, :, :, 1] << 8, out=words.permute(0, 1, 2, 4, 3))
        # Output order [kt, nt, t_hi, t_lo, w]: swap t_lo with (nt, t_hi) in whole 16-byte runs of the 4 w
        # words, viewed as complex128 only to copy 16 bytes per element (no arithmetic: bits unchanged);
        # 5x faster than an int32 permute whose inner runs are 4 elements long.
        runs = words.view(kt, 4, nt * 8 * 4).view(torch.complex128)  # [kt, t_lo, (nt, t_hi)]
        return runs.transpose(1, 2).contiguous().view(torch.int32).view(kt, -1)
    if perm is not None:
        q = torch.index_select(q, 0, perm.to(device=q.device, dtype=torch.int64))
    rows = q.view(kt, 2, 4, 2, N)  # [kt, b, t_lo, a, n]
    planes = torch.empty(kt, 4, N, 2, 2, dtype=torch.uint8, device=q.device)  # [kt, t_lo, n, a, b]
    for a in range(2):
        for b in range(2):
            planes[:, :, :, a, b] = rows[:, b, :, a]
    p = planes.view(kt, 4, N * 4).view(torch.int32).view(kt, 4, nt, 4, 2, 8)  # [kt, t_lo, nt, w, h, t_hi]
    return p.permute(0, 2, 5, 1, 3, 4).reshape(kt, -1)


def unpack(words: torch.Tensor, bits: int, in_features: int, out_features: int) -> torch.Tensor:
    """Marlin words -> codes [K, N] int32 in the (possibly permuted) row order they were packed in."""
    K, N = in_features, out_features
    check_shape(K, N, bits)
    tmap = TILE_MAP[bits].to(words.device)
    expected = (K // TILE_K, N * TILE_K * bits // 32)
    if tuple(words.shape) != expected or words.dtype != torch.int32:
        raise FormatError(f"Marlin qweight: shape {tuple(words.shape)} {words.dtype}, expected {expected} int32")
    w = (words.to(torch.int64) & (2**32 - 1)).reshape(K // TILE_K, N // TILE_N, tmap.shape[1])
    tiles = torch.empty(K // TILE_K, N // TILE_N, TILE_K * TILE_N, dtype=torch.int64, device=words.device)
    mask = 2**bits - 1
    for i in range(tmap.shape[0]):
        tiles[:, :, tmap[i]] = (w >> (bits * i)) & mask
    q = tiles.reshape(K // TILE_K, N // TILE_N, TILE_K, TILE_N).permute(0, 2, 1, 3).reshape(K, N)
    return q.to(torch.int32)


def repack_gptq(qweight: torch.Tensor, bits: int, in_features: int, perm: torch.Tensor | None = None) -> torch.Tensor:
    """GPTQ qweight [K*b/32, N] -> Marlin words; the equivalent of vLLM's gptq_marlin_repack(q, perm, K, N, b)."""
    return pack(bitpack.unpack_rows(qweight, bits, in_features), bits, perm)


# Scale permutations: each run of 64 (grouped) or 32 (one group) columns is reordered so that a thread's
# scales for its two n8 sub-tiles sit next to each other.  SCALE_PERM is an 8x8 transpose.
SCALE_PERM = torch.tensor([i + 8 * j for i in range(8) for j in range(8)], dtype=torch.int64)
SCALE_PERM_SINGLE = torch.tensor([2 * i + j for i in range(4) for j in (0, 1, 8, 9, 16, 17, 24, 25)], dtype=torch.int64)


def _scale_perm(group_size: int, in_features: int) -> torch.Tensor:
    # A single group spanning the whole (partition's) K, including group_size == K, takes the single perm.
    grouped = group_size != -1 and group_size < in_features
    return SCALE_PERM if grouped else SCALE_PERM_SINGLE


def permute_scales(scales: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """scales [NG, N] -> the same shape in Marlin order (vLLM marlin_permute_scales)."""
    ng, n = scales.shape
    perm = _scale_perm(group_size, in_features).to(scales.device)
    return scales.reshape(-1, perm.numel())[:, perm].reshape(ng, n).contiguous()


def unpermute_scales(scales: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    ng, n = scales.shape
    perm = _scale_perm(group_size, in_features).to(scales.device)
    return scales.reshape(-1, perm.numel())[:, torch.argsort(perm)].reshape(ng, n).contiguous()


# Zero points (asymmetric Marlin): after the scale permutation, the 32/b fields of each packed word are
# interleaved like the weight nibbles so one lop3 decode yields them in fragment order.
ZERO_INTERLEAVE = {4: torch.tensor([0, 2, 4, 6, 1, 3, 5, 7]), 8: torch.tensor([0, 2, 1, 3])}


def pack_zeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Exact zeros [NG, N] -> Marlin zero points [NG, N*b/32] int32 (vLLM marlin_zero_points)."""
    ng, n = zeros.shape
    z = zeros.reshape(-1, TILE_N)[:, SCALE_PERM.to(zeros.device)]
    il = ZERO_INTERLEAVE[bits].to(zeros.device)
    z = z.reshape(-1, il.numel())[:, il].reshape(ng, n)
    return bitpack.pack_cols(z, bits)


def unpack_zeros(packed: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    z = bitpack.unpack_cols(packed, bits, out_features)
    ng, n = z.shape
    il = ZERO_INTERLEAVE[bits].to(z.device)
    z = z.reshape(-1, il.numel())[:, torch.argsort(il)]
    return z.reshape(-1, TILE_N)[:, torch.argsort(SCALE_PERM.to(z.device))].reshape(ng, n).contiguous()


def padded_shape(in_features: int, out_features: int, group_size: int) -> tuple[int, int]:
    """Smallest (K', N') >= (K, N) that the Marlin GEMM takes: N' % 64, K' % 128, K' a multiple of G."""
    k_mult = 128 if group_size in (-1, 32, 64, 128) else max(128, group_size)
    return -(-in_features // k_mult) * k_mult, -(-out_features // TILE_N) * TILE_N


def pad(weight: QuantizedWeight, in_features: int, out_features: int) -> QuantizedWeight:
    """Zero-pad a weight to (K', N'): new entries dequantize to exactly 0 (code = zero point).

    New rows continue the groups (g_idx = k // G), so a short last group is completed and further groups
    are appended; with G = -1 the one group simply grows.
    """
    K, N = weight.codes.shape
    if (K, N) == (in_features, out_features):
        return weight
    if in_features < K or out_features < N:
        raise FormatError(f"cannot pad ({K}, {N}) down to ({in_features}, {out_features})")
    G = weight.group_size
    # A row-parallel act-order shard keeps the scales of every group of the full K: never drop rows.
    ng_new = max(weight.scales.shape[0], 1 if G == -1 else -(-in_features // G))
    ng = weight.scales.shape[0]
    scales = torch.zeros(ng_new, out_features, dtype=weight.scales.dtype, device=weight.scales.device)
    scales[:ng, :N] = weight.scales
    zeros = torch.full((ng_new, out_features), 2 ** (weight.bits - 1), dtype=torch.int32, device=weight.zeros.device)
    zeros[:ng, :N] = weight.zeros
    # New columns use the symmetric mid code as their zero; every padded code equals its group's zero.
    codes = zeros.new_empty(in_features, out_features)
    extra_g = torch.arange(K, in_features, dtype=torch.int32, device=codes.device) // (in_features if G == -1 else G)
    g_idx = torch.cat([weight.g_idx.to(torch.int32), extra_g if G != -1 else torch.zeros_like(extra_g)])
    codes[:] = zeros[g_idx.to(torch.int64)]
    codes[:K, :N] = weight.codes
    return QuantizedWeight(codes, scales, zeros, g_idx, weight.bits, G, weight.sym)
