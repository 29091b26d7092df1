"""The `mygptq` custom ops against the reference matmul, for every layout, bits, sym, act-order and a
row-parallel act-order shard; opcheck of schemas and fake implementations; kernel selection."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import gptq_vllm.kernels.ops  # noqa: F401  (registers torch.ops.mygptq)
from factory import quantize_weight
from gptq_vllm.formats.act_order import act_order_perm
from gptq_vllm.formats.kernel_layout import KernelWeight, Layout, to_kernel
from gptq_vllm.formats.reference import dequantize
from gptq_vllm.kernels import selection


def make_weight(K: int, N: int, bits: int, group_size: int, sym: bool, act_order: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g) * 0.05
    perm = torch.randperm(K, generator=g).to(torch.int32) if act_order else None
    return quantize_weight(W, bits, group_size, sym, perm)


def call(kw: KernelWeight, x: torch.Tensor) -> torch.Tensor:
    if kw.layout is Layout.MARLIN:
        return torch.ops.mygptq.marlin_gemm(x, kw.qweight, kw.scales, kw.qzeros, kw.perm, kw.g_idx_sorted, None, None,
                                            kw.bits, kw.group_size, kw.in_features, kw.out_features)
    return torch.ops.mygptq.exllama_gemm(x, kw.qweight, kw.qzeros, kw.scales, kw.perm, kw.g_idx_sorted, kw.bits,
                                         kw.group_size, kw.in_features, kw.out_features)


def expected(x: torch.Tensor, qw) -> torch.Tensor:
    # Independent of every layout: the canonical weight, dequantized in x's dtype like the kernels do
    # (the kernels take their scales in the activation dtype, so bf16 rounds them first).
    w = dequantize(replace(qw, scales=qw.scales.to(x.dtype)), x.dtype)
    return (x.float() @ w.float()).to(x.dtype)


def assert_matches(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert y.shape == ref.shape and y.dtype == ref.dtype
    # Only the fp32 summation order differs (rows are permuted in the kernel layouts).
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-3, atol=2e-3 * float(ref.abs().max()))


CASES = [  # layout, bits, group_size, sym, act_order, K, N
    (Layout.MARLIN, 4, 128, True, False, 256, 128),
    (Layout.MARLIN, 4, 128, True, True, 256, 192),
    (Layout.MARLIN, 4, -1, False, False, 256, 128),
    (Layout.MARLIN, 4, 32, False, True, 96, 80),  # padded to K 128, N 128
    (Layout.MARLIN, 8, 128, True, True, 256, 64),
    (Layout.MARLIN, 8, 64, False, False, 192, 96),
    (Layout.MARLIN, 2, 64, True, True, 128, 64),
    (Layout.MARLIN, 2, -1, False, False, 64, 32),  # padded to K 128, N 64
    (Layout.MARLIN, 3, 128, True, False, 256, 96),
    (Layout.MARLIN, 3, 32, False, True, 96, 64),  # K padded to 128: two 3-bit units
    (Layout.EXLLAMA, 2, 64, True, True, 128, 64),
    (Layout.EXLLAMA, 2, -1, False, False, 64, 32),
    (Layout.EXLLAMA, 3, 128, True, False, 256, 96),
    (Layout.EXLLAMA, 3, 32, False, True, 96, 64),
    (Layout.EXLLAMA, 4, 128, False, True, 256, 128),
    (Layout.EXLLAMA, 4, -1, True, False, 128, 40),
    (Layout.EXLLAMA, 8, 64, True, False, 128, 64),
    (Layout.EXLLAMA, 8, 32, False, True, 64, 36),
]


@pytest.mark.parametrize("layout, bits, group_size, sym, act_order, K, N", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_op_matches_reference(layout, bits, group_size, sym, act_order, K, N, dtype):
    qw = make_weight(K, N, bits, group_size, sym, act_order)
    kw = to_kernel(qw, layout, scale_dtype=dtype)
    assert (kw.perm is not None) == (act_order and group_size != -1)
    x = torch.randn(5, K, dtype=dtype)
    assert_matches(call(kw, x), expected(x, qw))


@pytest.mark.parametrize("layout, bits", [(Layout.MARLIN, 4), (Layout.MARLIN, 3), (Layout.EXLLAMA, 4)])
@pytest.mark.parametrize("rank", [0, 1])
def test_row_parallel_act_order_shard(layout, bits, rank):
    # TP=2 on K: each rank has half the rows, group ids that are not runs of G, and every group's scales.
    K, N, G = 256, 128, 32
    full = make_weight(K, N, bits, G, sym=False, act_order=True, seed=3)
    rows = slice(rank * K // 2, (rank + 1) * K // 2)
    shard = replace(full, codes=full.codes[rows], g_idx=full.g_idx[rows])
    shard.validate("shard", shard=True)
    kw = to_kernel(shard, layout, scale_dtype=torch.float16)
    assert kw.g_idx_sorted is not None and kw.perm is not None
    x = torch.randn(3, K, dtype=torch.float16)
    assert_matches(call(kw, x[:, rows]), expected(x[:, rows], shard))


def test_op_result_does_not_depend_on_batch_composition():
    qw = make_weight(128, 64, 4, 128, True, True)
    kw = to_kernel(qw, Layout.MARLIN, scale_dtype=torch.float16)
    x = torch.randn(4, 128, dtype=torch.float16)
    torch.testing.assert_close(call(kw, x)[1:2], call(kw, x[1:2]), rtol=0, atol=0)


def _opcheck_args():
    for layout, bits, group_size, sym, act_order, K, N in [CASES[1], CASES[3], CASES[9], CASES[13], CASES[16]]:
        kw = to_kernel(make_weight(K, N, bits, group_size, sym, act_order), layout, scale_dtype=torch.float16)
        yield kw, torch.randn(3, K, dtype=torch.float16)


@pytest.mark.parametrize("kw, x", list(_opcheck_args()))
def test_opcheck(kw, x):
    op = torch.ops.mygptq.marlin_gemm if kw.layout is Layout.MARLIN else torch.ops.mygptq.exllama_gemm
    if kw.layout is Layout.MARLIN:
        args = (x, kw.qweight, kw.scales, kw.qzeros, kw.perm, kw.g_idx_sorted, None, None)
    else:
        args = (x, kw.qweight, kw.qzeros, kw.scales, kw.perm, kw.g_idx_sorted)
    torch.library.opcheck(op.default, args + (kw.bits, kw.group_size, kw.in_features, kw.out_features))


def test_op_traces_with_fullgraph_and_dynamic_batch():
    qw = make_weight(128, 64, 4, 128, True, True)
    kw = to_kernel(qw, Layout.MARLIN, scale_dtype=torch.float16)
    compiled = torch.compile(lambda x: call(kw, x), fullgraph=True, dynamic=True, backend="aot_eager")
    for m in (1, 7):
        x = torch.randn(m, 128, dtype=torch.float16)
        torch.testing.assert_close(compiled(x), call(kw, x), rtol=0, atol=0)


def test_act_order_perm_gathers_activations():
    # The op must apply perm to the activations: dropping it gives a different (wrong) product.
    qw = make_weight(128, 64, 4, 32, True, True)
    kw = to_kernel(qw, Layout.MARLIN, scale_dtype=torch.float16)
    assert not torch.equal(kw.perm, act_order_perm(torch.zeros(128, dtype=torch.int32)))
    x = torch.randn(2, 128, dtype=torch.float16)
    wrong = call(replace(kw, perm=None), x)
    assert not torch.allclose(wrong, expected(x, qw), atol=1e-2)


# ---- selection ---------------------------------------------------------------------------------------------

def select(**kw):
    args = dict(bits=4, group_size=128, in_features=256, out_features=128, row_groups=False, dtype=torch.float16,
                device_type="cuda", name="layer")
    return selection.select(**{**args, **kw})


def test_selection_picks_marlin_for_every_width_and_exllama_for_other_group_sizes():
    assert select().layout is Layout.MARLIN
    assert select(bits=8, group_size=-1).layout is Layout.MARLIN
    assert select(bits=2).layout is Layout.MARLIN
    assert select(bits=3, group_size=32).layout is Layout.MARLIN
    assert select(bits=3, in_features=96).layout is Layout.MARLIN  # padded at load to two 64-row units
    assert select(group_size=256).layout is Layout.EXLLAMA
    assert select(bits=3, group_size=256).layout is Layout.EXLLAMA
    assert select(bits=2, row_groups=True, in_features=64).layout is Layout.EXLLAMA
    # A row-parallel act-order shard cannot be padded, so Marlin needs aligned shapes.
    assert select(row_groups=True).layout is Layout.MARLIN
    assert select(row_groups=True, in_features=64).layout is Layout.EXLLAMA
    assert select(in_features=64).layout is Layout.MARLIN  # padded at load


@pytest.mark.parametrize("kw, message", [
    (dict(dtype=torch.float32), "float32 are not supported on cuda"),
    (dict(device_type="xpu"), "runs on CUDA GPUs and on the CPU"),
])
def test_selection_refuses_with_reason(kw, message):
    with pytest.raises(selection.KernelSelectionError, match=message):
        select(**kw)


def test_fp32_runs_on_the_cpu():
    assert select(dtype=torch.float32, device_type="cpu").layout is Layout.MARLIN


def test_stored_marlin_layout_must_fit_the_rank():
    ok = dict(bits=4, group_size=128, in_features=256, out_features=128, dtype=torch.float16, device_type="cpu",
              name="model.layers.0.mlp.down_proj")
    assert selection.check_stored(Layout.MARLIN, **ok).layout is Layout.MARLIN
    for bits in (2, 3):
        assert selection.check_stored(Layout.MARLIN, **{**ok, "bits": bits}).layout is Layout.MARLIN
    with pytest.raises(selection.KernelSelectionError, match="down_proj: .*K=64.*Serve the GPTQ source"):
        selection.check_stored(Layout.MARLIN, **{**ok, "in_features": 64})
    with pytest.raises(selection.KernelSelectionError,
                       match="converted 3-bit Marlin layout cannot serve group size 256"):
        selection.check_stored(Layout.MARLIN, **{**ok, "bits": 3, "group_size": 256})
    assert selection.check_stored(Layout.EXLLAMA, **{**ok, "in_features": 64}).layout is Layout.EXLLAMA
