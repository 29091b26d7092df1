"""End-to-end offline generation throughput in vLLM: `--quantization mygptq` against in-tree `gptq` and fp16.

    python benchmarks/e2e_throughput.py [--batches 1,16,64,256] [--prefill 1024,16,32] [--layers 32] [--out DIR]
    python benchmarks/e2e_throughput.py --methods mygptq,mygptq-3bit,fp16    # issue 14: 3-bit beside 4-bit
    python benchmarks/e2e_throughput.py --methods mygptq-act,gptq-act,mygptq  # act-order checkpoints

1. Writes a Llama-3-8B-shaped 4-bit g128 symmetric GPTQ checkpoint with random codes (no act-order;
   convert_speed.generate), for mygptq-3bit the same at 3 bits, for the act-order methods the same with act-order
   (random permutations, shared by the modules that read one input, as GPTQ writes them; gptq-act serves it as
   it is, mygptq-act the `gptq-convert` output the user would serve, whose down_proj permutations are absorbed
   into gate/up), and beside them the model unquantized (its config without the quantization config; vLLM fills
   the fp16 weights with `load_format="dummy"`, speed does not depend on their values).
2. For each method (mygptq, gptq, mygptq-3bit, mygptq-act, gptq-act on the GPTQ checkpoints; fp16 on the float
   one), in its own process (one engine each, CUDA graphs and torch.compile as vLLM defaults them, Triton
   attention): per case one warm-up generate, then the timed `LLM.generate` of `batch` random prompts with exactly
   the case's output tokens (ignore_eos).  Every generate gets prompts of its own: vLLM caches prefixes by default,
   and a timed call on the warm-up's prompts would find their whole prefill cached (until 2026-12-06 it did: the
   prefill-heavy case then timed mostly its 16 decode steps).  Cases: decode-heavy, 128 prompt / 128 output tokens
   at each of --batches; prefill-heavy, --prefill IN,OUT,BATCH (default 1024 / 16 at batch 32).  Throughput =
   output tokens / wall time of that call (prefill included), as `vllm bench throughput` counts it; the best of
   --repeats.
3. Prints one JSON object (also written to DIR/e2e_throughput.json) with tok/s per method and case and the
   mygptq / gptq, mygptq / fp16, mygptq-3bit / mygptq, mygptq-act / gptq-act and mygptq-act / mygptq ratios.
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
from convert_speed import LLAMA3_8B, generate, run_convert  # noqa: E402

RUN_SCRIPT = """
import json, sys, time
import numpy as np
from vllm import LLM, SamplingParams
model, quantization, cases, repeats = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
extra = {"load_format": "dummy"} if quantization == "none" else {"quantization": quantization}
llm = LLM(model=model, skip_tokenizer_init=True, attention_backend="TRITON_ATTN", gpu_memory_utilization=0.85,
          max_model_len=max(i + o for i, o, _ in cases.values()), max_num_seqs=max(b for _, _, b in cases.values()),
          dtype="float16", seed=0, **extra)
rng = np.random.default_rng(0)
def fresh(n_in, batch):  # new prompts for every generate: none finds its prefix cached
    return [{"prompt_token_ids": rng.integers(100, 30000, n_in).tolist()} for _ in range(batch)]
result = {}
for case, (n_in, n_out, batch) in cases.items():
    params = SamplingParams(max_tokens=n_out, min_tokens=n_out, ignore_eos=True, temperature=0)
    llm.generate(fresh(n_in, batch), params, use_tqdm=False)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        prompts = fresh(n_in, batch)
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        best = min(best, time.perf_counter() - start)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    result[case] = {"tok_per_s": tokens / best, "s": best, "output_tokens": tokens, "in": n_in, "out": n_out,
                    "batch": batch}
print("RESULT " + json.dumps(result))
"""

# method -> (checkpoint, vLLM quantization argument; "none" = unquantized with dummy weights)
METHODS = {"mygptq": ("gptq", "mygptq"), "gptq": ("gptq", "gptq"), "mygptq-3bit": ("gptq-3bit", "mygptq"),
           "mygptq-act": ("gptq-act-converted", "mygptq"), "gptq-act": ("gptq-act", "gptq"), "fp16": ("float", "none")}
RATIOS = (("mygptq", "gptq"), ("mygptq", "fp16"), ("mygptq-3bit", "mygptq"), ("mygptq-act", "gptq-act"),
          ("mygptq-act", "mygptq"))


def run(model: Path, quantization: str, cases: dict, repeats: int) -> dict:
    return run_child(RUN_SCRIPT, [str(model), quantization, json.dumps(cases), str(repeats)],
                     f"{quantization} run", 1800)[0]


def write_float_config(gptq_model: Path, directory: Path) -> None:
    """The unquantized model of the same shapes: the config without its quantization config (no weights)."""
    directory.mkdir(parents=True)
    config = json.loads((gptq_model / "config.json").read_text())
    config.pop("quantization_config")
    (directory / "config.json").write_text(json.dumps(config))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/e2e-throughput"),
                    help="where the generated checkpoints go (emptied first, removed at the end)")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers of the Llama-3-8B-shaped model")
    ap.add_argument("--batches", default="1,16,64,256", help="batch sizes of the 128-in / 128-out case")
    ap.add_argument("--prefill", default="1024,16,32", help="prefill-heavy case: IN,OUT,BATCH ('' for none)")
    ap.add_argument("--repeats", type=int, default=2, help="timed generates per case (the best counts)")
    ap.add_argument("--methods", default="mygptq,gptq,fp16", help="methods, one engine each: "
                    + ", ".join(METHODS))
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    cases = {f"decode-b{b}": (128, 128, int(b)) for b in args.batches.split(",")}
    if args.prefill:
        n_in, n_out, batch = (int(v) for v in args.prefill.split(","))
        cases[f"prefill-{n_in}x{n_out}-b{batch}"] = (n_in, n_out, batch)
    methods = args.methods.split(",")
    models = {"gptq": args.workdir / "llama3-8b-gptq-g128", "gptq-3bit": args.workdir / "llama3-8b-gptq-3bit-g128",
              "gptq-act": args.workdir / "llama3-8b-gptq-act-g128",
              "gptq-act-converted": args.workdir / "llama3-8b-gptq-act-g128-mygptq",
              "float": args.workdir / "llama3-8b-float"}
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"--methods: unknown {', '.join(unknown)} (expected some of {', '.join(METHODS)})")
    shutil.rmtree(args.workdir, ignore_errors=True)
    try:
        if {"mygptq", "gptq", "fp16"} & set(methods):  # fp16's config is this checkpoint's without quantization
            generate(models["gptq"], args.layers, LLAMA3_8B, act_order=False)
        if "mygptq-3bit" in methods:
            generate(models["gptq-3bit"], args.layers, LLAMA3_8B, act_order=False, bits=3)
        if {"mygptq-act", "gptq-act"} & set(methods):
            generate(models["gptq-act"], args.layers, LLAMA3_8B, act_order=True)
        if "mygptq-act" in methods:
            run_convert(models["gptq-act"], models["gptq-act-converted"])
        if "fp16" in methods:
            write_float_config(models["gptq"], models["float"])
        results = {}
        for m in methods:
            checkpoint, quantization = METHODS[m]
            results[m] = run(models[checkpoint], quantization, cases, args.repeats)
        report = {"model": f"Llama-3-8B shapes, {args.layers} layers, random 4-bit (mygptq-3bit: 3-bit) g128 sym "
                           f"GPTQ codes (*-act: with act-order); fp16: the same model unquantized (dummy weights)",
                  "cases": {c: {"in": i, "out": o, "batch": b} for c, (i, o, b) in cases.items()},
                  "tok_per_s": {m: {c: round(r[c]["tok_per_s"], 1) for c in cases} for m, r in results.items()},
                  "runs": results, "date": time.strftime("%Y-%m-%d %H:%M %Z")}
        for num, ref in RATIOS:
            if ref in results and num in results:
                report[f"{num}_over_{ref}"] = {c: round(results[num][c]["tok_per_s"] /
                                                        results[ref][c]["tok_per_s"], 3) for c in cases}
        emit(report, args.out, "e2e_throughput.json")
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
