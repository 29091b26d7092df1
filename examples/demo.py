"""`make demo`: quantize a small model with GPTQ, convert it to our kernel layout, generate through vLLM.

  1. gptq-convert quantize  MODEL -> OUT/gptq     (4-bit g128, act-order, bundled calibration text)
  2. gptq-convert convert   OUT/gptq -> OUT/mygptq (Marlin layout, act-order folded offline)
  3. gptq-convert verify    OUT/gptq OUT/mygptq    (both dequantize to the same weights)
  4. vLLM LLM(..., quantization="mygptq") generates from both checkpoints; the greedy texts must agree.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

PROMPTS = [
    "It was a cold morning in the village, and",
    "The captain looked at the map and said",
    "Once upon a time there lived a king who",
]


def run_cli(*args: str) -> None:
    from converters.cli import main

    print("$ gptq-convert " + " ".join(args), flush=True)
    main(list(args), standalone_mode=False)


def generate(model: Path, max_tokens: int) -> list[str]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model), quantization="mygptq", dtype="float16", gpu_memory_utilization=0.2,
              max_model_len=512, seed=0)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return [o.outputs[0].text for o in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="../shared/models/gutenberg-llama-27m", help="float checkpoint directory")
    parser.add_argument("--out", default="demo-out", help="working directory for the checkpoints")
    parser.add_argument("--nsamples", type=int, default=32, help="calibration rows")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per calibration row")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    gptq_dir, mygptq_dir = out / "gptq", out / "mygptq"
    run_cli("quantize", args.model, str(gptq_dir), "--bits", "4", "--group-size", "128", "--act-order", "desc",
            "--format", "gptq-v1", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen))
    run_cli("convert", str(gptq_dir), str(mygptq_dir))
    run_cli("verify", str(gptq_dir), str(mygptq_dir))

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    texts_gptq = generate(gptq_dir, args.max_tokens)
    texts_mygptq = generate(mygptq_dir, args.max_tokens)
    for prompt, a, b in zip(PROMPTS, texts_gptq, texts_mygptq):
        print(f"\n>>> {prompt}\n[gptq, repacked at load] {a}\n[mygptq, converted]     {b}")
    same = sum(a == b for a, b in zip(texts_gptq, texts_mygptq))
    print(f"\n{same}/{len(PROMPTS)} prompts generate the same greedy text from both checkpoints")


if __name__ == "__main__":
    main()
