"""ExLlama layout: GPTQ qweight with the fields of each word (or 3-word block) reordered in place.

Shape, row order of words and word positions are those of GPTQ; only the bit placement inside each
block of codes along K changes, so that the kernel's `(q & 0x000f000f) | 0x6400` trick yields two
consecutive k in one half2 (formats.md §5).  With act-order the rows are first made sequential
(rows sorted by g_idx, vLLM's gptq_shuffle with a q_perm).  A shuffled qweight is not a GPTQ file.

PLACEMENTS[bits] is the one definition: (code index in block, word, shift, first code bit, bit count).
"""

from __future__ import annotations

import torch

from . import bitpack

Placement = tuple[int, int, int, int, int]


def _placements(bits: int) -> list[Placement]:
    if bits == 8:
        return [(i, 0, 8 * i, 0, 8) for i in range(4)]
    if bits in (2, 4):
        pf = 32 // bits
        # Even k in the low half-word, odd k in the high half-word: field j holds code order[j].
        order = list(range(0, pf, 2)) + list(range(1, pf, 2))
        return [(order[j], 0, bits * j, 0, bits) for j in range(pf)]
    # 3 bit, 32 codes in 3 words: word j holds codes 10j .. 10j+9 as pairs (10j+2i at bit 3i, 10j+2i+1 at
    # bit 16+3i), and bit j of codes 30 and 31 at bits 15 and 31.
    out: list[Placement] = []
    for j in range(3):
        for i in range(5):
            out.append((10 * j + 2 * i, j, 3 * i, 0, 3))
            out.append((10 * j + 2 * i + 1, j, 16 + 3 * i, 0, 3))
        out.append((30, j, 15, j, 1))
        out.append((31, j, 31, j, 1))
    return out


PLACEMENTS = {bits: _placements(bits) for bits in bitpack.SUPPORTED_BITS}


def shuffle_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [K, N] -> ExLlama words [K*b/32, N] int32 (K padded to a whole block like GPTQ)."""
    block_codes, block_words = bitpack.block_shape(bits)
    K, N = codes.shape
    c = codes.to(torch.int64)
    pad = (-K) % block_codes
    if pad:
        c = torch.cat([c, c.new_zeros(pad, N)])
    c = c.view(-1, block_codes, N)
    out = c.new_zeros(c.shape[0], block_words, N)
    for idx, word, shift, vbit, nb in PLACEMENTS[bits]:
        out[:, word] |= ((c[:, idx] >> vbit) & (2**nb - 1)) << shift
    out = out.view(-1, N)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def unshuffle_codes(words: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    block_codes, block_words = bitpack.block_shape(bits)
    N = words.shape[1]
    w = (words.to(torch.int64) & (2**32 - 1)).view(-1, block_words, N)
    c = w.new_zeros(w.shape[0], block_codes, N)
    for idx, word, shift, vbit, nb in PLACEMENTS[bits]:
        c[:, idx] |= ((w[:, word] >> shift) & (2**nb - 1)) << vbit
    return c.view(-1, N)[:in_features].to(torch.int32)


def shuffle(qweight: torch.Tensor, bits: int, in_features: int, perm: torch.Tensor | None = None) -> torch.Tensor:
    """GPTQ qweight -> ExLlama qweight; rows taken in the order perm first (vLLM gptq_shuffle(q, perm, b))."""
    codes = bitpack.unpack_rows(qweight, bits, in_features)
    if perm is not None and perm.numel():
        codes = codes[perm.to(torch.int64)]
    return shuffle_codes(codes, bits)


def unshuffle(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """ExLlama qweight -> GPTQ qweight (rows stay in the order they were shuffled in)."""
    return bitpack.pack_rows(unshuffle_codes(qweight, bits, in_features), bits)
