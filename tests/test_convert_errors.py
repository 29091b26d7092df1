"""Broken sources: each defect gives its own clear error (file, tensor, expectation) and leaves no output."""

import json
import re

import pytest
import torch
from click.testing import CliRunner

from convert_sources import autogptq, edit_tensors, float_model, transformers_style, tree_hash
from converters.cli import main
from gptq_vllm.formats.gptq import ZeroFormat

FILE = "gptq_model-4bit-128g.safetensors"


@pytest.fixture(scope="module")
def fl(tmp_path_factory):
    return float_model(tmp_path_factory.getbasetemp())


def truncate(src):
    f = src / FILE
    f.write_bytes(f.read_bytes()[:-1000])


def drop_qzeros(src):
    edit_tensors(src, lambda t: t.pop("model.layers.1.mlp.up_proj.qzeros"))


def wrong_scales_shape(src):
    edit_tensors(src, lambda t: t.update({"model.layers.1.self_attn.q_proj.scales": torch.ones(2, 128, dtype=torch.float16)}))


def nan_scale(src):
    edit_tensors(src, lambda t: t["model.layers.1.self_attn.k_proj.scales"].__setitem__((0, 5), float("nan")))


def bad_g_idx(src):
    def edit(t):
        g = t["model.layers.1.mlp.down_proj.g_idx"]
        g[int((g == 1).nonzero()[0])] = 0  # group 0 now has 129 members, group 1 has 127
    edit_tensors(src, edit)


def mislabel(src):
    cfg = json.loads((src / "quantize_config.json").read_text())
    cfg["checkpoint_format"] = "gptq_v2"  # the data is v1
    (src / "quantize_config.json").write_text(json.dumps(cfg))


DEFECTS = {
    "truncated": (truncate, rf"{FILE}: not a readable safetensors file .*truncated or corrupt"),
    "missing tensor": (drop_qzeros, rf"{FILE}: model.layers.1.mlp.up_proj.qzeros is missing \(expected shape "
                                    r"\(1, 32\) for K=128, N=256, bits=4, group_size=128\)"),
    "shape mismatch": (wrong_scales_shape, rf"{FILE}: model.layers.1.self_attn.q_proj.scales: shape \(2, 128\), "
                                           r"expected \(1, 128\) for K=128, N=128"),
    "nan scale": (nan_scale, rf"{FILE}: model.layers.1.self_attn.k_proj.scales: contains NaN or inf"),
    "non-permutation g_idx": (bad_g_idx, rf"{FILE}: model.layers.1.mlp.down_proj.g_idx: group 0 has 129 members, "
                                         r"expected 128; not a GPTQ act-order assignment"),
    "mislabelled v1/v2": (mislabel, rf"{FILE}: model.layers.0.mlp.down_proj.qzeros: checkpoint says "
                                    r"checkpoint_format='gptq_v2' but its zero points are those of 'gptq'.*"
                                    r"--checkpoint-format gptq"),
}


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_defect_is_named_and_leaves_nothing(fl, tmp_path, defect):
    damage, message = DEFECTS[defect]
    src = autogptq(fl, tmp_path / "src")
    damage(src)
    before = tree_hash(src)
    result = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "dst"), "-q"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and "Traceback" not in result.output
    assert re.search(message, result.output.replace("\n", " ")), result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no DST, no temporary directory
    assert tree_hash(src) == before


def test_mislabel_override_is_accepted(fl, tmp_path):
    src = autogptq(fl, tmp_path / "src")
    mislabel(src)
    result = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "dst"), "-q", "--checkpoint-format", "gptq"])
    assert result.exit_code == 0, result.output


def test_asymmetric_zero_of_zero_cannot_be_v1(fl, tmp_path):
    src = transformers_style(fl, tmp_path / "src", sym=False, zero_format=ZeroFormat.V2)
    # force one zero point of 0, which v1 cannot store
    edit_tensors(src, lambda t: t["model.layers.0.mlp.up_proj.qzeros"][0].__iand__(~0xF))
    result = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "dst"), "-q", "--to", "gptq-v1"])
    assert result.exit_code == 1 and "zero point 0 cannot be stored in GPTQ v1" in result.output, result.output
    assert not (tmp_path / "dst").exists()


def test_inspect_lists_every_problem(fl, tmp_path):
    src = autogptq(fl, tmp_path / "src")
    nan_scale(src)
    bad_g_idx(src)
    result = CliRunner().invoke(main, ["inspect", str(src), "-q"])
    assert result.exit_code == 1
    assert "problems        2" in result.output
    assert "k_proj.scales: contains NaN" in result.output and "down_proj.g_idx: group 0 has 129" in result.output
    result = CliRunner().invoke(main, ["inspect", str(src), "-q", "--json"])
    report = json.loads(result.output)
    assert len(report["problems"]) == 2 and report["modules"] == 14 and report["layers"] == 2
