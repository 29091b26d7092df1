"""`gptq-convert quantize` end to end on tiny models: exact checkpoints, formats, overrides, architectures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors import safe_open

from converters.checkpoint.emit import Target
from converters.cli import main
from converters.quantize import pipeline
from converters.quantize.calibration import Calibration
from converters.quantize.capture import ModelShell, decoder_layers
from converters.quantize.eval import load_model
from converters.quantize.pipeline import Job, quantize
from converters.quantize.rtn import rtn_quantize
from converters.quantize.solver import QuantSpec
from factory import build_model
from gptq_vllm.formats.errors import FormatError
from gptq_vllm.formats.reference import dequantize

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("llama") / "float", "llama", hidden=128, intermediate=256)


def rows(n=16, t=64, seed=0, vocab=259) -> Calibration:  # every tiny vocab has the 256 bytes
    return Calibration(torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(seed)), {"test": True})


def run(model: Path, out: Path, calib=None, **kw) -> dict:
    job = Job(model_dir=model, out_dir=out, overwrite=True, progress=False, **kw)
    return quantize(job, calib if calib is not None or job.method == "rtn" else rows())


@pytest.fixture
def loop_q(monkeypatch):
    """The Q of every module as the solver loop produced it (fp32), keyed by full module name."""
    seen: dict[str, torch.Tensor] = {}
    solve = pipeline._solve_group

    def spy(layer, prefix, names, H, job, rules):
        out = solve(layer, prefix, names, H, job, rules)
        seen.update({f"{prefix}.{n}": sol.dequantize() for n, sol in out.items()})
        return out

    monkeypatch.setattr(pipeline, "_solve_group", spy)
    return seen


@pytest.mark.parametrize("target,spec", [
    (Target.GPTQ_V1, QuantSpec(4, 128, True, "desc")),
    (Target.GPTQ_V2, QuantSpec(3, 64, False, "static")),
    (Target.GPTQ_V1, QuantSpec(4, 64, False, "none")),  # asymmetric v1: zeros kept >= 1
    (Target.COMPRESSED_TENSORS, QuantSpec(8, -1, True, "desc")),
    (Target.MYGPTQ, QuantSpec(4, 128, True, "desc")),
    (Target.MYGPTQ, QuantSpec(2, 64, False, "static")),
    (Target.GPTQ_V1, QuantSpec(4, 32, False, "desc", mse=2.4)),  # MSE grids fitted inside blocks, zeros >= 1
    (Target.COMPRESSED_TENSORS, QuantSpec(4, 128, True, "static", mse=2.4)),
])
def test_checkpoint_dequantizes_to_the_loops_q(llama, tmp_path, loop_q, target, spec):
    run(llama, tmp_path / "q", target=target, spec=spec)
    model = load_model(tmp_path / "q", CPU)
    assert set(model.quantized_modules) == set(loop_q) and len(loop_q) == 14
    state = model.state_dict()
    for name, q in loop_q.items():
        assert torch.equal(state[f"{name}.weight"], q), name
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    if target is Target.COMPRESSED_TENSORS:
        assert cfg["config_groups"]["group_0"]["weights"]["observer"] == ("mse" if spec.mse else "minmax")
    else:
        assert cfg["meta"]["mse"] == spec.mse


def test_same_seed_gives_byte_identical_shards(llama, tmp_path):
    for name in ("a", "b"):
        run(llama, tmp_path / name, rows(seed=3), spec=QuantSpec(4, 64, True, "desc"))
    files = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert files and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    run(llama, tmp_path / "c", rows(seed=4), spec=QuantSpec(4, 64, True, "desc"))
    assert (tmp_path / "a" / files[0]).read_bytes() != (tmp_path / "c" / files[0]).read_bytes()


def test_layers_are_solved_in_true_sequential_input_groups(llama):
    shell = ModelShell(llama, CPU)
    X, calls = shell.capture([rows(2).rows])
    layer = shell.load_layer(0)
    groups = pipeline.input_groups(layer, X[0], calls[2][0])
    assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def _tiny(arch: str, path: Path, **extra) -> Path:
    common = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256, **extra)
    if arch == "opt":
        cfg = transformers.OPTConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=256)
    elif arch == "gemma3_text":  # hybrid: a sliding-window layer (window 8) and a global one
        cfg = transformers.Gemma3TextConfig(**common, num_key_value_heads=2, intermediate_size=128, head_dim=16,
                                            sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    else:
        cfg = transformers.AutoConfig.for_model(arch, **common, num_key_value_heads=2, intermediate_size=128)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


@pytest.mark.parametrize("arch", ["mistral", "qwen3", "opt", "gemma3_text"])
def test_architectures_capture_kwargs_and_quantize(arch, tmp_path):
    model_dir = _tiny(arch, tmp_path / "float")
    calib = rows(4, 32)
    # every layer is called with the kwargs the model itself passes (sliding vs global masks included)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                              attn_implementation="sdpa").eval()
    real: list[dict] = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, kw: real.append(kw), with_kwargs=True)
             for layer in decoder_layers(model)[1]]
    with torch.no_grad():
        model.base_model(input_ids=calib.rows, use_cache=False)
    for h in hooks:
        h.remove()
    _, calls = ModelShell(model_dir, CPU).capture([calib.rows])
    for mine, theirs in zip(calls[4], real, strict=True):
        assert mine["kwargs"].keys() == theirs.keys()
        for key, value in theirs.items():
            assert _same(mine["kwargs"][key], value), (arch, key)
    report = run(model_dir, tmp_path / "q", calib, spec=QuantSpec(4, 32, True, "static"))
    assert all(0 < layer["rel_error"] < 0.5 for layer in report["layers"])
    assert len(report["layers"][0]["modules"]) in (6, 7)
    load_model(tmp_path / "q", CPU)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_dynamic_overrides_and_skips(llama, tmp_path, loop_q):
    dynamic = {"-:.*layers\\.1\\.mlp\\.down_proj": {}, "+:.*v_proj": {"bits": 8, "group_size": 32}}
    report = run(llama, tmp_path / "q", target=Target.GPTQ_V2, dynamic=dynamic)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["dynamic"] == dynamic
    assert "mlp.down_proj" not in report["layers"][1]["modules"]
    assert report["layers"][0]["modules"]["self_attn.v_proj"]["bits"] == 8
    model = load_model(tmp_path / "q", CPU)
    assert "model.layers.1.mlp.down_proj" not in model.quantized_modules
    assert model.quantized_modules["model.layers.0.self_attn.v_proj"].bits == 8
    float_w = load_model(llama, CPU).state_dict()["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(model.state_dict()["model.layers.1.mlp.down_proj.weight"], float_w)
    for name, q in loop_q.items():
        assert torch.equal(model.state_dict()[f"{name}.weight"], q), name


def test_mygptq_3bit_with_a_4bit_dynamic_override_is_marlin_throughout(llama, tmp_path):
    """A 3-bit mygptq checkpoint is Marlin-layout (units of 64 rows); a module a `dynamic` rule makes 4-bit is
    Marlin too (16-row tiles), the one layout the config records and the readers expect for every module."""
    dynamic = {"+:.*v_proj": {"bits": 4}}
    run(llama, tmp_path / "q", target=Target.MYGPTQ, spec=QuantSpec(3, 64, True, "none"), dynamic=dynamic)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["layout"] == "marlin" and cfg["bits"] == 3
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        assert tuple(f.get_slice("model.layers.0.self_attn.q_proj.qweight").get_shape()) == (128 // 64, 6 * 128)
        assert tuple(f.get_slice("model.layers.0.self_attn.v_proj.qweight").get_shape()) == (128 // 16, 2 * 64)
    model = load_model(tmp_path / "q", CPU)
    assert model.quantized_modules["model.layers.0.self_attn.v_proj"].bits == 4
    float_w = load_model(llama, CPU).state_dict()["model.layers.0.self_attn.v_proj.weight"]
    got = model.state_dict()["model.layers.0.self_attn.v_proj.weight"]
    assert (got - float_w).norm() < 0.2 * float_w.norm()


@pytest.mark.parametrize("group_size,intermediate,refusal", [
    (256, 256, r"float/model\.safetensors: model\.layers\.0\.[a-z_.]+_proj: --format mygptq writes the Marlin "
               r"layout, which cannot serve group size 256 \(Marlin takes \(-1, 32, 64, 128\)\); use --format gptq-v2"),
    (64, 192, r"float/model\.safetensors: model\.layers\.0\.mlp\.down_proj: .*cannot serve K=192, N=128 "
              r"\(Marlin needs K % 128 == 0"),
])
def test_mygptq_refuses_modules_the_marlin_kernels_cannot_serve_before_any_work(tmp_path, group_size, intermediate,
                                                                                refusal):
    """--format mygptq writes unpadded Marlin tensors: a module they cannot serve is named up front, with the
    one rule the plugin applies at load (selection.marlin_stored_problems), and nothing is written."""
    model = build_model(tmp_path / "float", "llama", hidden=128, intermediate=intermediate)
    with pytest.raises(FormatError, match=refusal):
        run(model, tmp_path / "q", target=Target.MYGPTQ, spec=QuantSpec(3, group_size, True, "none"))
    assert not (tmp_path / "q").exists()


def test_lm_head(llama, tmp_path):
    report = run(llama, tmp_path / "q", lm_head=True, spec=QuantSpec(8, 64, True, "static"))
    assert report["lm_head"]["damp"] is not None
    model = load_model(tmp_path / "q", CPU)
    assert "lm_head" in model.quantized_modules
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["lm_head"] is True


def test_lm_head_refused_when_tied(tmp_path):
    model_dir = _tiny("qwen3", tmp_path / "float", tie_word_embeddings=True)
    with pytest.raises(ValueError, match="ties lm_head"):
        run(model_dir, tmp_path / "q", lm_head=True)


@pytest.mark.parametrize("mse", [0.0, 2.4])
def test_rtn_method_is_round_to_nearest(llama, tmp_path, mse):
    run(llama, tmp_path / "q", method="rtn", target=Target.GPTQ_V2, spec=QuantSpec(4, 64, False, mse=mse))
    model, ref = load_model(tmp_path / "q", CPU), load_model(llama, CPU)
    w = ref.state_dict()["model.layers.0.mlp.up_proj.weight"]
    expect = dequantize(rtn_quantize(w, 4, 64, False, mse=mse)).t()
    assert torch.equal(model.state_dict()["model.layers.0.mlp.up_proj.weight"], expect)
    assert json.loads((tmp_path / "q" / "quantize_config.json").read_text())["meta"]["mse"] == mse


def test_cli_quantize_and_eval(llama, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("The river ran past the mill and under the old stone bridge. " * 200)
    runner = CliRunner()
    res = runner.invoke(main, ["quantize", str(llama), str(tmp_path / "q"), "--calib", str(text), "--nsamples", "8",
                               "--seqlen", "64", "--group-size", "64", "--act-order", "desc", "--format", "gptq-v1",
                               "--skip", ".*o_proj", "--mse", "2.4"])
    assert res.exit_code == 0, res.output
    assert "gptq: 100%" in res.stderr  # the layer progress bar (tqdm, on stderr)
    qcfg = json.loads((tmp_path / "q" / "quantize_config.json").read_text())
    assert qcfg["desc_act"] is True and qcfg["dynamic"] == {"-:.*o_proj": {}} and qcfg["meta"]["mse"] == 2.4
    assert "--mse" in runner.invoke(main, ["quantize", "--help"]).output
    assert qcfg["meta"]["calibration"]["nsamples"] == 8 and len(qcfg["meta"]["calibration"]["tokens_sha256"]) == 64
    res = runner.invoke(main, ["eval", str(tmp_path / "q"), "--data", str(text), "--seqlen", "64",
                               "--base", str(llama), "--layer-windows", "4"])
    assert res.exit_code == 0, res.output
    assert "perplexity" in res.stdout and "rtn" in res.stdout
    assert "eval: 100%" in res.stderr and "layer report: 100%" in res.stderr  # windows scored so far
    windows = int(res.stdout.split("(")[1].split()[0])
    assert f"{windows}/{windows} [" in res.stderr
    res = runner.invoke(main, ["quantize", str(llama), str(tmp_path / "x"), "--bits", "3", "--format",
                               "compressed-tensors"])
    assert res.exit_code != 0 and "compressed-tensors holds" in res.output


def test_cli_quiet_quantize_and_eval_print_no_progress_bar(llama, tmp_path):
    """-q/--quiet on quantize and eval, as on convert, inspect and verify: results only, no progress bar."""
    text = tmp_path / "eval.txt"
    text.write_text("The river ran past the mill and under the old stone bridge. " * 100)
    runner = CliRunner()
    for args in (["quantize", str(llama), str(tmp_path / "q"), "--method", "rtn", "-q"],
                 ["eval", str(tmp_path / "q"), "--data", str(text), "--seqlen", "64", "--quiet"]):
        res = runner.invoke(main, args)
        assert res.exit_code == 0, res.output
        assert "%|" not in res.stderr, res.stderr  # tqdm draws "desc: NN%|bar|"
    assert res.stdout.startswith("perplexity ")
    res = runner.invoke(main, ["quantize", str(llama), str(tmp_path / "r"), "--method", "rtn"])
    assert res.exit_code == 0 and "rtn: 100%" in res.stderr, res.output
