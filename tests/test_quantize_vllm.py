"""Checkpoints written by `gptq-convert quantize` load in the plugin on the real vLLM CPU engine.

Greedy tokens and logprobs of vLLM (quantization="mygptq") are checked against transformers running the
same checkpoint dequantized (eval.load_model), with the engine harness of test_plugin_engine.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from converters.checkpoint.emit import Target
from converters.quantize.calibration import build_calibration
from converters.quantize.eval import load_model
from converters.quantize.pipeline import Job, quantize
from converters.quantize.qep import QEP
from converters.quantize.solver import QuantSpec
from factory import build_model
from test_plugin_engine import MAX_TOKENS, check_against_reference, prompt_ids, vllm_env

HERE = Path(__file__).resolve().parent
CASES = {  # name: (target, spec, QEP settings or None)
    "gptq-v1-4b-g128-desc": (Target.GPTQ_V1, QuantSpec(4, 128, True, "desc"), None),
    "gptq-v2-8b-g64-asym-static": (Target.GPTQ_V2, QuantSpec(8, 64, False, "static"), None),
    "mygptq-4b-g128-static": (Target.MYGPTQ, QuantSpec(4, 128, True, "static"), None),
    "gptq-v1-3b-g64-desc-qep": (Target.GPTQ_V1, QuantSpec(3, 64, True, "desc"), QEP()),
}


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("quantize-vllm")
    model = build_model(root / "float", "llama")
    calibration = build_calibration(AutoTokenizer.from_pretrained(model), None, nsamples=16, seqlen=128)
    jobs = []
    for name, (target, spec, qep) in CASES.items():
        out, ref = root / name, root / f"{name}-ref"
        quantize(Job(model, out, spec, target, progress=False, qep=qep), calibration)
        load_model(out, torch.device("cpu"), torch.float16).save_pretrained(ref)
        for f in model.iterdir():
            if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
                shutil.copy2(f, ref / f.name)
        jobs.append({"name": name, "model": str(out), "reference": str(ref), "expect_error": []})
    prompts = prompt_ids(str(model))
    spec, results = root / "spec.json", root / "results.json"
    spec.write_text(json.dumps({"jobs": jobs, "prompts": prompts, "max_tokens": MAX_TOKENS}))
    proc = subprocess.run(["flock", "/tmp/vllm-engine.lock", sys.executable, str(HERE / "test_plugin_engine.py"),
                           str(spec), str(results)], cwd=HERE.parent, env=vllm_env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return {r["name"]: r for r in json.loads(results.read_text())}, {j["name"]: j for j in jobs}, prompts


@pytest.mark.vllm
@pytest.mark.parametrize("name", list(CASES))
def test_quantized_checkpoint_runs_in_vllm_like_transformers(engine_run, name):
    results, jobs, prompts = engine_run
    result = results[name]
    assert "error" not in result, "\n".join(result["error"])
    assert all(len(o["tokens"]) == MAX_TOKENS for o in result["outputs"])
    check_against_reference(result, jobs[name]["reference"], prompts)
