"""`LLM(..., quantization="mygptq")` on the real vLLM CPU engine against transformers on the dequantized model.

One subprocess loads every checkpoint below in turn (this file run as a script: vLLM in one process,
uni executor, eager) and writes greedy tokens with their logprobs, or the error of a load that must
fail, as JSON.  transformers then runs each checkpoint's dequantized float model (written by
tests/factory.py from the same codes) teacher-forced on vLLM's tokens: every greedy token must be
transformers' argmax, except where transformers' top two are within TIE of each other, and every
logprob must agree within LOGPROB_TOL.  Compiled (torch.compile) execution and the multi-process
engine are covered by test_plugin_serve.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest
import torch

from factory import build_model, write_gptq

HERE = Path(__file__).resolve().parent
PROMPTS = [
    "The river ran past the mill",
    "In the morning the baker opened his shop;",
    "She counted the coins twice, wrote the numbers",
]
MAX_TOKENS = 12
# fp16 activations in both engines, summed in different orders: logprobs differ by a few 1e-3.
LOGPROB_TOL = 0.05
# A greedy choice may differ from transformers' only where its two best logits are this close.
TIE = 2 * LOGPROB_TOL


@dataclass
class Job:
    name: str
    model: str
    reference: str | None = None  # dequantized float model; None for loads that must fail
    expect_error: list[str] = field(default_factory=list)  # substrings of the error a broken load raises


# ---- checkpoints -------------------------------------------------------------------------------------------

# (name, arch, bits, group_size, sym, desc_act, zero_format, config_style): a covering subset of the
# product, every axis value at least once, on both architectures.
GPTQ_CASES = [
    ("llama-4b-g128-sym-v1", "llama", 4, 128, True, False, "gptq", "config"),
    ("llama-4b-g128-sym-actorder-v1-thebloke", "llama", 4, 128, True, True, "gptq", "autogptq"),
    ("llama-8b-gm1-sym-v2", "llama", 8, -1, True, False, "gptq_v2", "config"),
    # 3-bit act-order as AutoGPTQ writes it: the class of checkpoint only this plugin serves (issue 14).
    ("llama-3b-g128-sym-actorder-v1-thebloke", "llama", 3, 128, True, True, "gptq", "autogptq"),
    ("qwen2-4b-g128-asym-actorder-v2", "qwen2", 4, 128, False, True, "gptq_v2", "config"),
    ("qwen2-8b-g128-asym-v1", "qwen2", 8, 128, False, False, "gptq", "config"),
    ("qwen2-4b-gm1-asym-v1", "qwen2", 4, -1, False, False, "gptq", "config"),
]


def _float_model(root: Path, arch: str) -> Path:
    path = root / f"float-{arch}"
    if not (path / "config.json").exists():
        build_model(path, arch)
    return path


def _edit_tensors(src: Path, dst: Path, edit) -> Path:
    """Copy a checkpoint and change its tensors with edit(dict) -> dict."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = edit(load_file(str(src / "model.safetensors")))
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _write_converted(float_dir: Path, out: Path, quantized: dict, layout, desc_act: bool, bits: int,
                     group_size: int, sym: bool) -> Path:
    """A `gptq-convert`-style checkpoint: our kernel layout written by the converter's own emitters."""
    from safetensors.torch import load_file, save_file

    from converters.checkpoint.emit import Target, module_tensors, quantization_config

    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in load_file(str(float_dir / "model.safetensors")).items():
        module = name.removesuffix(".weight")
        if module in quantized:
            tensors.update(module_tensors(quantized[module], module, Target.MYGPTQ, layout))
        else:
            tensors[name] = t
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((float_dir / "config.json").read_text())
    config["quantization_config"] = quantization_config(Target.MYGPTQ, bits, group_size, sym, desc_act, layout=layout)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in float_dir.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            (out / f.name).write_bytes(f.read_bytes())
    return out


def build_jobs(root: Path) -> list[Job]:
    from gptq_vllm.formats.gptq import ZeroFormat
    from gptq_vllm.formats.kernel_layout import Layout

    jobs = []
    for name, arch, bits, g, sym, desc_act, fmt, style in GPTQ_CASES:
        ckpt, ref = root / name, root / f"{name}-ref"
        write_gptq(_float_model(root, arch), ckpt, bits=bits, group_size=g, sym=sym, desc_act=desc_act,
                   zero_format=ZeroFormat(fmt), reference_dir=ref, config_style=style)
        jobs.append(Job(name, str(ckpt), str(ref)))

    # Converted checkpoints (loaded as stored): Marlin with act-order perms, ExLlama asymmetric.
    llama = _float_model(root, "llama")
    for name, layout, bits, sym, desc_act in [("converted-marlin-4b-actorder", Layout.MARLIN, 4, True, True),
                                              ("converted-exllama-4b-asym", Layout.EXLLAMA, 4, False, False)]:
        ref = root / f"{name}-ref"
        quantized = write_gptq(llama, root / f"{name}-src", bits=bits, group_size=128, sym=sym,
                               desc_act=desc_act, reference_dir=ref)
        jobs.append(Job(name, str(_write_converted(llama, root / name, quantized, layout, desc_act, bits, 128, sym)),
                        str(ref)))

    # Broken checkpoints: each must fail at load with the error that names the problem.
    base = root / "llama-4b-g128-sym-actorder-v1-thebloke"
    q = "model.layers.0.self_attn.q_proj"

    def drop_g_idx(t):
        return {k: v for k, v in t.items() if k != f"{q}.g_idx"}

    def truncate(t):
        t[f"{q}.qweight"] = t[f"{q}.qweight"][:-1].contiguous()
        return t

    def nan_scales(t):
        t[f"{q}.scales"][0, 3] = float("nan")
        return t

    def underflow(t):
        # What AutoGPTQ writes for an asymmetric zero of 0 in v1: z - 1 = -1, every field of the word set.
        t[f"{q}.qzeros"][0, 1] = -1
        return t

    asym_v1 = root / "qwen2-8b-g128-asym-v1"
    qq = "model.layers.1.mlp.down_proj"

    def underflow_asym(t):
        t[f"{qq}.qzeros"][0, 0] = -1
        return t

    jobs += [
        Job("broken-missing-g_idx", str(_edit_tensors(base, root / "broken-g_idx", drop_g_idx)),
            expect_error=[f"{q}.g_idx is missing (expected shape (128,)", "act-order"]),
        Job("broken-wrong-shape", str(_edit_tensors(base, root / "broken-shape", truncate)),
            expect_error=[f"{q}.qweight: shape (15, 128), expected (16, 128)"]),
        Job("broken-nan-scales", str(_edit_tensors(base, root / "broken-nan", nan_scales)),
            expect_error=[f"{q}.scales: contains NaN"]),  # the shard, not qkv_proj
        Job("broken-v1-sym-label", str(_edit_tensors(base, root / "broken-label", underflow)),
            expect_error=[f"{q}.qzeros", "mislabelled"]),
        Job("broken-v1-asym-underflow", str(_edit_tensors(asym_v1, root / "broken-underflow", underflow_asym)),
            expect_error=[f"{qq}.qzeros: v1 zero field 255", "cannot be recovered"]),
    ]
    return jobs


# ---- the engine subprocess (this file run as a script) ----------------------------------------------------

def run_jobs(jobs: list[dict], prompts: list[list[int]], max_tokens: int, engine: dict | None = None) -> list[dict]:
    """Generate with every job's checkpoint in turn; `engine` holds LLM arguments (the GPU test's TP etc.).

    Without `engine`: the CPU set-up, engine core and worker in this process, eager.
    """
    if engine is None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        engine = {"enforce_eager": True, "distributed_executor_backend": "uni"}
    import gptq_vllm
    from vllm import LLM, SamplingParams

    gptq_vllm.register()  # what the vllm.general_plugins entry point does, for trees not pip-installed
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=2, ignore_eos=True)
    results = []
    for job in jobs:
        llm = None
        try:
            llm = LLM(model=job["model"], quantization="mygptq", dtype="float16", max_model_len=128, max_num_seqs=4,
                      seed=0, **engine)
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            results.append({"name": job["name"], "outputs": [
                {"tokens": list(o.outputs[0].token_ids),
                 "logprobs": [lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]}
                for o in outs]})
        except Exception as e:  # a broken checkpoint: report the error chain for the test to check
            chain, err = [], e
            while err is not None:
                chain.append(f"{type(err).__name__}: {err}")
                err = err.__cause__ or err.__context__
            results.append({"name": job["name"], "error": chain})
        finally:
            del llm
    return results


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    results = run_jobs(spec["jobs"], spec["prompts"], spec["max_tokens"], spec.get("engine"))
    Path(sys.argv[2]).write_text(json.dumps(results))
    sys.exit(0)


# ---- tests -------------------------------------------------------------------------------------------------

def vllm_env() -> dict[str, str]:
    # A small CPU KV cache: several agents and CI jobs share this machine.
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1"}


def prompt_ids(model_dir: str) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


def teacher_forced(reference: str, prompts: list[list[int]], outputs: list[dict]):
    """transformers on the dequantized model, fed vLLM's tokens: (logprobs [T, V]) per prompt."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float16).eval()
    per_prompt = []
    with torch.no_grad():
        for p, out in zip(prompts, outputs):
            ids = torch.tensor([p + out["tokens"]])
            logits = model(ids).logits[0, len(p) - 1:-1].float()
            per_prompt.append(torch.log_softmax(logits, dim=-1))
    return per_prompt


def check_against_reference(result: dict, reference: str, prompts: list[list[int]]) -> None:
    for out, logprobs in zip(result["outputs"], teacher_forced(reference, prompts, result["outputs"])):
        tokens = torch.tensor(out["tokens"])
        ours = torch.tensor(out["logprobs"])
        theirs = logprobs[torch.arange(len(tokens)), tokens]
        assert torch.allclose(ours, theirs, atol=LOGPROB_TOL), (
            f"{result['name']}: logprobs differ from transformers by {float((ours - theirs).abs().max()):.4f}")
        best = logprobs.argmax(dim=-1)
        for step in (best != tokens).nonzero().flatten().tolist():
            gap = float(logprobs[step, best[step]] - logprobs[step, tokens[step]])
            assert gap < TIE, (f"{result['name']}: step {step} chose token {int(tokens[step])}, transformers "
                               f"prefers {int(best[step])} by {gap:.4f} (more than a fp tie-break)")


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin-engine")
    jobs = build_jobs(root)
    prompts = prompt_ids(jobs[0].model)
    spec, out = root / "spec.json", root / "results.json"
    spec.write_text(json.dumps({"jobs": [asdict(j) for j in jobs], "prompts": prompts, "max_tokens": MAX_TOKENS}))
    proc = subprocess.run(["flock", "/tmp/vllm-engine.lock", sys.executable, __file__, str(spec), str(out)],
                          cwd=HERE.parent, env=vllm_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = {r["name"]: r for r in json.loads(out.read_text())}
    return {j.name: (j, results[j.name]) for j in jobs}, prompts


GOOD = [c[0] for c in GPTQ_CASES] + ["converted-marlin-4b-actorder", "converted-exllama-4b-asym"]
BROKEN = ["broken-missing-g_idx", "broken-wrong-shape", "broken-nan-scales", "broken-v1-sym-label",
          "broken-v1-asym-underflow"]


@pytest.mark.vllm
@pytest.mark.parametrize("name", GOOD)
def test_greedy_tokens_match_transformers(engine_run, name):
    runs, prompts = engine_run
    job, result = runs[name]
    assert "error" not in result, "\n".join(result["error"])
    assert all(len(o["tokens"]) == MAX_TOKENS for o in result["outputs"])
    check_against_reference(result, job.reference, prompts)


@pytest.mark.vllm
def test_converted_checkpoint_gives_the_tokens_of_its_gptq_source(engine_run):
    # Same codes, same scales, a different layout: the CPU op sees identical weights.
    runs, _ = engine_run
    converted = runs["converted-marlin-4b-actorder"][1]
    source = runs["llama-4b-g128-sym-actorder-v1-thebloke"][1]
    assert converted["outputs"] == source["outputs"]


@pytest.mark.vllm
@pytest.mark.parametrize("name", BROKEN)
def test_broken_checkpoint_fails_with_named_error(engine_run, name):
    runs, _ = engine_run
    job, result = runs[name]
    assert "error" in result, f"{name} loaded although it is broken"
    text = "\n".join(result["error"])
    for expected in job.expect_error:
        assert expected in text, text
