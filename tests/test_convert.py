"""convert -> verify for every source dialect and target; act-order folding; what DST contains."""

import json
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from convert_sources import (autogptq, compressed, edit_tensors, float_model, gptqmodel, shard, transformers_style,
                             tree_hash)
from converters.checkpoint.convert import convert
from converters.checkpoint.emit import Target
from converters.checkpoint.hub import resolve
from converters.checkpoint.readers import open_checkpoint
from converters.checkpoint.verify import verify
from converters.cli import main
from gptq_vllm.formats.act_order import act_order_perm, is_trivial
from gptq_vllm.formats.errors import FormatError
from gptq_vllm.formats.gptq import ZeroFormat
from gptq_vllm.formats.kernel_layout import Layout
from gptq_vllm.formats.reference import dequantize


@pytest.fixture(scope="module")
def fl(tmp_path_factory):
    return float_model(tmp_path_factory.getbasetemp())


SOURCES = {
    "autogptq-v1-actorder-g128": lambda fl, d: autogptq(fl, d),
    "gptqmodel-v2-dynamic": lambda fl, d: gptqmodel(fl, d),
    "compressed-tensors-asym": lambda fl, d: compressed(fl, d),
    "sharded-transformers-8bit": lambda fl, d: shard(transformers_style(fl, d, bits=8, group_size=32, desc_act=True)),
}


def tensors_of(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.mark.parametrize("kind", list(SOURCES))
def test_convert_then_verify(fl, tmp_path, kind):
    src = SOURCES[kind](fl, tmp_path / "src")
    before = tree_hash(src)
    report = convert(resolve(str(src)), tmp_path / "dst", progress=False)
    assert tree_hash(src) == before  # SRC never touched
    ckpt = open_checkpoint(src)
    act_order = {m for m in ckpt.modules() if not is_trivial(ckpt.load(m).g_idx, ckpt.load(m).group_size)}
    assert report.modules == len(ckpt.modules()) and report.act_order_modules == len(act_order)
    assert report.perms_absorbed == 2  # one down_proj per layer
    assert report.perms_stored == len(act_order) - 2
    result = verify(open_checkpoint(src), open_checkpoint(tmp_path / "dst"), progress=False)
    assert result.ok, result.mismatches
    assert result.absorbed == 2 and result.modules == report.modules

    dst = tmp_path / "dst"
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (dst / f).read_bytes() == (src / f).read_bytes()
    assert not (dst / "quantize_config.json").exists()
    qcfg = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "mygptq" and qcfg["checkpoint_format"] == "mygptq"
    assert qcfg["layout"] == "marlin" and qcfg["desc_act"] is True
    assert qcfg["meta"]["source"]["source"] == src.name  # the name only: no local path in published files
    assert qcfg["meta"]["converter"].startswith("gptq-vllm:")
    names = tensors_of(dst)
    assert not [n for n in names if n.endswith(("g_idx", "g_idx_sorted"))]
    stored = {n.removesuffix(".perm") for n in names if n.endswith(".perm")}
    assert stored == {m for m in act_order if not m.endswith("down_proj")}  # down_proj's absorbed into gate/up


def test_absorbed_perm_is_exact_for_the_mlp(fl, tmp_path):
    """silu(x W_gate) * (x W_up) @ W_down is unchanged when down's perm moves into gate/up columns."""
    src = autogptq(fl, tmp_path / "src")
    convert(resolve(str(src)), tmp_path / "dst", progress=False)
    s, d = open_checkpoint(src), open_checkpoint(tmp_path / "dst")
    mlp = "model.layers.1.mlp"
    x = torch.randn(3, 128, dtype=torch.float64)

    def run(ckpt):
        w = {m: dequantize(ckpt.load(f"{mlp}.{m}"), torch.float64) for m in ("gate_proj", "up_proj", "down_proj")}
        return (torch.nn.functional.silu(x @ w["gate_proj"]) * (x @ w["up_proj"])) @ w["down_proj"]

    assert torch.allclose(run(s), run(d), rtol=1e-12, atol=1e-12)
    # and the stored rows really are permuted (no gather left for down_proj)
    g_idx = s.load(f"{mlp}.down_proj").g_idx
    stored = d.load(f"{mlp}.down_proj")
    assert torch.equal(stored.g_idx, g_idx[act_order_perm(g_idx).long()])


@pytest.mark.parametrize("target", [Target.GPTQ_V1, Target.GPTQ_V2, Target.COMPRESSED_TENSORS])
def test_export_targets_round_trip(fl, tmp_path, target):
    src = autogptq(fl, tmp_path / "src")
    convert(resolve(str(src)), tmp_path / "dst", target=target, progress=False)
    dst = open_checkpoint(tmp_path / "dst")
    assert dst.config.method == ("compressed-tensors" if target is Target.COMPRESSED_TENSORS else "gptq")
    result = verify(open_checkpoint(src), dst, progress=False)
    assert result.ok and result.absorbed == 0, result.mismatches
    if target is not Target.COMPRESSED_TENSORS:
        assert json.loads((tmp_path / "dst" / "quantize_config.json").read_text())["checkpoint_format"] == (
            "gptq" if target is Target.GPTQ_V1 else "gptq_v2")


def test_v1_v2_conversion_changes_only_qzeros(fl, tmp_path):
    src = autogptq(fl, tmp_path / "src")
    convert(resolve(str(src)), tmp_path / "v2", target=Target.GPTQ_V2, progress=False)
    a, b = tensors_of(src), tensors_of(tmp_path / "v2")
    assert a.keys() == b.keys()
    differ = sorted({n.rpartition(".")[2] for n in a if not torch.equal(a[n], b[n])})
    assert differ == ["qzeros"]


@pytest.mark.parametrize("bits, sym", [(3, True), (3, False), (2, False)])
def test_2_and_3_bit_convert_to_marlin_units_by_default(fl, tmp_path, bits, sym):
    src = transformers_style(fl, tmp_path / "src", bits=bits, group_size=32, desc_act=True, sym=sym)
    convert(resolve(str(src)), tmp_path / "dst", progress=False)
    cfg = json.loads((tmp_path / "dst" / "config.json").read_text())["quantization_config"]
    assert cfg["layout"] == "marlin" and cfg["bits"] == bits
    t = tensors_of(tmp_path / "dst")
    U = {2: 2, 3: 4}[bits]  # k-tiles per unit
    for module, (K, N) in {"model.layers.0.mlp.down_proj": (256, 128), "model.layers.1.self_attn.k_proj": (128, 64),
                           "model.layers.0.mlp.up_proj": (128, 256)}.items():
        assert t[f"{module}.qweight"].shape == (K // (16 * U), N * U * bits // 2), module  # [K/32, 2N], [K/64, 6N]
        assert t[f"{module}.scales"].shape == (K // 32, N)
        assert (f"{module}.qzeros" in t) == (not sym)
        if not sym:
            assert t[f"{module}.qzeros"].shape == (K // 32, N // 8)  # 2/3-bit zero points in the 4-bit packing
    assert t["model.layers.0.mlp.up_proj.perm"].shape == (128,)
    assert "model.layers.0.mlp.down_proj.perm" not in t  # absorbed into gate/up, as for 4 bit
    assert verify(open_checkpoint(src), open_checkpoint(tmp_path / "dst"), progress=False).ok
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "dst"), "-q", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["format"]["layout"] == "marlin" and report["layouts"]["marlin"] == "ok" and not report["problems"]


def test_exllama_layout_for_3bit_on_request(fl, tmp_path):
    src = transformers_style(fl, tmp_path / "src", bits=3, group_size=32, desc_act=True)
    convert(resolve(str(src)), tmp_path / "dst", progress=False, layout=Layout.EXLLAMA)
    assert json.loads((tmp_path / "dst" / "config.json").read_text())["quantization_config"]["layout"] == "exllama"
    assert tensors_of(tmp_path / "dst")["model.layers.0.mlp.down_proj.qweight"].shape == (256 * 3 // 32, 128)
    assert verify(open_checkpoint(src), open_checkpoint(tmp_path / "dst"), progress=False).ok


def test_bad_3bit_marlin_tensor_is_named_with_what_was_expected(fl, tmp_path):
    src = transformers_style(fl, tmp_path / "src", bits=3, group_size=32, desc_act=True)
    convert(resolve(str(src)), tmp_path / "dst", progress=False)
    edit_tensors(tmp_path / "dst", lambda t: t.update({
        "model.layers.0.mlp.down_proj.qweight": t["model.layers.0.mlp.down_proj.qweight"][:, :-6].clone()}))
    result = CliRunner().invoke(main, ["verify", str(src), str(tmp_path / "dst"), "-q"])
    assert result.exit_code == 1
    assert ("dst/model.safetensors: model.layers.0.mlp.down_proj.qweight: shape (4, 762), expected (4, 768) for "
            "K=256, N=128, bits=3, group_size=32") in result.output.replace("\n", " ")


def test_marlin_refuses_untileable_shapes(tmp_path):
    from factory import build_model

    fl = build_model(tmp_path / "float", hidden=96, intermediate=192, heads=3, kv_heads=3)
    src = transformers_style(fl, tmp_path / "src", group_size=32)
    with pytest.raises(FormatError, match=r"src/model.safetensors: model.layers.0.mlp.down_proj: the Marlin layout needs K % 128 == 0 "
                                         r"and N % 64 == 0, got K=192, N=96; use --layout exllama"):
        convert(resolve(str(src)), tmp_path / "dst", progress=False)
    assert not (tmp_path / "dst").exists() and not list(tmp_path.glob(".dst.tmp-*"))


def test_sharded_output_and_cli(fl, tmp_path):
    src = gptqmodel(fl, tmp_path / "src")
    result = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "dst"), "--shard-size", "200KB", "-q"])
    assert result.exit_code == 0, result.output
    assert "2 permutations absorbed into gate/up" in result.output
    dst = tmp_path / "dst"
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (dst / "model.safetensors").exists()
    qcfg = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qcfg["dynamic"] == json.loads((src / "config.json").read_text())["quantization_config"]["dynamic"]
    assert qcfg["meta"]["quantizer"][0] == "gptqmodel:4.1.0"
    assert qcfg["meta"]["source"]["format"]["dialect"] == "gptqmodel"
    assert "model.layers.1.self_attn.o_proj.weight" in index["weight_map"]  # left in float by "-:"
    result = CliRunner().invoke(main, ["verify", str(src), str(dst), "-q"])
    assert result.exit_code == 0 and "OK: 13 quantized modules" in result.output, result.output


def test_existing_destination(fl, tmp_path):
    src = autogptq(fl, tmp_path / "src")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep").write_text("x")
    result = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "dst"), "-q"])
    assert result.exit_code == 1 and "already exists" in result.output
    assert (tmp_path / "dst" / "keep").exists()
    # --overwrite replaces only a checkpoint: a DST holding other files is refused and left as it was.
    result = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "dst"), "-q", "--overwrite"])
    assert result.exit_code == 1 and "holds files a checkpoint would not (keep)" in result.output, result.output
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["keep"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]  # no temporary directory left
    (tmp_path / "dst" / "keep").unlink()
    for _ in range(2):  # into the empty directory, then over its own previous output
        result = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "dst"), "-q", "--overwrite"])
        assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["convert", str(src), str(src / "inside"), "-q"])
    assert result.exit_code == 1 and "must not be, contain or lie inside the source" in result.output


def test_overwrite_replaces_only_a_checkpoint(fl, tmp_path):
    src, dst = gptqmodel(fl, tmp_path / "src"), tmp_path / "dst"

    def run(*args):
        return CliRunner().invoke(main, ["convert", str(src), str(dst), "-q", "--overwrite", *args])

    assert run("--shard-size", "200KB").exit_code == 0
    sharded = sorted(p.name for p in dst.iterdir())
    assert "model.safetensors.index.json" in sharded and "model-00002-of-00003.safetensors" in sharded, sharded
    result = run()  # one file now: the previous shards and index go, nothing of theirs is left behind
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in dst.iterdir())
    assert "model.safetensors" in files and not [f for f in files if f.startswith("model-") or f.endswith("index.json")]
    assert verify(open_checkpoint(src), open_checkpoint(dst), progress=False).ok
    for other in ("notes.txt", "runs/"):
        path = dst / other.rstrip("/")
        path.mkdir() if other.endswith("/") else path.write_text("mine")
        before = tree_hash(dst)
        result = run()
        assert result.exit_code == 1 and f"holds files a checkpoint would not ({other})" in result.output, result.output
        assert tree_hash(dst) == before and sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]
        path.rmdir() if other.endswith("/") else path.unlink()


def test_output_is_the_users_whatever_the_source_mode(fl, tmp_path, monkeypatch):
    """A read-only source (a Hub cache) gives a checkpoint with the modes the umask gives new files, and its
    config.json names the source directory only, never a local path."""
    src = autogptq(fl, tmp_path / "src")
    for f in src.iterdir():
        f.chmod(0o444)
    src.chmod(0o555)
    monkeypatch.chdir(tmp_path)
    old = os.umask(0o022)
    try:
        result = CliRunner().invoke(main, ["convert", "src", str(tmp_path / "out" / "dst"), "-q"])
    finally:
        os.umask(old)
        src.chmod(0o755)
    assert result.exit_code == 0, result.output
    dst = tmp_path / "out" / "dst"
    assert (dst.stat().st_mode & 0o777, dst.parent.stat().st_mode & 0o777) == (0o755, 0o755)  # not mkdtemp's 0700
    assert {f.name: f.stat().st_mode & 0o777 for f in dst.iterdir()} == {f.name: 0o644 for f in dst.iterdir()}
    assert (dst / "tokenizer.json").stat().st_mtime_ns == (src / "tokenizer.json").stat().st_mtime_ns
    text = (dst / "config.json").read_text()
    assert json.loads(text)["quantization_config"]["meta"]["source"]["source"] == "src"
    assert str(tmp_path) not in text and "/src" not in text


def test_inspect_names_a_converted_checkpoint_format_once(fl, tmp_path):
    src = autogptq(fl, tmp_path / "src")
    assert CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "dst"), "-q"]).exit_code == 0
    out = CliRunner().invoke(main, ["inspect", str(tmp_path / "dst")]).output
    line = next(x for x in out.splitlines() if x.startswith("format"))
    assert "mygptq (config from" in line and "mygptq;" not in line, line
    line = next(x for x in CliRunner().invoke(main, ["inspect", str(src)]).output.splitlines() if x.startswith("format"))
    assert line.split()[1] == "gptq" and "; config from" in line, line  # a source keeps its dialect


def test_mislabelled_source_converts_with_override(fl, tmp_path):
    src = transformers_style(fl, tmp_path / "src", zero_format=ZeroFormat.V2)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"]["checkpoint_format"] = "gptq"
    (src / "config.json").write_text(json.dumps(cfg))
    report = convert(resolve(str(src)), tmp_path / "dst", checkpoint_format=ZeroFormat.V2, progress=False)
    assert report.act_order_modules == 0
    meta = json.loads((tmp_path / "dst" / "config.json").read_text())["quantization_config"]["meta"]
    assert meta["source"]["format"]["checkpoint_format_overridden"] is True
    assert verify(open_checkpoint(src, ZeroFormat.V2), open_checkpoint(tmp_path / "dst"), progress=False).ok
