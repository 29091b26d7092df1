"""Speed and memory of `gptq-convert convert` on a 7B-shaped act-order GPTQ checkpoint.

    python benchmarks/convert_speed.py [--workdir /tmp/convert-speed] [--layers 32] [--keep]

1. Writes a Llama-2-7B-shaped (hidden 4096, intermediate 11008, 32 layers, vocab 32000) 4-bit, group 128,
   act-order, GPTQ v1 checkpoint with random codes, TheBloke style (one model.safetensors and
   quantize_config.json), streaming one tensor at a time.
2. Runs `gptq-convert convert SRC DST -q` in a child process and measures its wall time and peak RSS
   (getrusage of the child); the converter's own timing line (without interpreter start-up) is kept too.
3. Prints one JSON object and deletes the generated checkpoints (unless --keep).

The source was just written, so it is read from the page cache: this measures the converter, not the disk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from converters.checkpoint.writer import CheckpointWriter
from gptq_vllm.formats import bitpack

BITS, GROUP = 4, 128


def _gptq_module(K: int, N: int, perm: torch.Tensor, g: torch.Generator, bits: int) -> dict[str, torch.Tensor]:
    ng = K // GROUP
    return {
        "qweight": torch.randint(-2**31, 2**31, (K * bits // 32, N), dtype=torch.int32, generator=g),
        # symmetric v1: every stored zero is 2^(b-1) - 1 (formats.md §1.4)
        "qzeros": bitpack.pack_cols(torch.full((ng, N), 2 ** (bits - 1) - 1, dtype=torch.int32), bits),
        "scales": (torch.rand(ng, N, generator=g) * 0.01 + 1e-3).half(),
        "g_idx": (torch.argsort(perm) // GROUP).to(torch.int32),  # act-order: groups over permuted channels
    }


@dataclass(frozen=True)
class LlamaShape:
    hidden: int = 4096
    intermediate: int = 11008
    vocab: int = 32000
    heads: int = 32
    kv_heads: int = 32


LLAMA2_7B = LlamaShape()
LLAMA3_8B = LlamaShape(hidden=4096, intermediate=14336, vocab=128256, heads=32, kv_heads=8)


def generate(directory: Path, layers: int, shape: LlamaShape = LLAMA2_7B, act_order: bool = True,
             bits: int = BITS) -> int:
    """Write the source checkpoint (random b-bit codes; act-order with shared permutations, or plain groups);
    returns its size in bytes."""
    g = torch.Generator().manual_seed(0)
    H, I, V = shape.hidden, shape.intermediate, shape.vocab
    kv = H // shape.heads * shape.kv_heads
    shapes = {"self_attn": {"q_proj": (H, H), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (H, H)},
              "mlp": {"gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}}
    with CheckpointWriter(directory, max_shard_bytes=2**40) as w:
        w.add("model.embed_tokens.weight", (torch.randn(V, H, generator=g) * 0.02).half())
        order = (lambda n: torch.randperm(n, generator=g)) if act_order else torch.arange
        for i in range(layers):
            # Modules reading the same input share one act-order permutation, as GPTQ produces.
            shared = {"attn": order(H), "mlp": order(H)}
            for parent, modules in shapes.items():
                for name, (K, N) in modules.items():
                    key = "attn" if name in ("q_proj", "k_proj", "v_proj") else "mlp" if name in ("gate_proj", "up_proj") else None
                    perm = shared[key] if key else order(K)
                    for suffix, t in _gptq_module(K, N, perm, g, bits).items():
                        w.add(f"model.layers.{i}.{parent}.{name}.{suffix}", t)
            for norm in ("input_layernorm", "post_attention_layernorm"):
                w.add(f"model.layers.{i}.{norm}.weight", torch.ones(H, dtype=torch.float16))
        w.add("model.norm.weight", torch.ones(H, dtype=torch.float16))
        w.add("lm_head.weight", (torch.randn(V, H, generator=g) * 0.02).half())
        qcfg = {"bits": bits, "group_size": GROUP, "desc_act": act_order, "sym": True, "damp_percent": 0.01,
                "true_sequential": True, "static_groups": False, "quant_method": "gptq", "checkpoint_format": "gptq",
                "model_file_base_name": "model"}
        w.write_json("quantize_config.json", qcfg)
        w.write_json("config.json", {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H,
            "intermediate_size": I, "num_hidden_layers": layers, "num_attention_heads": shape.heads,
            "num_key_value_heads": shape.kv_heads, "vocab_size": V, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "torch_dtype": "float16", "tie_word_embeddings": False, "quantization_config": qcfg})
        size = w.total_bytes
        w.finish()
    return size


def run_convert(src: Path, dst: Path) -> dict:
    cmd = [sys.executable, "-c", "from converters.cli import main; main()", "convert", str(src), str(dst), "-q"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"convert failed:\n{proc.stdout}\n{proc.stderr}")
    m = re.search(r"in ([\d.]+) s", proc.stdout)
    return {"wall_s": wall, "convert_s": float(m.group(1)) if m else None, "output": proc.stdout.strip(),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def _cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/convert-speed"))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args = ap.parse_args()
    src, dst = args.workdir / "src-gptq-7b", args.workdir / "dst-mygptq"
    shutil.rmtree(args.workdir, ignore_errors=True)
    try:
        t = time.perf_counter()
        size = generate(src, args.layers)
        gen_s = time.perf_counter() - t
        result = run_convert(src, dst)
        mb = size / 1e6
        print(json.dumps({
            "input_mb": round(mb, 1),
            "output_mb": round(sum(f.stat().st_size for f in dst.iterdir()) / 1e6, 1),
            "generate_s": round(gen_s, 1),
            "wall_s": round(result["wall_s"], 2),
            "input_mb_per_s": round(mb / result["wall_s"], 1),
            "convert_s": result["convert_s"],
            "convert_mb_per_s": round(mb / result["convert_s"], 1) if result["convert_s"] else None,
            "peak_rss_mb": round(result["peak_rss_mb"], 1),
            "converter_output": result["output"],
            "machine": {"cpus": os.cpu_count(), "cpu": _cpu_model(), "torch_threads": torch.get_num_threads(),
                        "torch": torch.__version__, "python": platform.python_version()},
            "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        }, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
