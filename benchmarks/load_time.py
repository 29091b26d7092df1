"""Load time in vLLM of a converted `mygptq` checkpoint against its GPTQ source (GPU machine, vLLM 0.26).

    python benchmarks/load_time.py [--workdir /tmp/load-time] [--layers 32] [--repeats 2] [--out DIR]

1. Writes a Llama-2-7B-shaped 4-bit g128 act-order GPTQ v1 checkpoint with random codes (convert_speed.py).
2. Converts it with `gptq-convert convert` (Marlin layout, act-order folded offline).
3. Loads, each in a fresh process and alternating, the source with in-tree `--quantization gptq`, the
   source with `mygptq` (repacked at load) and the converted checkpoint with `mygptq`; each load then
   generates 8 tokens to show the engine runs (random weights: the tokens say nothing about correctness,
   which tests/gpu covers). Reports the engine construction time (eager, so
   torch.compile and graph capture stay out of it) and vLLM's own "Loading weights took" figure; the
   best of --repeats. All files were just written, so every load reads from the page cache.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from child import emit, run_child  # noqa: E402
from convert_speed import generate, run_convert  # noqa: E402

LOAD_SCRIPT = """
import json, sys, time
from vllm import LLM, SamplingParams
start = time.perf_counter()
llm = LLM(model=sys.argv[1], quantization=sys.argv[2], skip_tokenizer_init=True, enforce_eager=True,
          attention_backend="TRITON_ATTN", gpu_memory_utilization=0.5, max_model_len=1024, dtype="float16")
load_s = time.perf_counter() - start
out = llm.generate([{"prompt_token_ids": [1, 450, 4996, 17354]}], SamplingParams(max_tokens=8, temperature=0))
print("RESULT " + json.dumps({"engine_s": load_s, "tokens": list(out[0].outputs[0].token_ids)}))
"""


def load_once(model: Path, quantization: str) -> dict:
    result, log = run_child(LOAD_SCRIPT, [str(model), quantization], f"load of {model} with {quantization}", 900)
    m = re.search(r"Loading weights took ([\d.]+) seconds", log)
    result["weights_s"] = float(m.group(1)) if m else None
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/load-time"))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    src, dst = args.workdir / "src-gptq", args.workdir / "dst-mygptq"
    shutil.rmtree(args.workdir, ignore_errors=True)
    try:
        size = generate(src, args.layers)
        convert = run_convert(src, dst)
        cases = {"source_gptq_intree": (src, "gptq"), "source_mygptq": (src, "mygptq"),
                 "converted_mygptq": (dst, "mygptq")}
        runs: dict[str, list[dict]] = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, (model, quant) in cases.items():
                runs[name].append(load_once(model, quant))
        best = {name: min(r["engine_s"] for r in rs) for name, rs in runs.items()}
        report = {
            "checkpoint_mb": round(size / 1e6, 1),
            "convert_s": round(convert["wall_s"], 1),
            "engine_s_best": {k: round(v, 2) for k, v in best.items()},
            "weights_s": {k: [r["weights_s"] for r in rs] for k, rs in runs.items()},
            "converted_vs_intree": round(best["converted_mygptq"] / best["source_gptq_intree"], 3),
            "runs": runs,
            "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        }
        emit(report, args.out, "load_time.json")
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
