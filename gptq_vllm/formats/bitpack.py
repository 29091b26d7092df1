"""Little-endian bitstream packing of b-bit codes into int32 words.

The one rule behind every GPTQ tensor (formats.md §1.2): along the packed dimension, code i occupies
absolute bits [b*i, b*i + b) of word0 || word1 || ..., and word r starts at bit 32*r.  For b = 2, 4, 8
a word holds 32/b whole codes; for b = 3 a field may straddle two words (AutoGPTQ's 10-1-10-1-10
pattern falls out of the same rule).  The general path does its arithmetic in int64 so that shifts of
codes >= 128 into bit 24 never overflow, and reinterprets the words as int32 (two's complement) at the end.

For b = 2, 4, 8 on a little-endian host a word is just 4 bytes of 8/b whole codes each, so packing and
unpacking work on uint8 bytes reinterpreted as int32 words: the same words, bit for bit, at a fraction of
the memory traffic (the converter's hot path).
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def block_shape(bits: int) -> tuple[int, int]:
    """(codes, words) of the smallest run of codes that ends on a word boundary: (32/b, 1) or (32, 3)."""
    check_bits(bits)
    g = math.gcd(32, bits)
    return 32 // g, bits // g


def packed_length(n: int, bits: int) -> int:
    """Number of int32 words holding n codes (whole blocks: n is padded up to a block)."""
    codes, words = block_shape(bits)
    return -(-n // codes) * words


def _to_int32(words64: torch.Tensor) -> torch.Tensor:
    return torch.where(words64 >= 2**31, words64 - 2**32, words64).to(torch.int32)


def _field_plan(bits: int):
    """For each code position in a block: (word, shift, spill bits into the next word)."""
    codes, _ = block_shape(bits)
    plan = []
    for i in range(codes):
        start = bits * i
        word, shift = divmod(start, 32)
        spill = max(0, shift + bits - 32)
        plan.append((word, shift, spill))
    return plan


def _bytewise(bits: int) -> bool:
    """Whether words can be handled as 4 little-endian bytes of 8/b whole codes each."""
    return bits in (2, 4, 8) and sys.byteorder == "little"


def _pack_rows_bytewise(codes: torch.Tensor, bits: int) -> torch.Tensor:
    n, m = codes.shape
    per_byte = 8 // bits
    c = codes.to(torch.uint8)
    pad = (-n) % (4 * per_byte)
    if pad:
        c = torch.cat([c, c.new_zeros(pad, m)])
    c = c.view(-1, 4, per_byte, m)  # [word row, byte, code in byte, column]
    byte = c[:, :, 0].clone()
    for i in range(1, per_byte):
        byte |= c[:, :, i] << (bits * i)
    return byte.permute(0, 2, 1).contiguous().view(-1, 4).view(torch.int32).view(-1, m)


def _unpack_rows_bytewise(packed: torch.Tensor, n: int, bits: int, dtype: torch.dtype) -> torch.Tensor:
    rows, m = packed.shape
    per_byte = 8 // bits
    # reshape(-1), not contiguous(): a [rows, 1] transpose is "contiguous" with a last stride != 1.
    byte = packed.reshape(-1).view(torch.uint8).view(rows, m, 4)
    if byte.device.type == "cpu":
        # The same steps in numpy, whose byte transpose and uint8 ops are 1.5-2x faster than torch's here
        # (measured: 21 vs 30 ms for a 4096x11008 unpack, a large part of the converter's time).
        b = np.ascontiguousarray(byte.numpy().transpose(0, 2, 1))
        out = np.empty((rows, 4, per_byte, m), dtype=np.uint8)
        for i in range(per_byte):
            if i == per_byte - 1 and i:  # the top field: the shift alone isolates it
                np.right_shift(b, bits * i, out=out[:, :, i])
            else:
                np.bitwise_and(b >> (bits * i) if i else b, 2**bits - 1, out=out[:, :, i])
        return torch.from_numpy(out).view(-1, m)[:n].to(dtype)
    byte = byte.permute(0, 2, 1).contiguous()
    out = torch.empty(rows, 4, per_byte, m, dtype=torch.uint8, device=packed.device)
    for i in range(per_byte):
        torch.bitwise_and(byte >> (bits * i) if i else byte, 2**bits - 1, out=out[:, :, i])
    return out.view(-1, m)[:n].to(dtype)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes [n, m] (each in [0, 2^b)) along dim 0 into int32 [packed_length(n), m]."""
    check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D, got shape {tuple(codes.shape)}")
    n, m = codes.shape
    if codes.numel():
        lo, hi = (int(v) for v in torch.aminmax(codes))
        if lo < 0 or hi >= 2**bits:
            raise ValueError(f"codes out of range for {bits}-bit packing: [{lo}, {hi}]")
    if _bytewise(bits):
        return _pack_rows_bytewise(codes, bits)
    c = codes.to(torch.int64)
    block_codes, block_words = block_shape(bits)
    pad = (-n) % block_codes
    if pad:
        c = torch.cat([c, c.new_zeros(pad, m)])
    c = c.view(-1, block_codes, m)
    out = c.new_zeros(c.shape[0], block_words, m)
    mask = 2**32 - 1
    for i, (word, shift, spill) in enumerate(_field_plan(bits)):
        out[:, word] |= (c[:, i] << shift) & mask
        if spill:
            out[:, word + 1] |= c[:, i] >> (bits - spill)
    return _to_int32(out.view(-1, m))


def unpack_rows(packed: torch.Tensor, bits: int, n: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Inverse of pack_rows: int32 [packed_length(n), m] -> codes [n, m] as int32 (or `dtype`, e.g. uint8)."""
    check_bits(bits)
    if packed.dtype != torch.int32:
        raise ValueError(f"packed tensor must be int32, got {packed.dtype}")
    block_codes, block_words = block_shape(bits)
    if packed.shape[0] != packed_length(n, bits):
        raise ValueError(
            f"packed tensor has {packed.shape[0]} rows, expected {packed_length(n, bits)} for {n} {bits}-bit codes"
        )
    if _bytewise(bits):
        return _unpack_rows_bytewise(packed, n, bits, dtype)
    m = packed.shape[1]
    w = packed.to(torch.int64) & (2**32 - 1)
    w = w.view(-1, block_words, m)
    out = w.new_empty(w.shape[0], block_codes, m)
    low = 2**bits - 1
    for i, (word, shift, spill) in enumerate(_field_plan(bits)):
        v = w[:, word] >> shift
        if spill:
            v = v | (w[:, word + 1] << (bits - spill))
        out[:, i] = v & low
    return out.view(-1, m)[:n].to(dtype)


def pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack along dim 1: codes [m, n] -> int32 [m, packed_length(n)] (qzeros, Marlin zero points)."""
    return pack_rows(codes.t(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    return unpack_rows(packed.t().contiguous(), bits, n).t().contiguous()
