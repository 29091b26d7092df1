"""`make demo`: quantize a small model with GPTQ, convert it to our kernel layout, generate through vLLM.

  1. gptq-convert quantize  MODEL -> OUT/gptq     (4-bit g128, act-order, bundled calibration text)
  2. gptq-convert convert   OUT/gptq -> OUT/mygptq (Marlin layout, act-order folded offline)
  3. gptq-convert verify    OUT/gptq OUT/mygptq    (both dequantize to the same weights)
  4. vLLM LLM(..., quantization="mygptq") generates from both checkpoints; the greedy texts must agree.

vLLM's own output (its log, its engine processes' warnings and progress bars) goes to OUT/vllm.log, and
each engine is shut down as soon as its texts are in, so the demo's verdict is the last line printed.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
from contextlib import contextmanager
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


@contextmanager
def output_to(log: Path):
    """Send everything written to this process's stdout and stderr, and to those of the processes it starts
    (vLLM's engine core and workers inherit them), to the file log; on an error, show the log's tail."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(log, "ab") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    except BaseException:
        tail = log.read_text(errors="replace").splitlines()[-40:]
        print(f"vLLM failed; the last lines of {log}:", *tail, sep="\n", file=sys.stderr)
        raise
    finally:
        os.close(saved[0])
        os.close(saved[1])


def generate(model: Path, max_tokens: int, log: Path) -> list[str]:
    """Greedy texts of PROMPTS from vLLM with --quantization mygptq; the engine is shut down on return."""
    with output_to(log):
        from vllm import LLM, SamplingParams

        llm = LLM(model=str(model), quantization="mygptq", dtype="float16", gpu_memory_utilization=0.2,
                  max_model_len=512, seed=0)
        outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
        texts = [o.outputs[0].text for o in outputs]
        # vLLM 0.32 has no LLM.shutdown(): dropping the last reference (the engine sits in reference cycles,
        # hence the collection) stops its processes and frees its memory now, not at interpreter exit.
        del llm, outputs
        gc.collect()
    return texts


def verdict(texts_a: list[str], texts_b: list[str]) -> str:
    """The demo's last line."""
    same = sum(a == b for a, b in zip(texts_a, texts_b, strict=True))
    return f"{same}/{len(texts_a)} prompts generate the same greedy text from both checkpoints"


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
    log = out / "vllm.log"
    texts = {}
    for name, directory in (("gptq", gptq_dir), ("mygptq", mygptq_dir)):
        print(f"$ vLLM: LLM({str(directory)!r}, quantization='mygptq').generate(...)   (log: {log})", flush=True)
        texts[name] = generate(directory, args.max_tokens, log)
    for prompt, a, b in zip(PROMPTS, texts["gptq"], texts["mygptq"]):
        print(f"\n>>> {prompt}\n[gptq, repacked at load] {a}\n[mygptq, converted]     {b}")
    print("\n" + verdict(texts["gptq"], texts["mygptq"]), flush=True)


if __name__ == "__main__":
    main()
