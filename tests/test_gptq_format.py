"""GPTQ checkpoint tensors: round trips over bits x sym x v1/v2 x group x act-order, zero conventions, g_idx."""

import itertools

import pytest
import torch

from gptq_vllm.formats import act_order, bitpack, gptq
from gptq_vllm.formats.errors import FormatError, ZeroFormatError
from gptq_vllm.formats.gptq import GPTQTensors, ZeroFormat
from gptq_vllm.formats.reference import dequantize, reference_matmul

from factory import random_weight as make_weight


CASES = list(itertools.product([2, 3, 4, 8], [True, False], list(ZeroFormat), [-1, 32, 64, 128], [False, True]))


@pytest.mark.parametrize("bits,sym,fmt,group_size,act", CASES)
def test_round_trip(bits, sym, fmt, group_size, act):
    # v1 cannot hold an asymmetric zero of 0 (tested separately), so its zeros start at 1.
    w = make_weight(bits, group_size, sym, act, zero_min=1 if fmt is ZeroFormat.V1 else 0)
    t = gptq.pack(w, fmt)
    shapes = gptq.expected_shapes(256, 96, bits, group_size)
    assert {k: tuple(getattr(t, k).shape) for k in shapes} == shapes
    back = gptq.unpack(t, bits, group_size, sym, fmt, in_features=256)
    for field in ("codes", "zeros", "g_idx"):
        assert torch.equal(getattr(back, field), getattr(w, field)), field
    assert torch.equal(back.scales, w.scales)
    assert torch.equal(dequantize(back), dequantize(w))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_k_not_multiple_of_a_word(bits):
    w = make_weight(bits, 32, False, False, K=72, N=40, zero_min=0)
    back = gptq.unpack(gptq.pack(w, ZeroFormat.V2), bits, 32, False, ZeroFormat.V2, in_features=72)
    assert torch.equal(back.codes, w.codes) and torch.equal(back.zeros, w.zeros)


# formats.md §1.4: the symmetric zero words of v1 (z-1) and v2 (z).
SYM_WORDS = {
    2: ([0x55555555], [0xAAAAAAAA]),
    3: ([0xDB6DB6DB, 0xB6DB6DB6, 0x6DB6DB6D], [0x24924924, 0x49249249, 0x92492492]),
    4: ([0x77777777], [0x88888888]),
    8: ([0x7F7F7F7F], [0x80808080]),
}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_zero_words(bits):
    zeros = torch.full((2, 96), 2 ** (bits - 1), dtype=torch.int32)
    for fmt, words in zip(ZeroFormat, SYM_WORDS[bits]):
        packed = gptq.encode_zeros(zeros, bits, fmt)
        got = [v & 0xFFFFFFFF for v in packed[0, : len(words)].tolist()]
        assert got == words, fmt
        assert gptq.detect_zero_format(packed, bits, 96) is fmt


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_v1_zero_underflow_refused(bits):
    zeros = torch.full((1, 32), 3, dtype=torch.int32)
    zeros[0, 5] = 0
    with pytest.raises(ZeroFormatError, match="zero point 0 cannot be stored in GPTQ v1"):
        gptq.encode_zeros(zeros, bits, ZeroFormat.V1)


def test_v1_clobbered_word_detected():
    # What AutoGPTQ wrote for an asymmetric zero of 0: -1 as uint32 ORed in, every higher field all ones.
    zeros = torch.tensor([[5, 0, 3, 3, 3, 3, 3, 3]], dtype=torch.int32)
    stored = zeros - 1
    word = 0
    for i, v in enumerate(stored[0].tolist()):
        word |= (v << (4 * i)) & 0xFFFFFFFF
    qzeros = torch.tensor([[word - 2**32 if word >= 2**31 else word]], dtype=torch.int32)
    with pytest.raises(ZeroFormatError, match="group 0, column 1"):
        gptq.decode_zeros(qzeros, 4, 8, ZeroFormat.V1)
    assert gptq.detect_zero_format(qzeros, 4, 8) is ZeroFormat.V2


def test_mislabelled_checkpoint():
    w = make_weight(4, 128, True, False)
    t = gptq.pack(w, ZeroFormat.V2)
    with pytest.raises(ZeroFormatError, match="mislabelled"):
        gptq.check_zero_format(t.qzeros, 4, 96, ZeroFormat.V1, "layer.qzeros")
    gptq.check_zero_format(t.qzeros, 4, 96, ZeroFormat.V2, "layer.qzeros")
    # Read as v1, a v2 symmetric file would silently shift every weight by one step: unpack notices
    # nothing by itself (z = 9 is a legal zero), which is why the check above exists.
    shifted = gptq.unpack(t, 4, 128, False, ZeroFormat.V1)
    assert bool((shifted.zeros == 9).all())


def test_zero_format_parse():
    assert ZeroFormat.parse(None) is ZeroFormat.V1
    assert ZeroFormat.parse("GPTQ_V2") is ZeroFormat.V2
    with pytest.raises(FormatError, match="unknown checkpoint_format"):
        ZeroFormat.parse("marlin")


def test_unpack_rejects_bad_tensors():
    w = make_weight(4, 128, True, False)
    t = gptq.pack(w, ZeroFormat.V1)
    with pytest.raises(FormatError, match=r"layer.qweight: shape \(31, 96\), expected \(32, 96\)"):
        gptq.unpack(GPTQTensors(t.qweight[:31], t.qzeros, t.scales, t.g_idx), 4, 128, True, ZeroFormat.V1,
                    in_features=256, name="layer")
    nan_scales = t.scales.clone()
    nan_scales[1, 3] = float("nan")
    with pytest.raises(FormatError, match="layer.scales: contains NaN"):
        gptq.unpack(GPTQTensors(t.qweight, t.qzeros, nan_scales, t.g_idx), 4, 128, True, ZeroFormat.V1,
                    in_features=256, name="layer")
    with pytest.raises(FormatError, match="layer.qweight: dtype torch.int64"):
        gptq.unpack(GPTQTensors(t.qweight.long(), t.qzeros, t.scales, t.g_idx), 4, 128, True, ZeroFormat.V1,
                    in_features=256, name="layer")


def test_g_idx_invariant():
    K, G = 256, 64
    good = act_order.default_g_idx(K, G)[torch.randperm(K)]
    act_order.check_g_idx(good, K, G)
    bad = good.clone()
    bad[bad == 1] = 0  # group 0 now has 2G members
    with pytest.raises(FormatError, match="group 0 has 128 members, expected 64"):
        act_order.check_g_idx(bad, K, G)
    with pytest.raises(FormatError, match=r"group ids span \[0, 4\]"):
        act_order.check_g_idx(torch.clamp(good + (good == 3).int(), max=4), K, G)
    with pytest.raises(FormatError, match=r"shape \(255,\), expected \(256,\)"):
        act_order.check_g_idx(good[:255], K, G)
    # A short last group is legal when G does not divide K.
    act_order.check_g_idx(act_order.default_g_idx(200, 64), 200, 64)


def test_act_order_perm_sorts_and_identity_when_trivial():
    K, G = 256, 32
    g_idx = act_order.default_g_idx(K, G)[torch.randperm(K)]
    p = act_order.act_order_perm(g_idx)
    assert torch.equal(g_idx[p.long()], act_order.default_g_idx(K, G))
    assert torch.equal(act_order.act_order_perm(act_order.default_g_idx(K, G)), torch.arange(K, dtype=torch.int32))
    assert act_order.is_trivial(act_order.default_g_idx(K, G), G)
    assert not act_order.is_trivial(g_idx, G)
    assert torch.equal(act_order.inverse_perm(p)[p.long()], torch.arange(K, dtype=torch.int32))


def test_dequantize_matches_elementwise_formula():
    w = make_weight(3, 32, False, True, K=64, N=8)
    W = dequantize(w)
    for k in range(0, 64, 7):
        for n in range(8):
            g = int(w.g_idx[k])
            expected = float(w.scales[g, n]) * (int(w.codes[k, n]) - int(w.zeros[g, n]))
            assert W[k, n].item() == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_reference_matmul_equals_permuted_product():
    # y = x @ W == x[:, p] @ W[p]: the identity act-order relies on.
    w = make_weight(4, 64, True, True)
    x = torch.randn(5, 256)
    p = act_order.act_order_perm(w.g_idx).long()
    y = reference_matmul(x, w)
    torch.testing.assert_close(y, x[:, p] @ dequantize(w)[p], rtol=1e-5, atol=1e-5)
    assert bitpack.packed_length(256, 4) == 32
