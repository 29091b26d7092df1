"""End-to-end offline generation throughput in vLLM: `--quantization mygptq` against in-tree `gptq`.

    python benchmarks/e2e_throughput.py [--batches 1,16,64,256] [--layers 32] [--out DIR]

1. Writes a Llama-3-8B-shaped 4-bit g128 symmetric GPTQ checkpoint with random codes (no act-order;
   convert_speed.generate), the setting of issue 7's end-to-end target.
2. For each quantization method, in its own process (one engine each, CUDA graphs and torch.compile as
   vLLM defaults them, Triton attention): one warm-up generate per batch size, then the timed
   `LLM.generate` of `batch` random 128-token prompts with exactly 128 output tokens each (ignore_eos).
   Throughput = output tokens / wall time of that call (prefill included), as `vllm bench throughput`
   counts it; the best of --repeats.
3. Prints one JSON object (also written to DIR/e2e_throughput.json) with tok/s per method and batch and
   the mygptq / gptq ratios.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from child import emit, run_child  # noqa: E402
from convert_speed import LLAMA3_8B, generate  # noqa: E402

RUN_SCRIPT = """
import json, sys, time
import numpy as np
from vllm import LLM, SamplingParams
model, quantization, batches, repeats = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
llm = LLM(model=model, quantization=quantization, skip_tokenizer_init=True, attention_backend="TRITON_ATTN",
          gpu_memory_utilization=0.85, max_model_len=512, max_num_seqs=max(batches), dtype="float16", seed=0)
params = SamplingParams(max_tokens=128, min_tokens=128, ignore_eos=True, temperature=0)
rng = np.random.default_rng(0)
result = {}
for batch in batches:
    prompts = [{"prompt_token_ids": rng.integers(100, 30000, 128).tolist()} for _ in range(batch)]
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        best = min(best, time.perf_counter() - start)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    result[batch] = {"tok_per_s": tokens / best, "s": best, "output_tokens": tokens}
print("RESULT " + json.dumps(result))
"""


def run(model: Path, quantization: str, batches: list[int], repeats: int) -> dict:
    return run_child(RUN_SCRIPT, [str(model), quantization, json.dumps(batches), str(repeats)],
                     f"{quantization} run", 1200)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/e2e-throughput"))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--methods", default="gptq,mygptq", help="quantization methods, one engine each")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    model = args.workdir / "llama3-8b-gptq-g128"
    shutil.rmtree(args.workdir, ignore_errors=True)
    try:
        generate(model, args.layers, LLAMA3_8B, act_order=False)
        results = {m: run(model, m, batches, args.repeats) for m in args.methods.split(",")}
        report = {"model": f"Llama-3-8B shapes, {args.layers} layers, random 4-bit g128 sym GPTQ codes",
                  "in_out_tokens": [128, 128], "tok_per_s": {m: {b: round(r[str(b)]["tok_per_s"], 1) for b in batches}
                                                            for m, r in results.items()},
                  "runs": results, "date": time.strftime("%Y-%m-%d %H:%M %Z")}
        if "gptq" in results and "mygptq" in results:
            report["mygptq_over_gptq"] = {b: round(results["mygptq"][str(b)]["tok_per_s"] /
                                                   results["gptq"][str(b)]["tok_per_s"], 3) for b in batches}
        emit(report, args.out, "e2e_throughput.json")
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
