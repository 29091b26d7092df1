"""One validation for every entry point (issue 15): a table of corruptions over a small real checkpoint in
each dialect, written by the project's own writers (AutoGPTQ v1, GPTQModel v2, compressed-tensors as
llm-compressor writes it, our converted format).

For every case, `inspect`, `convert`, `verify`, `eval` and the plugin's load path refuse with the same
one-line message naming the file, the checkpoint's own tensor (q_proj, never vLLM's qkv_proj) and what
was expected; nothing is written; the source stays byte-identical.  The plugin's load path is vLLM's own
(ModelConfig -> the override hook, from_config, maybe_update_config -> the model's load_weights through
our weight loaders -> process_weights_after_loading), run for every case in one subprocess (this file as
a script).  The real engine confirms one case of each class, and serves an int64-weight_shape
compressed-tensors checkpoint with the tokens of its GPTQ twin (one engine subprocess).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from convert_sources import autogptq, compressed, edit_tensors, float_model, gptqmodel, transformers_style, tree_hash  # noqa: E402

Q, K_, V, O = (f"model.layers.0.self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj", "o_proj"))
UP, DOWN = "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"


# ---- the plugin's load path, as vLLM drives it (this file run as a script) --------------------------------

def plugin_load(directories: list[str]) -> list[str]:
    """Load each checkpoint with vLLM's ModelConfig / VllmConfig and model loader, quantization="mygptq".

    Returns, per checkpoint, "OK" or the message of the error (the outermost FormatError when there is one).
    """
    import gptq_vllm
    from gptq_vllm.formats.errors import FormatError
    from vllm.config import DeviceConfig, LoadConfig, ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.model_executor.model_loader import get_model_loader

    gptq_vllm.register()
    torch.accelerator.empty_cache = lambda *a, **k: None  # what vLLM's CPU model runner does
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(1, 0, "tcp://127.0.0.1:29517", 0, backend="gloo")
        initialize_model_parallel(1, 1)
    out = []
    for d in directories:
        try:
            if not (Path(d) / "config.json").exists():
                # vLLM itself refuses a directory without config.json before any plugin code runs; the
                # plugin's own hook refuses it the same way as the converter (the engine test shows vLLM's).
                from gptq_vllm.config import MyGPTQConfig

                MyGPTQConfig.from_config({"bits": 4, "group_size": 128, "sym": True}).maybe_update_config(d)
            mc = ModelConfig(model=d, quantization="mygptq", dtype="float16", max_model_len=128, enforce_eager=True)
            vc = VllmConfig(model_config=mc, load_config=LoadConfig(), device_config=DeviceConfig("cpu"))
            with set_current_vllm_config(vc):
                get_model_loader(vc.load_config).load_model(vllm_config=vc, model_config=mc)
            out.append("OK")
        except Exception as e:  # noqa: BLE001 (reported to the test)
            err, found = e, None
            while err is not None and found is None:
                if isinstance(err, FormatError):
                    found = err
                err = err.__cause__ or err.__context__
            out.append(str(found) if found is not None else f"{type(e).__name__}: {e}")
    return out


if __name__ == "__main__":
    dirs = json.loads(Path(sys.argv[1]).read_text())
    if len(sys.argv) > 3 and sys.argv[3] == "engine":
        from test_plugin_engine import run_jobs

        spec = dirs
        results = run_jobs(spec["jobs"], spec["prompts"], spec["max_tokens"])
    else:
        results = plugin_load(dirs)
    Path(sys.argv[2]).write_text(json.dumps(results))
    sys.exit(0)


# ---- dialects ----------------------------------------------------------------------------------------------

def _autogptq(fl: Path, d: Path) -> Path:
    # group 32: the 128 input channels of q/k/v and gate/up make 4 groups, so g_idx damage has room.
    return autogptq(fl, d, group_size=32, file_name="gptq_model-4bit-32g.safetensors")


def _mygptq(fl: Path, d: Path) -> Path:
    from converters.checkpoint.convert import convert
    from converters.checkpoint.hub import resolve

    src = _autogptq(fl, d.with_name(d.name + "-src"))
    convert(resolve(str(src)), d, progress=False)
    return d


DIALECTS = {  # name -> (builder, weights file name, act-order tensor, scales, packed codes, zeros)
    "autogptq-v1": (_autogptq, "gptq_model-4bit-32g.safetensors", "g_idx", "scales",
                    "qweight", "qzeros"),
    "gptqmodel-v2": (lambda fl, d: gptqmodel(fl, d, dynamic=None), "model.safetensors", "g_idx", "scales",
                     "qweight", "qzeros"),
    "compressed-tensors": (lambda fl, d: compressed(fl, d), "model.safetensors", "weight_g_idx", "weight_scale",
                           "weight_packed", "weight_zero_point"),
    "mygptq": (_mygptq, "model.safetensors", "perm", "scales", "qweight", None),
}


def _edit(name):
    def apply(d, fn):
        edit_tensors(d, fn, DIALECTS[name][1])
    return apply


def _another_assignment(g: torch.Tensor) -> torch.Tensor:
    """A valid act-order g_idx other than g (same groups, two channels of different groups swapped)."""
    g = g.clone()
    j = int((g != g[0]).nonzero()[0])
    g[0], g[j] = g[j].clone(), g[0].clone()
    return g


def _set_configs(d: Path, **values) -> None:
    """Set keys of every quantization config of checkpoint d (config.json's and quantize_config.json)."""
    for f in (d / "config.json", d / "quantize_config.json"):
        if not f.exists():
            continue
        cfg = json.loads(f.read_text())
        (cfg.get("quantization_config", cfg) if f.name == "config.json" else cfg).update(values)
        f.write_text(json.dumps(cfg))


def _undeclared_act_order(d: Path) -> None:
    """The config says no act-order; the tensors keep their act-order g_idx (valid: g_idx decides)."""
    cfg = json.loads((d / "config.json").read_text())
    if cfg.get("quantization_config", {}).get("quant_method") == "compressed-tensors":
        cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] = None
        (d / "config.json").write_text(json.dumps(cfg))
    else:
        _set_configs(d, desc_act=False)


# Checkpoints every entry point must accept alike (dialect, case) -> change(directory).
ACCEPTED = {(dialect, "act-order g_idx under desc_act=false"): _undeclared_act_order
            for dialect in ("autogptq-v1", "gptqmodel-v2", "compressed-tensors")}


def corruptions(dialect: str) -> dict[str, callable]:
    """Corruption class/tensor kind -> damage(directory), for the tensors this dialect has."""
    _, _, act, scales, packed, zeros = DIALECTS[dialect]
    edit = _edit(dialect)
    cases = {
        f"missing {scales}": lambda d: edit(d, lambda t: t.pop(f"{UP}.{scales}")),
        f"missing {packed}": lambda d: edit(d, lambda t: t.pop(f"{K_}.{packed}")),
        f"shape {packed}": lambda d: edit(d, lambda t: t.update({f"{K_}.{packed}": t[f"{K_}.{packed}"][:-1].clone()})),
        f"shape {scales}": lambda d: edit(d, lambda t: t.update({f"{UP}.{scales}": torch.cat([t[f"{UP}.{scales}"]] * 2)})),
        f"dtype {scales}": lambda d: edit(d, lambda t: t.update({f"{Q}.{scales}": t[f"{Q}.{scales}"].to(torch.int32)})),
        f"dtype {packed}": lambda d: edit(d, lambda t: t.update({f"{V}.{packed}": t[f"{V}.{packed}"].float()})),
        "nan scales": lambda d: edit(d, lambda t: t[f"{Q}.{scales}"].view(-1).__setitem__(3, float("nan"))),
        "no config.json": lambda d: (d / "config.json").unlink(),
    }
    if zeros is not None:
        cases[f"missing {zeros}"] = lambda d: edit(d, lambda t: t.pop(f"{V}.{zeros}"))
    if act != "perm":
        def out_of_range(t):
            g = t[f"{Q}.{act}"]
            g[5] = int(g.max()) + 1
        cases.update({
            f"{act} out of range": lambda d: edit(d, out_of_range),
            f"{act} unbalanced": lambda d: edit(d, lambda t: t[f"{Q}.{act}"].__setitem__(
                int((t[f"{Q}.{act}"] == 1).nonzero()[0]), 0)),
            f"{act} differs across fused shards": lambda d: edit(d, lambda t: t.update(
                {f"{Q}.{act}": _another_assignment(t[f"{Q}.{act}"])})),
            f"act-order without {act}": lambda d: edit(d, lambda t: t.pop(f"{Q}.{act}")),
        })
    else:
        cases.update({
            "perm not a permutation": lambda d: edit(d, lambda t: t[f"{O}.perm"].__setitem__(0, t[f"{O}.perm"][1])),
            "perm differs across fused shards": lambda d: edit(d, lambda t: t.update(
                {f"{V}.perm": t[f"{V}.perm"].flip(0).contiguous()})),
        })
    if dialect == "mygptq":
        def unit_layout_1(d):  # 3-bit Marlin units as gptq-convert wrote them before unit layout 2 (no key)
            cfg = json.loads((d / "config.json").read_text())
            qc = cfg["quantization_config"]
            del qc["unit_layout"]
            qc["dynamic"] = {r"+:.*down_proj": {"bits": 3}}
            (d / "config.json").write_text(json.dumps(cfg))
        cases["3-bit units of unit layout 1"] = unit_layout_1
    if dialect in ("autogptq-v1", "gptqmodel-v2"):
        def zero_field(t):
            t[f"{DOWN}.{zeros}"][0, 0] = -1  # every field 2^b - 1: a v1 "-1", out of range for a symmetric v2
        cases["zeros out of range"] = lambda d: edit(d, zero_field)
    if dialect == "gptqmodel-v2":
        def disagree(d):
            qc = json.loads((d / "quantize_config.json").read_text())
            qc["bits"] = 8
            (d / "quantize_config.json").write_text(json.dumps(qc))
        cases["quantize_config.json disagrees with config.json"] = disagree

        def declared_by_rule(d):  # GPTQModel `dynamic` may set desc_act per module: that module needs its g_idx
            _set_configs(d, desc_act=False, dynamic={r"+:.*\.o_proj": {"desc_act": True}})
            edit(d, lambda t: t.pop(f"{O}.{act}"))
        cases["dynamic desc_act without g_idx"] = declared_by_rule
    return cases


CASES = [(dialect, case) for dialect in DIALECTS for case in corruptions(dialect)]


# ---- running every entry point ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    fl = float_model(tmp_path_factory.getbasetemp())
    built = {name: build(fl, root / name) for name, (build, *_) in DIALECTS.items()}
    (root / "text.txt").write_text(" ".join(["The river ran past the mill and under the old stone bridge."] * 20))
    return root, built


def _cli(*args) -> tuple[int, str]:
    from click.testing import CliRunner

    from converters.cli import main

    r = CliRunner().invoke(main, [*map(str, args), "-q"])
    return r.exit_code, r.output.strip()


@pytest.fixture(scope="module")
def refusals(sources):
    """Every case through every entry point: {(dialect, case): {entry point: message}} (plus checks)."""
    root, built = sources
    cases_root = root / "cases"
    cases_root.mkdir()
    results, dirs = {}, []
    for i, (dialect, case) in enumerate(CASES):
        d = cases_root / f"{i:02d}"
        shutil.copytree(built[dialect], d)
        corruptions(dialect)[case](d)
        before, listing = tree_hash(d), sorted(p.name for p in cases_root.iterdir())
        got = {}
        code, out = _cli("inspect", d, "--json")
        assert code == 1, (dialect, case, out)
        got["inspect"] = (json.loads(out)["problems"] if out.startswith("{") else [out.removeprefix("Error: ")])
        for entry, args in (("convert", ["convert", d, cases_root / f"{i:02d}-out"]),
                            ("verify", ["verify", d, built[dialect]]),
                            ("eval", ["eval", d, "--data", root / "text.txt", "--seqlen", "16"])):
            code, out = _cli(*args)
            assert code == 1 and out.startswith("Error: "), (dialect, case, entry, out)
            got[entry] = out.removeprefix("Error: ").replace("\n", " ")
        assert sorted(p.name for p in cases_root.iterdir()) == listing, (dialect, case)  # no output, no temp dir
        assert tree_hash(d) == before, (dialect, case)  # the source is byte-identical
        results[(dialect, case)] = got
        got["dir"] = str(d)
        dirs.append(str(d))
    for i, ((dialect, case), change) in enumerate(ACCEPTED.items()):
        d, dst = cases_root / f"ok-{i}", cases_root / f"ok-{i}-out"
        shutil.copytree(built[dialect], d)
        change(d)
        got = {entry: _cli(*args) for entry, args in (
            ("inspect", ["inspect", d]), ("convert", ["convert", d, dst]), ("verify", ["verify", d, dst]),
            ("eval", ["eval", d, "--data", root / "text.txt", "--seqlen", "16"]))}
        got["converted config"] = json.loads((dst / "config.json").read_text())["quantization_config"]
        results[(dialect, case)] = got
        dirs.append(str(d))
    spec, out = root / "dirs.json", root / "plugin.json"
    spec.write_text(json.dumps(dirs))
    proc = subprocess.run([sys.executable, __file__, str(spec), str(out)], cwd=HERE.parent, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert proc.returncode == 0, proc.stderr[-5000:]
    for key, message in zip([*CASES, *ACCEPTED], json.loads(out.read_text())):
        results[key]["plugin"] = message
    return results


@pytest.mark.vllm
@pytest.mark.parametrize("dialect, case", CASES, ids=[f"{d}: {c}" for d, c in CASES])
def test_every_entry_point_refuses_with_the_same_message(refusals, dialect, case):
    got = refusals[(dialect, case)]
    message = got["convert"]
    assert got["verify"] == message and got["eval"] == message, got
    assert message in got["inspect"], got
    assert "qkv_proj" not in message and "gate_up_proj" not in message  # the checkpoint's own tensor
    if case == "no config.json":
        assert message.endswith("copy it from the float model") and message in got["plugin"], got
    elif case in ("quantize_config.json disagrees with config.json", "3-bit units of unit layout 1"):
        assert message in got["plugin"], got  # vLLM wraps errors of its config stage in pydantic's words
        if case.startswith("3-bit"):
            assert "unit_layout 1 " in message and message.endswith("with `gptq-convert convert`"), got
    else:
        assert got["plugin"] == message, got
        assert message.startswith(str(Path(message.split(": ")[0]))) and ".safetensors: model.layers." in message


@pytest.mark.vllm
@pytest.mark.parametrize("dialect, case", list(ACCEPTED), ids=[f"{d}: {c}" for d, c in ACCEPTED])
def test_every_entry_point_accepts_act_order_the_config_does_not_declare(refusals, dialect, case):
    """g_idx, not desc_act, decides act-order handling (validate.check_implied_g_idx): every entry point
    dequantizes by it, so the checkpoint is served and converted right; convert declares it in its output."""
    got = refusals[(dialect, case)]
    assert got["plugin"] == "OK", got
    for entry in ("inspect", "convert", "verify", "eval"):
        assert got[entry][0] == 0, (entry, got[entry][1])
    assert "modules have an act-order g_idx: it is honoured" in got["inspect"][1]
    assert got["converted config"]["desc_act"] is True


@pytest.mark.vllm
def test_plugin_refuses_experts_whose_g_idx_it_would_drop(tmp_path):
    """Experts go to vLLM's GPTQ MoE method without their g_idx: an act-order one is refused, a trivial one not."""
    pytest.importorskip("vllm")
    from safetensors.torch import save_file

    import gptq_vllm
    from gptq_vllm.formats.act_order import default_g_idx
    from gptq_vllm.formats.errors import FormatError

    gptq_vllm.register()
    from gptq_vllm.config import MyGPTQConfig

    qcfg = {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True, "desc_act": False}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral", "quantization_config": qcfg}))
    name = "model.layers.0.block_sparse_moe.experts.1.w1.g_idx"
    trivial = default_g_idx(64, 32)
    for g_idx, refused in ((trivial, False), (trivial.flip(0).contiguous(), True)):
        save_file({name: g_idx, name.replace("g_idx", "qweight"): torch.zeros(8, 16, dtype=torch.int32)},
                  str(tmp_path / "model.safetensors"))
        config = MyGPTQConfig.from_config(qcfg)
        if not refused:
            config.maybe_update_config(str(tmp_path))
            continue
        with pytest.raises(FormatError) as e:
            config.maybe_update_config(str(tmp_path))
        assert str(e.value).startswith(f"{tmp_path / 'model.safetensors'}: {name}: not k // group_size although "
                                       f"the config says desc_act=false"), e.value


def test_the_table_covers_every_class():
    classes = {c.split(" ")[0] if c.split(" ")[0] in ("missing", "shape", "dtype") else c for _, c in CASES}
    for expected in ("missing", "shape", "dtype", "nan scales", "no config.json", "g_idx out of range",
                     "g_idx unbalanced", "g_idx differs across fused shards", "act-order without g_idx",
                     "perm not a permutation", "zeros out of range", "quantize_config.json disagrees with config.json",
                     "act-order without weight_g_idx", "dynamic desc_act without g_idx"):
        assert expected in classes, expected


# ---- int32 and int64 weight_shape, and the engine ------------------------------------------------------------

def test_int64_and_int32_weight_shape_read_alike(sources, tmp_path):
    from converters.checkpoint.readers import open_checkpoint
    from gptq_vllm.formats.reference import dequantize

    _, built = sources
    src = built["compressed-tensors"]
    int32 = tmp_path / "int32"
    shutil.copytree(src, int32)
    edit_tensors(int32, lambda t: t.update({k: v.to(torch.int32) for k, v in t.items() if k.endswith("weight_shape")}))
    a, b = open_checkpoint(src), open_checkpoint(int32)
    assert a.tensors.get(f"{Q}.weight_shape").dtype == torch.int64
    assert torch.equal(dequantize(a.load(Q)), dequantize(b.load(Q)))
    code, out = _cli("inspect", src)
    assert code == 0 and "problems  none" in out.replace("problems        ", "problems  "), out


@pytest.fixture(scope="module")
def engine(sources, tmp_path_factory):
    """One engine subprocess: a GPTQ checkpoint and its compressed-tensors twin (int64 weight_shape) served,
    plus one broken checkpoint of each class the load path detects."""
    from converters.checkpoint.convert import convert
    from converters.checkpoint.emit import Target
    from converters.checkpoint.hub import resolve
    from test_plugin_engine import prompt_ids

    root, built = sources
    work = tmp_path_factory.mktemp("validation-engine")
    fl = float_model(tmp_path_factory.getbasetemp())
    gptq = transformers_style(fl, work / "gptq", desc_act=False)
    twin = work / "ct-twin"
    convert(resolve(str(gptq)), twin, target=Target.COMPRESSED_TENSORS, progress=False)
    edit_tensors(twin, lambda t: t.update({k: v.to(torch.int64) for k, v in t.items() if k.endswith("weight_shape")}))
    convert(resolve(str(twin)), work / "ct-twin-converted", progress=False)
    code, out = _cli("verify", twin, work / "ct-twin-converted")
    assert code == 0, out
    jobs = [{"name": "gptq", "model": str(gptq)}, {"name": "ct-twin", "model": str(twin)}]
    broken = {  # one per class the engine can reach; each through a different dialect
        "g_idx differs across fused shards": ("autogptq-v1", "g_idx differs across fused shards"),
        "act-order without weight_g_idx": ("compressed-tensors", "act-order without weight_g_idx"),
        "perm not a permutation": ("mygptq", "perm not a permutation"),
        "config files disagree": ("gptqmodel-v2", "quantize_config.json disagrees with config.json"),
        "no config.json": ("autogptq-v1", "no config.json"),
        "zeros out of range": ("gptqmodel-v2", "zeros out of range"),
    }
    for name, (dialect, case) in broken.items():
        d = work / name.replace(" ", "-")
        shutil.copytree(built[dialect], d)
        corruptions(dialect)[case](d)
        jobs.append({"name": name, "model": str(d)})
    spec, out = work / "spec.json", work / "results.json"
    spec.write_text(json.dumps({"jobs": jobs, "prompts": prompt_ids(str(fl)), "max_tokens": 8}))
    proc = subprocess.run(["flock", "/tmp/vllm-engine.lock", sys.executable, __file__, str(spec), str(out), "engine"],
                          cwd=HERE.parent, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-5000:]
    return {r["name"]: r for r in json.loads(out.read_text())}, {n: (k, str(work / n.replace(" ", "-")))
                                                                 for n, k in broken.items()}


@pytest.mark.vllm
def test_engine_serves_the_compressed_tensors_twin_like_its_gptq_source(engine):
    results, _ = engine
    gptq, twin = results["gptq"], results["ct-twin"]
    assert "error" not in gptq and "error" not in twin, (gptq.get("error"), twin.get("error"))
    assert [o["tokens"] for o in twin["outputs"]] == [o["tokens"] for o in gptq["outputs"]]


@pytest.mark.vllm
def test_engine_refuses_one_case_of_each_class(engine, refusals):
    results, broken = engine
    for name, (key, directory) in broken.items():
        assert "error" in results[name], f"{name} loaded although it is broken"
        text = "\n".join(results[name]["error"])
        if name == "no config.json":
            continue  # vLLM refuses it itself, before any plugin code (its own words)
        # The message of every gptq-convert command on the same damage, in this copy's directory.
        assert refusals[key]["convert"].replace(refusals[key]["dir"], directory) in text, (name, text)
