"""verify: passes on a faithful conversion and names the module or tensor of every kind of tampering."""

import shutil

import pytest
import torch
from click.testing import CliRunner

from convert_sources import autogptq, edit_tensors, float_model
from converters.checkpoint.convert import convert
from converters.checkpoint.emit import Target, module_tensors
from converters.checkpoint.hub import resolve
from converters.checkpoint.readers import open_checkpoint
from converters.checkpoint.verify import compare_weights
from converters.cli import main
from gptq_vllm.formats.kernel_layout import Layout


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    src = autogptq(float_model(base), base / "verify-src", bits=4, group_size=32)
    convert(resolve(str(src)), base / "verify-dst", progress=False)
    return src, base / "verify-dst"


@pytest.fixture
def tampered(pair, tmp_path):
    shutil.copytree(pair[1], tmp_path / "dst")
    return pair[0], tmp_path / "dst"


def run_verify(src, dst):
    return CliRunner().invoke(main, ["verify", str(src), str(dst), "-q"])


def test_faithful_conversion_verifies(pair):
    result = run_verify(*pair)
    assert result.exit_code == 0, result.output
    assert "OK: 14 quantized modules and 7 other tensors identical, 2 absorbed permutations" in result.output


def test_flipped_code(tampered):
    src, dst = tampered
    edit_tensors(dst, lambda t: t["model.layers.1.self_attn.v_proj.qweight"][3].__ixor__(1 << 4))
    result = run_verify(src, dst)
    assert result.exit_code == 1
    assert "MISMATCH model.layers.1.self_attn.v_proj: weights differ first at input channel" in result.output
    assert "differs from" in result.output and result.output.count("MISMATCH") == 1


def test_changed_scale(tampered):
    src, dst = tampered
    edit_tensors(dst, lambda t: t["model.layers.0.mlp.down_proj.scales"][0].__imul__(1.01))
    result = run_verify(src, dst)
    assert result.exit_code == 1 and "MISMATCH model.layers.0.mlp.down_proj: weights differ" in result.output


def test_dropped_stored_perm(tampered):
    src, dst = tampered
    edit_tensors(dst, lambda t: t.pop("model.layers.0.self_attn.o_proj.perm"))
    result = run_verify(src, dst)
    assert result.exit_code == 1 and "MISMATCH model.layers.0.self_attn.o_proj" in result.output


def test_absorbed_perm_without_permuted_producer(tampered):
    """down_proj stored without perm, but gate_proj left in the original column order: the MLP is wrong."""
    src, dst = tampered
    plain = module_tensors(open_checkpoint(src).load("model.layers.1.mlp.gate_proj"), "model.layers.1.mlp.gate_proj",
                           Target.MYGPTQ, Layout.MARLIN)
    edit_tensors(dst, lambda t: t.update(plain))
    result = run_verify(src, dst)
    assert result.exit_code == 1
    assert "MISMATCH model.layers.1.mlp.gate_proj" in result.output and "up_proj" not in result.output


def test_float_tensor_changed_missing_and_extra(tampered):
    src, dst = tampered

    def edit(t):
        t["model.norm.weight"][0] += 1
        t.pop("lm_head.weight")
        t["model.extra"] = torch.zeros(2)
    edit_tensors(dst, edit)
    result = run_verify(src, dst)
    assert result.exit_code == 1
    for line in ("MISMATCH model.norm.weight: differs", "MISMATCH lm_head.weight: in ", "MISMATCH model.extra: in "):
        assert line in result.output


def test_different_quantization_is_not_the_same_weights(pair, tmp_path_factory, tmp_path):
    other = autogptq(float_model(tmp_path_factory.getbasetemp()), tmp_path / "other", bits=4, group_size=64)
    result = run_verify(pair[0], other)
    assert result.exit_code == 1 and result.output.count("MISMATCH") >= 14


def test_compare_weights_reports_shape():
    from gptq_vllm.formats.act_order import default_g_idx
    from gptq_vllm.formats.gptq import QuantizedWeight

    def qw(K):
        return QuantizedWeight(torch.zeros(K, 64, dtype=torch.int32), torch.ones(1, 64), torch.full((1, 64), 8),
                               default_g_idx(K, -1), 4, -1, True)
    assert compare_weights(qw(128), qw(128)) is None
    assert compare_weights(qw(128), qw(256)) == "shape (K, N) (256, 64), expected (128, 64)"
