"""Readers: every source dialect is recognised, its modules decode to the weights that were written."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from convert_sources import autogptq, compressed, float_model, gptqmodel, shard, transformers_style
from converters.checkpoint.hub import SourceError, resolve
from converters.checkpoint.readers import open_checkpoint
from factory import write_gptq
from gptq_vllm.formats.errors import FormatError
from gptq_vllm.formats.gptq import ZeroFormat
from gptq_vllm.formats.reference import dequantize


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.getbasetemp()


@pytest.fixture(scope="module")
def fl(base):
    return float_model(base)


def test_autogptq_thebloke_file_name(fl, tmp_path):
    src = autogptq(fl, tmp_path / "src")
    assert (src / "gptq_model-4bit-128g.safetensors").exists() and not (src / "config.json").read_text().count("quantization_config")
    ckpt = open_checkpoint(src)
    assert ckpt.config.dialect == "autogptq" and ckpt.config.zero_format is ZeroFormat.V1
    assert [f.name for f in ckpt.tensors.files] == ["gptq_model-4bit-128g.safetensors"]
    assert len(ckpt.modules()) == 14 and "model.embed_tokens.weight" in ckpt.passthrough()
    w = ckpt.load("model.layers.0.mlp.down_proj")
    assert (w.bits, w.group_size, w.sym, tuple(w.codes.shape)) == (4, 128, True, (256, 128))
    assert ckpt.describe()["zero_format_in_data"] == {"gptq": 1}


def test_model_file_base_name_wins(fl, tmp_path):
    src = autogptq(fl, tmp_path / "src", file_name="weights.safetensors")
    cfg = json.loads((src / "quantize_config.json").read_text())
    cfg["model_file_base_name"] = "weights"
    (src / "quantize_config.json").write_text(json.dumps(cfg))
    shutil.copy(src / "weights.safetensors", src / "stale-copy.safetensors")  # would clash if globbed
    assert [f.name for f in open_checkpoint(src).tensors.files] == ["weights.safetensors"]


def test_transformers_config_json_only(fl, tmp_path):
    ckpt = open_checkpoint(transformers_style(fl, tmp_path / "src", bits=8, group_size=-1))
    assert ckpt.config.dialect == "transformers" and ckpt.config.sources == ["config.json[quantization_config]"]
    assert ckpt.load("model.layers.1.self_attn.o_proj").scales.shape == (1, 128)


def test_sharded_with_index(fl, tmp_path):
    ckpt = open_checkpoint(shard(transformers_style(fl, tmp_path / "src")))
    assert len(ckpt.tensors.files) == 2 and len(ckpt.modules()) == 14
    ckpt.load("model.layers.0.self_attn.q_proj")


def test_gptqmodel_v2_dynamic(fl, tmp_path):
    ckpt = open_checkpoint(gptqmodel(fl, tmp_path / "src"))
    c = ckpt.config
    assert (c.dialect, c.zero_format, c.quantizer) == ("gptqmodel", ZeroFormat.V2, ["gptqmodel:4.1.0"])
    assert "model.layers.1.self_attn.o_proj" not in ckpt.modules()  # "-:" rule: left in float
    assert "model.layers.1.self_attn.o_proj.weight" in ckpt.passthrough()
    down = ckpt.load("model.layers.1.mlp.down_proj")
    assert (down.bits, down.group_size) == (8, 128)
    q = ckpt.load("model.layers.1.self_attn.q_proj")
    assert (q.bits, q.group_size) == (4, 64)


def test_dynamic_skip_contradicted_by_data(fl, tmp_path):
    src = gptqmodel(fl, tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"]["dynamic"] = {r"-:.*q_proj": {}}
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "quantize_config.json").write_text(json.dumps(cfg["quantization_config"]))
    ckpt = open_checkpoint(src)
    with pytest.raises(FormatError, match=r"q_proj has quantized tensors, but the dynamic rule '-:\.\*q_proj'"):
        ckpt.load("model.layers.0.self_attn.q_proj")


def test_compressed_tensors(fl, tmp_path):
    ckpt = open_checkpoint(compressed(fl, tmp_path / "src"))
    assert ckpt.config.method == "compressed-tensors" and ckpt.config.base.desc_act
    w = ckpt.load("model.layers.0.mlp.up_proj")
    assert not w.sym and (w.bits, w.group_size) == (4, 64)


@pytest.mark.parametrize("edit, message", [
    ({"pack_dtype": "int16"}, "pack_dtype 'int16' is not supported"),
    ({"checkpoint_format": "marlin"}, "checkpoint_format 'marlin': AutoGPTQ's own Marlin format"),
    ({"quant_method": "awq"}, "quant_method 'awq' is not GPTQ"),
])
def test_unsupported_configs(fl, tmp_path, edit, message):
    src = transformers_style(fl, tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"].update(edit)
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=message):
        open_checkpoint(src)


def test_config_files_disagree(fl, tmp_path):
    src = tmp_path / "src"
    write_gptq(fl, src)
    qc = json.loads((src / "quantize_config.json").read_text())
    qc["bits"] = 8
    (src / "quantize_config.json").write_text(json.dumps(qc))
    with pytest.raises(FormatError, match="config.json.quantization_config. says bits=4 but quantize_config.json says bits=8"):
        open_checkpoint(src)


def test_pickle_weights_refused(fl, tmp_path):
    src = transformers_style(fl, tmp_path / "src")
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    with pytest.raises(FormatError, match="pickle files .pytorch_model.bin."):
        open_checkpoint(src)


def test_checkpoint_format_override_reads_mislabelled_file(fl, tmp_path):
    src = transformers_style(fl, tmp_path / "src", zero_format=ZeroFormat.V2, desc_act=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"]["checkpoint_format"] = "gptq"  # the lie
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="mislabelled checkpoint.*--checkpoint-format gptq_v2"):
        open_checkpoint(src).load("model.layers.0.mlp.gate_proj")
    right = open_checkpoint(src, ZeroFormat.V2).load("model.layers.0.mlp.gate_proj")
    assert bool((right.zeros == 8).all())


def test_out_perm_equals_permuting_the_canonical_weight(fl, tmp_path):
    ckpt = open_checkpoint(autogptq(fl, tmp_path / "src"))
    perm = torch.randperm(256).to(torch.int32)
    a = ckpt.load("model.layers.0.mlp.gate_proj", out_perm=perm)
    b = ckpt.load("model.layers.0.mlp.gate_proj").permute_cols(perm)
    assert torch.equal(dequantize(a), dequantize(b))


def test_local_source_and_bad_ids(tmp_path):
    assert resolve(str(tmp_path)).path == tmp_path.resolve()
    with pytest.raises(SourceError, match="--revision applies to Hub ids"):
        resolve(str(tmp_path), revision="main")
    with pytest.raises(SourceError, match="not a Hub id"):
        resolve(str(tmp_path / "nope" / "deeper"))


def _populate_hub_cache(cache: Path, repo_id: str, branches: dict[str, Path]) -> None:
    """Lay files out like huggingface_hub's cache: refs/<branch> -> commit, snapshots/<commit>/<files>."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    for i, (branch, files) in enumerate(branches.items()):
        commit = f"{i + 1:040x}"
        (repo / "refs" / branch).write_text(commit)
        shutil.copytree(files, repo / "snapshots" / commit)


def test_hub_id_offline_from_cache_with_revision(fl, tmp_path):
    """TheBloke-style branches resolved from the local huggingface_hub cache, HF_HUB_OFFLINE=1."""
    cache = tmp_path / "hub"
    _populate_hub_cache(cache, "TheBloke/Tiny-GPTQ", {
        "main": autogptq(fl, tmp_path / "main", desc_act=False),
        "gptq-8bit--1g-actorder_True": autogptq(fl, tmp_path / "b8", bits=8, group_size=-1,
                                                file_name="model.safetensors"),
    })
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    cli = [sys.executable, "-c", "from converters.cli import main; main()"]
    out = subprocess.run([*cli, "inspect", "TheBloke/Tiny-GPTQ", "--revision", "gptq-8bit--1g-actorder_True", "-q"],
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "bits=8 group_size=-1" in out.stdout and f"commit {2:040x}" in out.stdout
    out = subprocess.run([*cli, "convert", "TheBloke/Tiny-GPTQ", str(tmp_path / "dst"), "-q"],
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    meta = json.loads((tmp_path / "dst" / "config.json").read_text())["quantization_config"]["meta"]
    assert meta["source"]["source"] == "TheBloke/Tiny-GPTQ" and meta["source"]["commit"] == f"{1:040x}"
    out = subprocess.run([*cli, "inspect", "TheBloke/Tiny-GPTQ", "--revision", "no-such-branch", "-q"],
                         env=env, capture_output=True, text=True)
    assert out.returncode == 1 and "cannot get revision 'no-such-branch'" in out.stderr
