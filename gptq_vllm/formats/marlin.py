"""Marlin weight layout (vLLM gptq_marlin_repack, IST-DASLab Marlin) for 4/8-bit codes, and its 2/3-bit units.

The weight is cut into 16 (k) x 64 (n) tiles.  Lane t of a warp (tig = t % 4, gid = t // 4) holds, for the
8 n8 sub-tiles s of a tile (sub-tile s covers tile columns 8s .. 8s+7), the mma.m16n8k16 B fragments: the
codes at tile row k = 2*tig + 8*b + h, column n = 8*s + gid, b in {0, 1} (register b0 / b1), h in {0, 1}
(the two halves of the register).  A "pair" P(s, b) is the two codes h = 0 and h = 1 (formats.md §4.1).

4 and 8 bit (vLLM's layout, unchanged): tile (kt, nt) becomes 1024*b/32 consecutive int32 words of output
row kt, so the result is [K/16, N*16*b/32]: [K/16, 2N] for 4 bit, [K/16, 4N] for 8 bit.  Inside a tile the
words are ordered so that one 32-bit load per thread gives each lane of each of the 4 warps exactly the B
fragments of two n8 sub-tiles: lane t of warp w holds the columns 16*w + t//4 (+8) of the tile.
TILE_MAP[bits] lists, for every field of every word of a tile, the flat tile position k*64 + n it holds.
unpack scatters through it; pack produces the same words with strided byte moves (fast on huge weights),
and the tests check it against a gather through TILE_MAP: one definition, two directions.

2 and 3 bit (ours, read by csrc/marlin): a lane's fragment of one k-tile is 64 (2-bit) or 96 (3-bit) bits,
too little for a 16-byte load, so the weight is cut into units of U = UNIT_TILES[bits] k-tiles x 64 columns
(2-bit: 2 k-tiles = 32 rows, 3-bit: 4 k-tiles = 64 rows), in which lane t owns C = UNIT_CHUNKS[bits]
16-byte chunks (2-bit: 1, 3-bit: 3):

  - Unit words: int32 word 4*(32*c + t) + j of a unit is word j (0..3) of lane t's chunk c, so one warp-wide
    16-byte load of chunk c reads 512 contiguous bytes.  Lane word i = 4*c + j.
  - Fields: pair p = 2*s + b of a k-tile, h = 0 at bit x of a lane word, h = 1 at bit x + 16 (the high
    half-word), as the 4-bit kernel's half2 decode wants them.
      2-bit: k-tile v (0, 1) of the unit uses lane words 2v + w, w = p // 8, x = 2*(p % 8), 2 bits.
      3-bit: lane word i = 4*c + g holds the pair group g, pairs p = 4g + f (f = 0..3) of every k-tile (the
             pairs warp g of a Hopper warpgroup converts), as the group's word c (0..2):
             k-tile v = c: pair 4g + f at x = 3f (f = 0..3);  k-tile 3: pair 4g + c at x = 12, and code bit c
             of pair 4g + 3 at bit 15 (h = 0) / 31 (h = 1).
    Every bit of every word is used (3-bit: 10 fields x 3 bits + 2 spare bits per word).
  - Units are ordered like Marlin tiles: unit (ku, nt) holds rows 16*U*ku .. 16*U*(ku+1) - 1 and columns
    64*nt .. 64*nt + 63; row ku of the result holds its units nt = 0 .. N/64 - 1 one after the other
    (128*C words each), so the result is [K/(16*U), N*U*b/2]: [K/32, 2N] for 2 bit, [K/64, 6N] for 3 bit.
UNIT_MAP[bits] is the definition (for every field of every word of a unit: the unit position k*64 + n of the
code it holds and which of its bits); pack gathers and unpack scatters through it.

A qweight row of any width holds unit_rows(bits) rows of K (16 for 4/8 bit); qweight_shape and stored_rows
are the one place that arithmetic lives.  Scales are Marlin-permuted alike for every width; zero points of
2/3-bit weights use the 4-bit zero-point packing (ZERO_BITS).
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import numpy as np
import torch

from . import bitpack
from .errors import FormatError
from .gptq import QuantizedWeight

TILE_K = 16
TILE_N = 64
MARLIN_BITS = (2, 3, 4, 8)
TILE_BITS = (4, 8)  # one 16 x 64 tile per block of words (TILE_MAP)
UNIT_TILES = {2: 2, 3: 4}  # k-tiles per unit: U*bits*4 bytes per lane, a whole number of 16-byte chunks
UNIT_CHUNKS = {2: 1, 3: 3}  # 16-byte chunks per lane per unit
# Version of the 2/3-bit unit layout, written into a converted checkpoint's quantization config ("unit_layout") and
# required on load where it holds 3-bit Marlin weights.  1 (no key, before 2026-12-07): a 3-bit k-tile's fields
# in its own three lane words, which no kernel reads any more; 2: the pair groups below.
UNIT_LAYOUT = 2
# Bits per packed zero point: 2/3-bit zero points take the 4-bit packing, which the kernel already decodes.
ZERO_BITS = {2: 4, 3: 4, 4: 4, 8: 8}


def unit_rows(bits: int) -> int:
    """Rows of K in one row of qweight: 16 * U (U = 1 for 4/8 bit)."""
    return TILE_K * UNIT_TILES.get(bits, 1)


def qweight_shape(in_features: int, out_features: int, bits: int) -> tuple[int, int]:
    """Shape of the Marlin words of a [K, N] weight: [K/(16U), N*16U*b/32]."""
    rows = unit_rows(bits)
    return in_features // rows, out_features * rows * bits // 32


def stored_rows(qweight: torch.Tensor, bits: int) -> int:
    """K rows (padded, in stored order) that a Marlin qweight holds."""
    return qweight.shape[0] * unit_rows(bits)


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


TILE_MAP = {bits: _tile_map(bits) for bits in TILE_BITS}


class UnitMap(NamedTuple):
    """The 2/3-bit unit layout as placements: field f of word j of a unit holds bits [code_bit[f, j],
    code_bit[f, j] + width[f]) of the code at unit position pos[f, j] = k*64 + n (k < 16U), at bits
    [shift[f], shift[f] + width[f]) of the word."""

    pos: torch.Tensor  # int64 [fields, 128*C]
    code_bit: torch.Tensor  # int64 [fields, 128*C]; non-zero only in the 3-bit spare-bit fields
    shift: tuple[int, ...]
    width: tuple[int, ...]


def _lane_word_fields(bits: int, i: int) -> list[tuple[int, int, int, int, int, int]]:
    """(k-tile v, pair p, h, shift, width, code bit) of each field of lane word i of a unit, in field order (the
    same shifts and widths in every word)."""
    if bits == 2:
        v, w = divmod(i, 2)
        return [(v, 8 * w + x, h, 2 * x + 16 * h, 2, 0) for h in (0, 1) for x in range(8)]
    c, g = divmod(i, 4)
    # Fields x = 0..3: k-tile c's pairs 4g + x; field 4: k-tile 3's pair 4g + c; the spare bits 15 and 31:
    # code bit c of k-tile 3's pair 4g + 3.
    fields = [(c, 4 * g + x, h, 3 * x + 16 * h, 3, 0) if x < 4 else (3, 4 * g + c, h, 12 + 16 * h, 3, 0)
              for h in (0, 1) for x in range(5)]
    return fields + [(3, 4 * g + 3, h, 15 + 16 * h, 1, c) for h in (0, 1)]


def _unit_map(bits: int) -> UnitMap:
    words = 128 * UNIT_CHUNKS[bits]
    fields = len(_lane_word_fields(bits, 0))
    pos = torch.empty(fields, words, dtype=torch.int64)
    code_bit = torch.empty(fields, words, dtype=torch.int64)
    for j in range(words):
        c, t, word = j // 128, j % 128 // 4, j % 4  # chunk-major: word 4*(32*c + t) + word
        for f, (v, p, h, _, _, bit) in enumerate(_lane_word_fields(bits, 4 * c + word)):
            s, b = divmod(p, 2)
            pos[f, j] = (TILE_K * v + 2 * (t % 4) + 8 * b + h) * TILE_N + 8 * s + t // 4
            code_bit[f, j] = bit
    shifts, widths = zip(*[(shift, width) for _, _, _, shift, width, _ in _lane_word_fields(bits, 0)])
    return UnitMap(pos, code_bit, shifts, widths)


UNIT_MAP = {bits: _unit_map(bits) for bits in UNIT_TILES}
# Codes per block of rows that pack/unpack of the 2/3-bit units process at once: bounds their temporaries
# (a few bytes per code) on huge weights, also on the GPU at load.
_UNIT_BLOCK_CODES = 1 << 22


def check_shape(in_features: int, out_features: int, bits: int) -> None:
    if bits not in MARLIN_BITS:
        raise FormatError(f"the Marlin layout holds {', '.join(map(str, MARLIN_BITS))}-bit codes, not {bits}-bit")
    rows = unit_rows(bits)
    if in_features % rows or out_features % TILE_N:
        raise FormatError(
            f"the {bits}-bit Marlin layout needs K % {rows} == 0 and N % {TILE_N} == 0, got K={in_features}, "
            f"N={out_features}; pad the weight first (marlin.pad)"
        )


def pack(codes: torch.Tensor, bits: int, perm: torch.Tensor | None = None) -> torch.Tensor:
    """Codes [K, N] (rows taken in the order perm when given) -> Marlin words qweight_shape(K, N, bits) int32."""
    K, N = codes.shape
    check_shape(K, N, bits)
    if bits in UNIT_TILES:
        return _pack_units(codes, bits, perm)
    if sys.byteorder == "little":
        return _pack_bytewise(codes, bits, perm)
    return _pack_tile_map(codes, bits, perm)


def _unit_blocks(K: int, N: int, bits: int):
    """(first, last) unit rows of the blocks of about _UNIT_BLOCK_CODES codes that pack/unpack take at once."""
    units = K // unit_rows(bits)
    step = max(1, _UNIT_BLOCK_CODES // (unit_rows(bits) * N))
    return [(a, min(a + step, units)) for a in range(0, units, step)]


def _pack_units(codes: torch.Tensor, bits: int, perm: torch.Tensor | None) -> torch.Tensor:
    """pack() for 2/3 bit: every field of every word gathered through UNIT_MAP.

    Position-major: a block's codes are laid out [unit position, unit], so each field's gather copies whole
    rows of units (about 3x faster on the CPU than gathering along the last dimension, measured on 4096x14336).
    """
    K, N = codes.shape
    rows, nt = unit_rows(bits), N // TILE_N
    umap = UNIT_MAP[bits]
    pos, code_bit = umap.pos.to(codes.device), umap.code_bit.to(device=codes.device, dtype=torch.int32)
    out = torch.empty(qweight_shape(K, N, bits), dtype=torch.int32, device=codes.device)
    for first, last in _unit_blocks(K, N, bits):
        if perm is None:
            q = codes[first * rows:last * rows]
        else:
            q = codes.index_select(0, perm[first * rows:last * rows].to(device=codes.device, dtype=torch.int64))
        units = last - first
        q = q.to(torch.uint8).reshape(units, rows, nt, TILE_N).permute(1, 3, 0, 2).reshape(rows * TILE_N, units * nt)
        words = torch.zeros(pos.shape[1], units * nt, dtype=torch.int32, device=codes.device)
        for f, (shift, width) in enumerate(zip(umap.shift, umap.width)):
            field = q.index_select(0, pos[f]).to(torch.int32)
            if width < bits:  # a 3-bit spare-bit field: one bit of its code, which bit depends on the word
                field = (field >> code_bit[f, :, None]) & 1
            words |= field << shift
        out[first:last] = words.t().reshape(units, -1)
    return out


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
    expected = qweight_shape(K, N, bits)
    if tuple(words.shape) != expected or words.dtype != torch.int32:
        raise FormatError(f"Marlin qweight: shape {tuple(words.shape)} {words.dtype}, expected {expected} int32")
    if bits in UNIT_TILES:
        return _unpack_units(words, bits, K, N)
    tmap = TILE_MAP[bits].to(words.device)
    w = (words.to(torch.int64) & (2**32 - 1)).reshape(K // TILE_K, N // TILE_N, tmap.shape[1])
    tiles = torch.empty(K // TILE_K, N // TILE_N, TILE_K * TILE_N, dtype=torch.int64, device=words.device)
    mask = 2**bits - 1
    for i in range(tmap.shape[0]):
        tiles[:, :, tmap[i]] = (w >> (bits * i)) & mask
    q = tiles.reshape(K // TILE_K, N // TILE_N, TILE_K, TILE_N).permute(0, 2, 1, 3).reshape(K, N)
    return q.to(torch.int32)


def _unpack_units(words: torch.Tensor, bits: int, K: int, N: int) -> torch.Tensor:
    """unpack() for 2/3 bit: every field scattered back through UNIT_MAP, position-major like _pack_units.

    The fields add into zeroed codes: the three spare-bit fields of a 3-bit pair-15 code land on the same
    position, and their bits are disjoint, so the sum is the code.
    """
    rows, nt = unit_rows(bits), N // TILE_N
    umap = UNIT_MAP[bits]
    pos, code_bit = umap.pos.to(words.device), umap.code_bit.to(device=words.device, dtype=torch.int32)
    out = torch.empty(K, N, dtype=torch.int32, device=words.device)
    for first, last in _unit_blocks(K, N, bits):
        units = last - first
        w = words[first:last].reshape(units * nt, pos.shape[1]).t()  # [word of the unit, unit]
        q = torch.zeros(rows * TILE_N, units * nt, dtype=torch.int32, device=words.device)
        for f, (shift, width) in enumerate(zip(umap.shift, umap.width)):
            field = (w >> shift) & (2**width - 1)  # the arithmetic shift's sign bits are masked off
            if width < bits:
                field = field << code_bit[f, :, None]
            q.index_add_(0, pos[f], field)
        out[first * rows:last * rows] = q.view(rows, TILE_N, units, nt).permute(2, 0, 3, 1).reshape(units * rows, N)
    return out


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
