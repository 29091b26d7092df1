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
    with pytest.raises(FormatError, match="holds 2, 3, 4, 8-bit codes, not 5-bit"):
        marlin.pack(torch.zeros(16, 64, dtype=torch.int32), 5)
    with pytest.raises(FormatError, match="N % 64 == 0"):
        marlin.pack(torch.zeros(16, 96, dtype=torch.int32), 4)
    # 2/3 bit: whole units of 32 / 64 rows.
    with pytest.raises(FormatError, match=r"3-bit Marlin layout needs K % 64 == 0 and N % 64 == 0, got K=96"):
        marlin.pack(torch.zeros(96, 64, dtype=torch.int32), 3)
    with pytest.raises(FormatError, match=r"2-bit Marlin layout needs K % 32 == 0 and N % 64 == 0, got K=48"):
        marlin.pack(torch.zeros(48, 64, dtype=torch.int32), 2)
    with pytest.raises(FormatError, match=r"3-bit Marlin layout needs K % 64 == 0"):
        marlin.unpack(torch.zeros(1, 6 * 64, dtype=torch.int32), 3, 32, 64)
    with pytest.raises(FormatError, match=r"shape \(2, 128\) torch.int32, expected \(1, 128\) int32"):
        marlin.unpack(torch.zeros(2, 128, dtype=torch.int32), 2, 32, 64)


# ---- 2/3-bit Marlin units -----------------------------------------------------------------------------------

def marlin_unit_formula(Q: torch.Tensor, bits: int) -> torch.Tensor:
    """The 2/3-bit unit layout element by element, from the rules in marlin.py's docstring (not UNIT_MAP):
    each code goes to its unit, lane, lane word and bits; unit words are chunk-major."""
    K, N = Q.shape
    U, C = {2: (2, 1), 3: (4, 3)}[bits]
    rows = 16 * U
    words = torch.zeros(K // rows, N * U * bits // 2, dtype=torch.int64)
    for k in range(K):
        for n in range(N):
            code = int(Q[k, n])
            ku, v, kk = k // rows, k % rows // 16, k % 16  # unit row, k-tile of the unit, row in the k-tile
            nt, nn = divmod(n, 64)
            b, tig, h = kk // 8, kk % 8 // 2, kk % 2  # kk = 2*tig + 8*b + h
            s, gid = divmod(nn, 8)  # nn = 8*s + gid
            t, p = 4 * gid + tig, 2 * s + b

            def put(lane_word: int, value: int, bit: int) -> None:
                c, j = divmod(lane_word, 4)  # lane word i = 4*c + j: chunk c, word j
                words[ku, 128 * C * nt + 4 * (32 * c + t) + j] |= value << bit

            g, f = divmod(p, 4)  # 3-bit: pair group g (lane words 4*c + g), pair f of the group
            if bits == 2:
                put(2 * v + p // 8, code, 2 * (p % 8) + 16 * h)
            elif v < 3:
                put(4 * v + g, code, 3 * f + 16 * h)
            elif f < 3:
                put(4 * f + g, code, 12 + 16 * h)
            else:
                for c in range(3):
                    put(4 * c + g, (code >> c) & 1, 15 + 16 * h)
    return words


@pytest.mark.parametrize("bits", [2, 3])
def test_marlin_units_match_element_formula(bits):
    g = torch.Generator().manual_seed(20 + bits)
    Q = torch.randint(0, 2**bits, (128, 128), generator=g, dtype=torch.int32)
    packed = marlin.pack(Q, bits)
    assert packed.shape == {2: (4, 256), 3: (2, 768)}[bits]  # [K/32, 2N], [K/64, 6N]
    assert [u32(v) for v in packed.flatten().tolist()] == marlin_unit_formula(Q, bits).flatten().tolist()


@pytest.mark.parametrize("bits", [2, 3])
def test_marlin_unit_uses_every_bit(bits):
    words = marlin.pack(torch.full((64, 64), 2**bits - 1, dtype=torch.int32), bits)
    assert bool((words == -1).all())


@pytest.mark.parametrize("bits, k, n, expected", [
    # Lane t = 4*gid + tig holds rows 2*tig + 8*b + h, column 8*s + gid of each k-tile.  Unit word 4*(32*c + t) + j.
    (2, 0, 0, [(0, 0)]),  # lane 0, k-tile 0, pair 0, h = 0: lane word 0 = chunk 0 word 0, bit 0
    (2, 9, 63, [(4 * 28 + 1, 2 * 7 + 16)]),  # row 9: tig 0, b 1, h 1; column 63: s 7, gid 7 -> lane 28, pair 15
    (2, 16 + 1, 8 * 5 + 2, [(4 * 8 + 3, 2 * (10 % 8) + 16)]),  # k-tile 1, lane 8, pair 10 -> lane word 2 + 1
    # 3-bit: lane word 4*c + g holds pair group g (pairs 4g .. 4g + 3); k-tile v < 3 in c = v, k-tile 3 at bit 12 + spread.
    (3, 0, 16, [(1, 0)]),  # k-tile 0, lane 0, pair 4 = group 1, f 0: lane word 1 = chunk 0, word 1, bit 0
    (3, 16 + 2, 1, [(4 * (32 + 5), 0)]),  # k-tile 1, lane 5, pair 0: lane word 4 -> chunk 1, word 0
    (3, 32 + 2, 1, [(4 * (64 + 5), 0)]),  # k-tile 2: lane word 8 -> chunk 2, word 0
    (3, 8, 8 * 7, [(3, 9)]),  # k-tile 0, lane 0, pair 15 = group 3, f 3: lane word 3, bit 9
    # k-tile 3, lane 15, pair 13 (group 3, f 1): lane word 4 + 3 = chunk 1, word 3, bit 12, h 1.
    (3, 48 + 8 + 7, 8 * 6 + 3, [(4 * (32 + 15) + 3, 12 + 16)]),
    # k-tile 3, lane 0, pair 3 (group 0, f 3), h 0: code bit c at bit 15 of lane word 4c = chunk c, word 0.
    (3, 48 + 8, 8, [(0, 15), (4 * 32, 15), (4 * 64, 15)]),
    # k-tile 3, lane 31, pair 15, h 1: lane words 3, 7, 11 = chunks 0, 1, 2, word 3, bit 31.
    (3, 48 + 15, 8 * 7 + 7, [(4 * 31 + 3, 31), (4 * (32 + 31) + 3, 31), (4 * (64 + 31) + 3, 31)]),
])
def test_marlin_unit_word_order_is_chunk_major(bits, k, n, expected):
    """One code of one unit: the words (chunk-major) and bits it lands in, worked out by hand."""
    Q = torch.zeros(64, 128, dtype=torch.int32)
    Q[k, n] = 2**bits - 1
    words = marlin.pack(Q, bits)
    assert words.shape[0] == 64 // (16 * marlin.UNIT_TILES[bits])
    nonzero = {(int(i), u32(int(words.view(-1)[i]))) for i in torch.nonzero(words.view(-1)).flatten()}
    width = bits if len(expected) == 1 else 1
    assert nonzero == {(word, (2**width - 1) << bit) for word, bit in expected}


@pytest.mark.parametrize("bits, K, N", [(2, 32, 64), (2, 96, 192), (2, 256, 128), (3, 64, 64), (3, 192, 128),
                                        (3, 320, 192)])
@pytest.mark.parametrize("with_perm", [False, True])
def test_marlin_units_round_trip(bits, K, N, with_perm, monkeypatch):
    # Blocks of 2 units' rows: the block loop of pack/unpack is exercised on these small weights too.
    monkeypatch.setattr(marlin, "_UNIT_BLOCK_CODES", 2 * marlin.unit_rows(bits) * N)
    g = torch.Generator().manual_seed(K + N + bits)
    codes = torch.randint(0, 2**bits, (K, N), generator=g, dtype=torch.int32)
    perm = torch.randperm(K, generator=g).to(torch.int32) if with_perm else None
    words = marlin.repack_gptq(bitpack.pack_rows(codes, bits), bits, K, perm)
    U = marlin.UNIT_TILES[bits]
    assert words.shape == marlin.qweight_shape(K, N, bits) == (K // (16 * U), N * U * bits // 2)
    assert marlin.stored_rows(words, bits) == K
    expected_rows = codes if perm is None else codes[perm.long()]
    assert torch.equal(marlin.unpack(words, bits, K, N), expected_rows)
    assert torch.equal(words, marlin.pack(expected_rows.to(torch.uint8), bits))


@pytest.mark.parametrize("bits", [2, 3])
def test_marlin_zero_points_of_2_and_3_bit_use_the_4_bit_packing(bits):
    assert marlin.ZERO_BITS[bits] == 4
    z = torch.randint(0, 2**bits, (2, 128), generator=torch.Generator().manual_seed(bits), dtype=torch.int32)
    packed = marlin.pack_zeros(z, marlin.ZERO_BITS[bits])
    assert packed.shape == (2, 128 // 8) and torch.equal(packed, marlin.pack_zeros(z, 4))
    assert torch.equal(marlin.unpack_zeros(packed, 4, 128), z)


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
    for bits, layout in [(2, Layout.MARLIN), (3, Layout.MARLIN), (4, Layout.MARLIN), (8, Layout.MARLIN),
                         (2, Layout.EXLLAMA), (3, Layout.EXLLAMA), (4, Layout.EXLLAMA), (8, Layout.EXLLAMA)]
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
        # 4/8 bit: [K/16, N*b/2]; 2 bit: units of 32 rows [K/32, 2N]; 3 bit: units of 64 rows [K/64, 6N].
        assert kw.qweight.shape == {2: (kp // 32, 2 * np_), 3: (kp // 64, 6 * np_), 4: (kp // 16, 2 * np_),
                                    8: (kp // 16, 4 * np_)}[bits]
        assert kw.scales.shape[1] == np_
        assert kw.qzeros is None if sym else kw.qzeros.shape == (kw.scales.shape[0], np_ * (4 if bits < 8 else 8) // 32)
        assert kernel_layout.expected_shapes(layout, bits, G, sym, kp, np_)["qweight"] == tuple(kw.qweight.shape)
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
@pytest.mark.parametrize("bits", [3, 4])
def test_row_parallel_act_order_shard_keeps_global_groups(N, bits):
    # A TP rank of a row-parallel act-order layer: half of K, global group ids, every group's scales.
    full = make_weight(bits, 32, True, True, K=256, N=N)
    rows = torch.arange(128, 256)
    shard = QuantizedWeight(full.codes[rows], full.scales, full.zeros, full.g_idx[rows], bits, 32, True)
    shard.validate(shard=True)
    kw = kernel_layout.to_kernel(shard, Layout.MARLIN)
    assert kw.g_idx_sorted is not None and bool((kw.g_idx_sorted[1:] >= kw.g_idx_sorted[:-1]).all())
    back = kernel_layout.from_kernel(kw)
    assert torch.equal(dequantize(back), dequantize(shard))
