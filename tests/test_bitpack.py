"""Bit order of GPTQ packing, against hand-checked words and an independent transcription of AutoGPTQ's loop."""

import pytest
import torch

from gptq_vllm.formats import bitpack


def u32(t: torch.Tensor) -> list[int]:
    return [v & 0xFFFFFFFF for v in t.flatten().tolist()]


def test_4bit_hand_vector():
    codes = torch.arange(8, dtype=torch.int32).view(8, 1)
    assert u32(bitpack.pack_rows(codes, 4)) == [0x76543210]


def test_8bit_hand_vector_high_codes():
    # codes >= 128 must land in bit 24 without overflowing into the sign of an int32 shift.
    codes = torch.tensor([[0x01], [0x80], [0xFF], [0xFE]], dtype=torch.int32)
    packed = bitpack.pack_rows(codes, 8)
    assert packed.dtype == torch.int32
    assert u32(packed) == [0xFEFF8001]
    assert packed.item() < 0


def test_2bit_hand_vector():
    codes = torch.tensor([3, 0, 1, 2] * 4, dtype=torch.int32).view(16, 1)
    assert u32(bitpack.pack_rows(codes, 2)) == [0x93939393]


def autogptq_3bit_words(q: list[int]) -> list[int]:
    """The 10-1-10-1-10 pattern of AutoGPTQ's 3-bit packing, written out field by field (formats.md §1.2)."""
    w0 = sum(q[i] << (3 * i) for i in range(10)) | ((q[10] & 3) << 30)
    w1 = (q[10] >> 2) | sum(q[11 + i] << (1 + 3 * i) for i in range(10)) | ((q[21] & 1) << 31)
    w2 = (q[21] >> 1) | sum(q[22 + i] << (2 + 3 * i) for i in range(10))
    return [w0, w1, w2]


def test_3bit_matches_autogptq_pattern():
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 8, (64, 5), generator=g, dtype=torch.int32)
    packed = bitpack.pack_rows(codes, 3)
    assert packed.shape == (6, 5)
    for n in range(5):
        for block in range(2):
            q = codes[32 * block: 32 * block + 32, n].tolist()
            assert u32(packed[3 * block: 3 * block + 3, n]) == autogptq_3bit_words(q)


def test_3bit_split_fields_carry():
    # Fields 10 and 21 straddle words: value 4 in field 10 puts its top bit in word 1.
    codes = torch.zeros(32, 1, dtype=torch.int32)
    codes[10] = 4
    codes[21] = 7
    assert u32(bitpack.pack_rows(codes, 3)) == [0, 1 | (1 << 31), 3]
    assert torch.equal(bitpack.unpack_rows(bitpack.pack_rows(codes, 3), 3, 32), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 7, 32, 33, 96, 250])
def test_round_trip_rows_and_cols(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (n, 6), generator=g, dtype=torch.int32)
    codes[0] = 2**bits - 1  # edge codes
    codes[-1] = 0
    packed = bitpack.pack_rows(codes, bits)
    assert packed.shape == (bitpack.packed_length(n, bits), 6)
    assert torch.equal(bitpack.unpack_rows(packed, bits, n), codes)
    assert torch.equal(bitpack.unpack_cols(bitpack.pack_cols(codes.t(), bits), bits, n), codes.t())


def test_errors():
    with pytest.raises(ValueError, match="bits must be one of"):
        bitpack.pack_rows(torch.zeros(8, 1, dtype=torch.int32), 5)
    with pytest.raises(ValueError, match="out of range"):
        bitpack.pack_rows(torch.full((8, 1), 16, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="expected 1 for 8 4-bit codes"):
        bitpack.unpack_rows(torch.zeros(2, 1, dtype=torch.int32), 4, 8)
