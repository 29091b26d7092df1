"""Time `gptq-convert quantize` end to end on a Llama-3-8B-shaped model with random weights.

    python benchmarks/quantize_speed.py --out /tmp/qspeed                  # 8B shape, 128 x 2048, 4-bit g128
    python benchmarks/quantize_speed.py --out /tmp/qspeed --layer-only 70b # one Llama-3-70B-shaped layer
    python benchmarks/quantize_speed.py --out /tmp/qspeed-tiny --tiny      # CPU smoke run, seconds
    python benchmarks/quantize_speed.py --out /tmp/qspeed --qep            # with QEP (gptq-convert quantize --qep)

The random model is written once to OUT/model-<shape> (streamed tensor by tensor into shards, in a child
process so that its memory does not count), then quantized in this process from its safetensors, the
way a user runs it.  Printed as JSON and written to OUT/quantize_speed-<shape>.json: seconds per stage
(load = reading layers, capture = embeddings and per-layer kwargs, hessians = calibration forwards with
Hessian accumulation, solve = Cholesky and GPTQ loop, replay = quantized forwards, write = packing and
shard writing), the GPU memory peak (torch.cuda.max_memory_allocated), the host peak RSS, and on CUDA a
check that the fused Triton column loop gives the same codes as the eager one on a real layer.
Targets (issue 6): 8B shape <= 100 s end to end, GPU peak <= 12 GB, host RSS <= 8 GB.
With --qep (issue 12): <= 1.5x the time without, GPU peak <= 14 GB.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "8b": (4096, 14336, 32, 32, 8, 128256),
    "70b": (8192, 28672, 1, 64, 8, 128256),
    "tiny": (256, 512, 2, 4, 2, 1024),
}
# Depth of the model a shape stands for, for the depth-scaled init of o_proj/down_proj (std 0.02/sqrt(2*depth)):
# the one 70B-shaped layer is a layer of an 80-layer model, not of a 1-layer one (whose residual branches
# would be sqrt(80) times too large against the residual stream).
DEPTH = {"70b": 80}


def build(model_dir: Path, shape: str, dtype: torch.dtype, device: str) -> None:
    """A random Llama of the given shape as sharded safetensors, one layer in memory at a time."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=8192,
                      tie_word_embeddings=False, dtype=str(dtype).removeprefix("torch."), architectures=["LlamaForCausalLM"])
    model_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, std=0.02):
        return (torch.randn(*shape, generator=g, device=device) * std).to(dtype).cpu()

    hd = hidden // heads
    out_std = 0.02 / (2 * DEPTH.get(shape, layers)) ** 0.5

    def shards():  # generated one at a time
        yield {"model.embed_tokens.weight": rand(vocab, hidden)}
        for i in range(layers):
            p = f"model.layers.{i}"
            yield {
                f"{p}.input_layernorm.weight": torch.ones(hidden, dtype=dtype),
                f"{p}.post_attention_layernorm.weight": torch.ones(hidden, dtype=dtype),
                f"{p}.self_attn.q_proj.weight": rand(heads * hd, hidden),
                f"{p}.self_attn.k_proj.weight": rand(kv * hd, hidden),
                f"{p}.self_attn.v_proj.weight": rand(kv * hd, hidden),
                f"{p}.self_attn.o_proj.weight": rand(hidden, heads * hd, std=out_std),
                f"{p}.mlp.gate_proj.weight": rand(inter, hidden),
                f"{p}.mlp.up_proj.weight": rand(inter, hidden),
                f"{p}.mlp.down_proj.weight": rand(hidden, inter, std=out_std),
            }
        yield {"model.norm.weight": torch.ones(hidden, dtype=dtype), "lm_head.weight": rand(vocab, hidden)}

    weight_map, total, n = {}, 0, layers + 2
    for k, tensors in enumerate(shards()):
        name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        save_file(tensors, str(model_dir / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    (model_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    cfg.save_pretrained(model_dir)


def fused_check(model_dir: Path, device: torch.device) -> dict:
    """Fused Triton loop vs eager loop on layer 0's gate/up rows with a random-input Hessian."""
    from converters.quantize.capture import Checkpoint
    from converters.quantize.solver import QuantSpec, gptq_solve

    names = ["model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"]
    W = torch.cat(list(Checkpoint(model_dir).read(names, device).values())).float()
    x = torch.randn(8192, W.shape[1], device=device)
    H = 2 * x.t() @ x / x.shape[0]
    out = {}
    for order in ("static", "desc"):
        spec = QuantSpec(4, 128, True, order)
        t0 = time.perf_counter()
        a = gptq_solve(W, H, spec, fused=True)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        b = gptq_solve(W, H, spec, fused=False)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        out[order] = {"codes_equal_fraction": float((a.codes == b.codes).float().mean()),
                      "max_code_diff": int((a.codes - b.codes).abs().max()),
                      "loss_rel_diff": float((a.loss.sum() - b.loss.sum()).abs() / b.loss.sum()),
                      "fused_s": t1 - t0, "eager_s": t2 - t1, "rows": W.shape[0], "cols": W.shape[1]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="working directory (model, output, results)")
    ap.add_argument("--layer-only", choices=["70b"], help="time one layer of this shape instead of the 8B model")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU: checks that the script runs")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8, help="calibration rows per forward")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-fused-check", action="store_true")
    ap.add_argument("--mse", type=float, default=0.0, help="MSE clipping search norm (gptq-convert quantize --mse)")
    ap.add_argument("--qep", action="store_true", help="quantization error propagation (gptq-convert quantize --qep)")
    ap.add_argument("--qep-alpha", action="append", default=[], metavar="[REGEX=]ALPHA",
                    help="QEP alpha rules, as gptq-convert quantize --qep-alpha (repeatable; default: its defaults)")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = "tiny" if args.tiny else (args.layer_only or "8b")
    if args.tiny:
        args.nsamples, args.seqlen, args.device = min(args.nsamples, 8), min(args.seqlen, 128), "cpu"
    dtype = getattr(torch, args.dtype)
    model_dir = args.out / f"model-{shape}"
    if args.build_only:
        build(model_dir, shape, dtype, args.device)
        return
    if not (model_dir / "config.json").exists():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--build-only", "--out", str(args.out), "--dtype", args.dtype,
                        "--device", args.device] + (["--tiny"] if args.tiny else [])
                       + (["--layer-only", args.layer_only] if args.layer_only else []), check=True)
        print(f"built {model_dir} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    from converters.checkpoint.emit import Target
    from converters.quantize.calibration import Calibration
    from converters.quantize.pipeline import Job, quantize
    from converters.quantize.qep import QEP
    from converters.quantize.solver import QuantSpec

    device = torch.device(args.device)
    vocab = SHAPES[shape][5]
    rows = torch.randint(0, vocab, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    job = Job(model_dir=model_dir, out_dir=args.out / f"quantized-{shape}", spec=QuantSpec(4, 128, True, "static", mse=args.mse),
              target=Target.GPTQ_V1, device=device, dtype=dtype if device.type == "cuda" else None,
              batch_size=args.batch_size, overwrite=True,
              qep=QEP(QEP.parse_alpha(args.qep_alpha)) if args.qep else None)
    t0 = time.perf_counter()
    report = quantize(job, Calibration(rows, {"random_tokens": True}))
    total = time.perf_counter() - t0
    layers = SHAPES[shape][2]
    error = "fp_error" if args.qep else "rel_error"
    result = {
        "shape": shape, "hidden_intermediate_layers_heads_kv_vocab": SHAPES[shape], "nsamples": args.nsamples,
        "seqlen": args.seqlen, "mse": args.mse, "dtype": args.dtype, "device": torch.cuda.get_device_name() if device.type == "cuda"
        else "cpu", "torch": torch.__version__, "total_s": round(total, 2),
        "seconds": {k: round(v, 2) for k, v in report["seconds"].items()},
        "per_layer_s": round(total / layers, 2),
        "gpu_peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if device.type == "cuda" else None,
        "host_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        "qep": report.get("qep"),
        # with QEP against the full-precision model's outputs (fp_error), else against the float layer's
        "mean_rel_layer_error": sum(r[error] for r in report["layers"]) / len(report["layers"]),
        # per layer: a random model's layer 0 has by far the largest error (its output is almost all residual
        # branch; deeper layers add to a growing residual stream), so one 70B layer compares with layer 0 only
        "rel_layer_errors": [round(r[error], 4) for r in report["layers"]],
        "fallbacks": [f"{r['layer']}.{n}" for r in report["layers"] for n, m in r["modules"].items() if m["fallback"]],
    }
    if shape == "70b":
        result["extrapolated_80_layers_s"] = round(sum(v for k, v in report["seconds"].items()
                                                       if k in ("load", "hessians", "solve", "replay", "write")) * 80)
    if device.type == "cuda" and not args.no_fused_check:
        result["fused_check"] = fused_check(model_dir, device)
    text = json.dumps(result, indent=2)
    print(text)
    (args.out / f"quantize_speed-{shape}{'-qep' if args.qep else ''}.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
