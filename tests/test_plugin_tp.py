"""The linear method under simulated tensor parallelism, without an engine.

vLLM's own parameter classes slice the checkpoint tensors for a given rank (their TP rank and size are
monkeypatched, the way vLLM's plugin tests do it); the method then converts and runs its op.  Every
rank's output must equal the reference product of that rank's part of the weight: row-parallel ranks
get a slice of K (act-order shards included), column-parallel and merged ranks a slice of N.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("vllm")

import gptq_vllm  # noqa: E402

gptq_vllm.register()
import vllm.model_executor.parameter as vllm_parameter  # noqa: E402

from converters.checkpoint.emit import Target, module_tensors  # noqa: E402
from factory import quantize_weight  # noqa: E402
from gptq_vllm.config import LayerScheme  # noqa: E402
from gptq_vllm.formats import gptq  # noqa: E402
from gptq_vllm.formats.errors import FormatError  # noqa: E402
from gptq_vllm.formats.gptq import ZeroFormat  # noqa: E402
from gptq_vllm.formats.kernel_layout import Layout  # noqa: E402
from gptq_vllm.formats.reference import dequantize  # noqa: E402
from gptq_vllm.linear import MyGPTQLinearMethod  # noqa: E402


def weight(K, N, bits, group_size, sym, perm, seed=0):
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * 0.05
    return quantize_weight(W, bits, group_size, sym, perm)


def checkpoint(qw, prefix: str, scheme: LayerScheme) -> dict[str, torch.Tensor]:
    if scheme.is_kernel_layout:
        return module_tensors(qw, prefix, Target.MYGPTQ, scheme.layout)
    return gptq.pack(qw, scheme.zero_format).as_dict(prefix)


def load_rank(monkeypatch, scheme, modules: dict[str, object], rank: int, tp: int, row_parallel: bool):
    """Build the layer of one rank like vLLM does and feed it the checkpoint tensors of `modules`."""
    monkeypatch.setattr(vllm_parameter, "get_tensor_model_parallel_rank", lambda: rank)
    monkeypatch.setattr(vllm_parameter, "get_tensor_model_parallel_world_size", lambda: tp)
    names = list(modules)
    K = next(iter(modules.values())).in_features
    sizes = [qw.out_features for qw in modules.values()]

    def loader(param, loaded, shard_id=None):
        # The dispatch of vLLM's RowParallelLinear / MergedColumnParallelLinear.weight_loader_v2.
        if row_parallel:
            param.load_row_parallel_weight(loaded)
        elif len(names) == 1:
            param.load_column_parallel_weight(loaded)
        else:
            param.load_merged_column_weight(loaded_weight=loaded, shard_id=shard_id,
                                            shard_offset=sum(sizes[:shard_id]) // tp, shard_size=sizes[shard_id] // tp)

    layer = torch.nn.Module()
    method = MyGPTQLinearMethod(scheme, "layer", names)
    k_part = K // tp if row_parallel else K
    parts = sizes if row_parallel else [n // tp for n in sizes]
    method.create_weights(layer, k_part, parts, K, sum(sizes), torch.float16, weight_loader=loader)
    for i, (name, qw) in enumerate(modules.items()):
        for key, t in checkpoint(qw, name, scheme).items():
            param = getattr(layer, key.rsplit(".", 1)[1])
            param.weight_loader(param, t, *([i] if len(names) > 1 else []))
    method.process_weights_after_loading(layer)
    return layer, method


def expected(x, qw, rows=slice(None), cols=slice(None)):
    w = dequantize(qw, torch.float16)[rows, cols]
    return (x.float() @ w.float()).to(torch.float16)


def assert_matches(y, ref):
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-3, atol=2e-3 * float(ref.abs().max()))


def gptq_scheme(bits, group_size, sym, desc_act, fmt=ZeroFormat.V2):
    return LayerScheme(bits, group_size, sym, desc_act, fmt, None)


ROW_CASES = [  # bits, group_size, sym, act_order, K, tp, layout the rank must run
    (4, 32, True, True, 256, 2, Layout.MARLIN),  # act-order shard, aligned: Marlin with g_idx_sorted
    (4, 32, False, True, 256, 4, Layout.EXLLAMA),  # act-order shard of 64 rows: no padding, ExLlama
    (8, 64, True, False, 256, 2, Layout.MARLIN),  # scales sharded along K
    (4, 128, True, False, 256, 4, Layout.EXLLAMA),  # a group straddles the ranks: every group's scales
    (4, -1, False, False, 256, 2, Layout.MARLIN),  # one group: replicated scales
    (3, 64, False, True, 256, 2, Layout.MARLIN),  # 3-bit act-order shard of 128 rows: two Marlin units
    (3, 64, False, True, 256, 4, Layout.EXLLAMA),  # 64 rows: no padding, ExLlama
    (2, 32, True, False, 256, 2, Layout.MARLIN),
]


@pytest.mark.parametrize("bits, group_size, sym, act_order, K, tp, layout", ROW_CASES)
def test_row_parallel_gptq(monkeypatch, bits, group_size, sym, act_order, K, tp, layout):
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(1)).to(torch.int32) if act_order else None
    qw = weight(K, 128, bits, group_size, sym, perm)
    x = torch.randn(3, K, dtype=torch.float16)
    for rank in range(tp):
        layer, method = load_rank(monkeypatch, gptq_scheme(bits, group_size, sym, act_order), {"down_proj": qw},
                                  rank, tp, row_parallel=True)
        assert method.gemm.layout is layout
        rows = slice(rank * K // tp, (rank + 1) * K // tp)
        assert_matches(method.apply(layer, x[:, rows]), expected(x[:, rows], qw, rows=rows))


@pytest.mark.parametrize("act_order", [False, True])
def test_merged_column_parallel_gptq(monkeypatch, act_order):
    K, N, tp = 128, 128, 2
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(2)).to(torch.int32) if act_order else None
    gate, up = weight(K, N, 4, 64, False, perm, seed=1), weight(K, N, 4, 64, False, perm, seed=2)
    x = torch.randn(2, K, dtype=torch.float16)
    for rank in range(tp):
        layer, method = load_rank(monkeypatch, gptq_scheme(4, 64, False, act_order),
                                  {"gate_proj": gate, "up_proj": up}, rank, tp, row_parallel=False)
        cols = slice(rank * N // tp, (rank + 1) * N // tp)
        ref = torch.cat([expected(x, gate, cols=cols), expected(x, up, cols=cols)], dim=1)
        assert_matches(method.apply(layer, x), ref)


@pytest.mark.parametrize("layout, bits, sym", [(Layout.MARLIN, 4, True), (Layout.MARLIN, 4, False),
                                              (Layout.EXLLAMA, 4, False), (Layout.MARLIN, 3, True),
                                              (Layout.MARLIN, 3, False), (Layout.MARLIN, 2, False),
                                              (Layout.EXLLAMA, 3, True)])
def test_converted_checkpoint_row_and_column_parallel(monkeypatch, layout, bits, sym):
    K, N, tp = 256, 128, 2
    scheme = LayerScheme(bits, 128, sym, False, None, layout)
    qw = weight(K, N, bits, 128, sym, None)
    x = torch.randn(2, K, dtype=torch.float16)
    for rank in range(tp):
        # K per rank == group size: the Marlin scales need the single-group permutation there.
        layer, method = load_rank(monkeypatch, scheme, {"down_proj": qw}, rank, tp, row_parallel=True)
        rows = slice(rank * K // tp, (rank + 1) * K // tp)
        assert_matches(method.apply(layer, x[:, rows]), expected(x[:, rows], qw, rows=rows))
        gate, up = weight(K, N, bits, 128, sym, None, seed=5), weight(K, N, bits, 128, sym, None, seed=6)
        layer, method = load_rank(monkeypatch, scheme, {"gate_proj": gate, "up_proj": up}, rank, tp,
                                  row_parallel=False)
        cols = slice(rank * N // tp, (rank + 1) * N // tp)
        ref = torch.cat([expected(x, gate, cols=cols), expected(x, up, cols=cols)], dim=1)
        assert_matches(method.apply(layer, x), ref)


@pytest.mark.parametrize("bits, tp, message", [
    (3, 4, r"layer: this rank's part of the layer \(K=32, N parts \[128\]\) does not align with the 3-bit Marlin "
           r"unit of qweight \(64 x 64\): K must be a multiple of 64"),
    (2, 8, r"K=16, .*the 2-bit Marlin unit of qweight \(32 x 64\): K must be a multiple of 32"),
    (4, 16, r"K=8, .*the 4-bit Marlin tile of qweight \(16 x 64\): K must be a multiple of 16"),
])
def test_converted_marlin_row_shard_must_be_whole_units(monkeypatch, bits, tp, message):
    scheme = LayerScheme(bits, -1, True, False, None, Layout.MARLIN)
    with pytest.raises(ValueError, match=message):
        load_rank(monkeypatch, scheme, {"down_proj": weight(128, 128, bits, -1, True, None)}, 0, tp, row_parallel=True)


def test_converted_act_order_perm_loads_column_parallel_and_refuses_row_parallel(monkeypatch):
    K, N = 256, 128
    scheme = LayerScheme(4, 128, True, True, None, Layout.MARLIN)
    qw = weight(K, N, 4, 128, True, torch.randperm(K, generator=torch.Generator().manual_seed(4)).to(torch.int32))
    x = torch.randn(2, K, dtype=torch.float16)
    layer, method = load_rank(monkeypatch, scheme, {"o_proj": qw}, 0, 1, row_parallel=False)
    assert layer.perm is not None
    assert_matches(method.apply(layer, x), expected(x, qw))
    with pytest.raises(FormatError, match="o_proj.perm|layer.perm: .*cannot be split across tensor-parallel ranks"):
        load_rank(monkeypatch, scheme, {"o_proj": qw}, 0, 2, row_parallel=True)


def test_mislabelled_desc_act_is_caught_on_a_row_parallel_rank(monkeypatch):
    K = 256
    qw = weight(K, 128, 4, 64, True, torch.randperm(K, generator=torch.Generator().manual_seed(7)).to(torch.int32))
    with pytest.raises(FormatError, match="g_idx: not k // group_size although the config says desc_act=false"):
        load_rank(monkeypatch, gptq_scheme(4, 64, True, False), {"down_proj": qw}, 1, 2, row_parallel=True)


def test_missing_g_idx_without_act_order_is_implied(monkeypatch):
    qw = weight(128, 64, 4, 32, True, None)
    scheme = gptq_scheme(4, 32, True, False, ZeroFormat.V1)
    original = checkpoint

    def without_g_idx(q, prefix, s):
        return {k: v for k, v in original(q, prefix, s).items() if not k.endswith(".g_idx")}

    monkeypatch.setattr(__import__(__name__), "checkpoint", without_g_idx)
    layer, method = load_rank(monkeypatch, scheme, {"q_proj": qw}, 0, 1, row_parallel=False)
    x = torch.randn(2, 128, dtype=torch.float16)
    assert_matches(method.apply(layer, x), expected(x, replace(qw)))
