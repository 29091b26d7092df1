"""Kernel layouts (Marlin, ExLlama), compressed-tensors and the kernel-layout round trip.

Each layout is checked against its inverse AND against an element-by-element formula written here
independently from formats.md (§4.1, §4.3, §5, §6), so a symmetric mistake in pack and unpack is caught.
"""

import itertools

import pytest
import torch

from gptq_vllm.formats import act_order, bitpack, compressed_tensors, exllama, gptq, kernel_layout, marlin
from gptq_vllm.formats.errors import FormatError
from gptq_vllm.formats.gptq import QuantizedWeight, ZeroFormat
from gptq_vllm.formats.kernel_layout import Layout
from gptq_vllm.formats.reference import dequantize

from factory import random_weight as make_weight


def u32(v: int) -> int:
    return v & 0xFFFFFFFF


def marlin_formula(Q: torch.Tensor, bits: int) -> torch.Tensor:
    """formats.md §4.1, loop by loop: out[kt, ...] for tile (kt, nt), warp w, lane t."""
    K, N = Q.shape
    words = torch.zeros(K // 16, N * 16 * bits // 32, dtype=torch.int64)
    for kt in range(K // 16):
        for nt in range(N // 64):
            for w in range(4):
                for t in range(32):
                    c = 64 * nt + 16 * w + t // 4
                    r = 16 * kt + 2 * (t % 4)
                    if bits == 4:
                        nibs = [Q[r, c], Q[r + 8, c], Q[r, c + 8], Q[r + 8, c + 8],
                                Q[r + 1, c], Q[r + 9, c], Q[r + 1, c + 8], Q[r + 9, c + 8]]
                        words[kt, 128 * nt + 4 * t + w] = sum(int(v) << (4 * i) for i, v in enumerate(nibs))
                    else:
                        lo = [Q[r, c], Q[r + 8, c], Q[r + 1, c], Q[r + 9, c]]
                        hi = [Q[r, c + 8], Q[r + 8, c + 8], Q[r + 1, c + 8], Q[r + 9, c + 8]]
                        words[kt, 256 * nt + 8 * t + 2 * w] = sum(int(v) << (8 * i) for i, v in enumerate(lo))
                        words[kt, 256 * nt + 8 * t + 2 * w + 1] = sum(int(v) << (8 * i) for i, v in enumerate(hi))
    return words


@pytest.mark.parametrize("bits", [4, 8])
def test_marlin_matches_element_formula(bits):
    g = torch.Generator().manual_seed(bits)
    Q = torch.randint(0, 2**bits, (32, 128), generator=g, dtype=torch.int32)
    packed = marlin.pack(Q, bits)
    expected = marlin_formula(Q, bits)
    assert [u32(v) for v in packed.flatten().tolist()] == expected.flatten().tolist()


@pytest.mark.parametrize("bits,with_perm", list(itertools.product([4, 8], [False, True])))
def test_marlin_repack_from_gptq_and_inverse(bits, with_perm):
    g = torch.Generator().manual_seed(10 + bits)
    K, N = 256, 192
    codes = torch.randint(0, 2**bits, (K, N), generator=g, dtype=torch.int32)
    qweight = bitpack.pack_rows(codes, bits)
    perm = torch.randperm(K, generator=g).to(torch.int32) if with_perm else None
    words = marlin.repack_gptq(qweight, bits, K, perm)
    assert words.shape == (K // 16, N * 16 * bits // 32)
    expected_rows = codes if perm is None else codes[perm.long()]
    assert torch.equal(marlin.unpack(words, bits, K, N), expected_rows)


def test_marlin_shape_errors():
    with pytest.raises(FormatError, match="4- or 8-bit"):
        marlin.pack(torch.zeros(16, 64, dtype=torch.int32), 3)
    with pytest.raises(FormatError, match="N % 64 == 0"):
        marlin.pack(torch.zeros(16, 96, dtype=torch.int32), 4)


def test_marlin_scale_permutation_formula():
    # Grouped: an 8x8 transpose inside each run of 64 columns; single group: the (0,1,8,9,...) order.
    s = torch.arange(2 * 128, dtype=torch.float32).view(2, 128)
    grouped = marlin.permute_scales(s, 64, 256)
    for col in range(128):
        run, j = divmod(col, 64)
        a, b = divmod(j, 8)
        assert grouped[0, col] == s[0, 64 * run + a + 8 * b]
    single = marlin.permute_scales(s[:1], -1, 256)
    order = [2 * i + j for i in range(4) for j in (0, 1, 8, 9, 16, 17, 24, 25)]
    for col in range(128):
        run, j = divmod(col, 32)
        assert single[0, col] == s[0, 32 * run + order[j]]
    # group_size == K is a single group too (formats.md §4.3 edge case).
    assert torch.equal(marlin.permute_scales(s[:1], 128, 128), single)
    assert torch.equal(marlin.unpermute_scales(grouped, 64, 256), s)
    assert torch.equal(marlin.unpermute_scales(single, -1, 256), s[:1])


@pytest.mark.parametrize("bits", [4, 8])
def test_marlin_zero_points(bits):
    g = torch.Generator().manual_seed(bits)
    z = torch.randint(0, 2**bits, (3, 128), generator=g, dtype=torch.int32)
    packed = marlin.pack_zeros(z, bits)
    assert packed.shape == (3, 128 * bits // 32)
    assert torch.equal(marlin.unpack_zeros(packed, bits, 128), z)
    # Independent: transpose inside 64-runs, then interleave fields within each packed word.
    il = [0, 2, 4, 6, 1, 3, 5, 7] if bits == 4 else [0, 2, 1, 3]
    pf = 32 // bits
    for col in range(0, 128, 13):
        word, field = divmod(col, pf)
        src_in_run = word * pf + il[field]
        run, j = divmod(src_in_run, 64)
        a, b = divmod(j % 64, 8)
        expected = int(z[1, 64 * run + a + 8 * b])
        assert (u32(int(packed[1, word])) >> (bits * field)) & (2**bits - 1) == expected


def exllama_formula(codes: torch.Tensor, bits: int) -> list[list[int]]:
    """formats.md §5 per word (column 0 only)."""
    col = [int(v) for v in codes[:, 0]]
    out = []
    if bits in (2, 4):
        pf = 32 // bits
        order = list(range(0, pf, 2)) + list(range(1, pf, 2))
        for r in range(len(col) // pf):
            block = col[r * pf:(r + 1) * pf]
            out.append([sum(block[order[j]] << (bits * j) for j in range(pf))])
    elif bits == 3:
        for r in range(len(col) // 32):
            v = col[r * 32:(r + 1) * 32]
            words = []
            for j in range(3):
                w = 0
                for i in range(5):
                    w |= v[10 * j + 2 * i] << (3 * i)
                    w |= v[10 * j + 2 * i + 1] << (16 + 3 * i)
                w |= ((v[30] >> j) & 1) << 15
                w |= ((v[31] >> j) & 1) << 31
                words.append(w)
            out.append(words)
    else:
        for r in range(len(col) // 4):
            out.append([sum(col[4 * r + i] << (8 * i) for i in range(4))])
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_exllama_shuffle_formula_and_inverse(bits):
    g = torch.Generator().manual_seed(bits)
    K = 64
    codes = torch.randint(0, 2**bits, (K, 4), generator=g, dtype=torch.int32)
    shuffled = exllama.shuffle_codes(codes, bits)
    flat = [u32(v) for v in shuffled[:, 0].tolist()]
    expected = [w for words in exllama_formula(codes, bits) for w in words]
    assert flat == expected
    assert torch.equal(exllama.unshuffle_codes(shuffled, bits, K), codes)
    # With a perm (vLLM's make_sequential): rows are reordered first.
    qweight = bitpack.pack_rows(codes, bits)
    perm = torch.randperm(K, generator=g).to(torch.int32)
    assert torch.equal(exllama.shuffle(qweight, bits, K, perm), exllama.shuffle_codes(codes[perm.long()], bits))
    assert torch.equal(exllama.unshuffle(exllama.shuffle(qweight, bits, K), bits, K), qweight)


@pytest.mark.parametrize("bits,sym,act", list(itertools.product([2, 4, 8], [True, False], [False, True])))
def test_compressed_tensors_round_trip(bits, sym, act):
    w = make_weight(bits, 64, sym, act)
    t = compressed_tensors.to_tensors(w, "m")
    assert torch.equal(t["m.weight_packed"], gptq.pack(w, ZeroFormat.V2).qweight.t())
    assert ("m.weight_zero_point" in t) == (not sym)
    assert ("m.weight_g_idx" in t) == act
    back = compressed_tensors.from_tensors(t, "m", bits, 64, sym)
    assert torch.equal(back.codes, w.codes) and torch.equal(back.zeros, w.zeros) and torch.equal(back.g_idx, w.g_idx)


def test_compressed_tensors_errors():
    w = make_weight(3, 64, True, False)
    with pytest.raises(FormatError, match="not 3-bit"):
        compressed_tensors.to_tensors(w, "m")
    t = compressed_tensors.to_tensors(make_weight(4, 64, True, False), "m")
    t["m.weight_scale"] = t["m.weight_scale"][:, :2]
    with pytest.raises(FormatError, match=r"m.weight_scale: shape \(96, 2\), expected \(96, 4\)"):
        compressed_tensors.from_tensors(t, "m", 4, 64, True)


LAYOUT_CASES = [
    (bits, layout, sym, G, act, K, N)
    for bits, layout in [(4, Layout.MARLIN), (8, Layout.MARLIN), (2, Layout.EXLLAMA), (3, Layout.EXLLAMA),
                         (4, Layout.EXLLAMA), (8, Layout.EXLLAMA)]
    for sym, G, act, (K, N) in [(True, 128, False, (256, 192)), (False, 32, True, (256, 128)),
                                (True, -1, False, (200, 100)), (False, 64, False, (192, 72)),
                                (True, 64, True, (384, 64))]
]


@pytest.mark.parametrize("bits,layout,sym,G,act,K,N", LAYOUT_CASES)
def test_kernel_layout_round_trip(bits, layout, sym, G, act, K, N):
    w = make_weight(bits, G, sym, act, K=K, N=N)
    kw = kernel_layout.to_kernel(w, layout)
    assert (kw.perm is not None) == (act and G != -1)
    if layout is Layout.MARLIN:
        kp, np_ = marlin.padded_shape(K, N, G)
        assert kw.qweight.shape == (kp // 16, np_ * 16 * bits // 32)
        assert kw.scales.shape[1] == np_
    back = kernel_layout.from_kernel(kw)
    assert torch.equal(back.codes, w.codes) and torch.equal(back.g_idx, w.g_idx)
    assert torch.equal(dequantize(back), dequantize(w))


def test_marlin_padding_dequantizes_to_zero():
    w = make_weight(4, 64, False, False, K=200, N=100)
    padded = marlin.pad(w, 256, 128)
    W = dequantize(padded)
    assert torch.equal(W[:200, :100], dequantize(w))
    assert not W[200:].any() and not W[:, 100:].any()
    act_order.check_g_idx(padded.g_idx, 256, 64)


@pytest.mark.parametrize("N", [64, 100])
def test_row_parallel_act_order_shard_keeps_global_groups(N):
    # A TP rank of a row-parallel act-order layer: half of K, global group ids, every group's scales.
    full = make_weight(4, 32, True, True, K=256, N=N)
    rows = torch.arange(128, 256)
    shard = QuantizedWeight(full.codes[rows], full.scales, full.zeros, full.g_idx[rows], 4, 32, True)
    shard.validate(shard=True)
    kw = kernel_layout.to_kernel(shard, Layout.MARLIN)
    assert kw.g_idx_sorted is not None and bool((kw.g_idx_sorted[1:] >= kw.g_idx_sorted[:-1]).all())
    back = kernel_layout.from_kernel(kw)
    assert torch.equal(dequantize(back), dequantize(shard))
