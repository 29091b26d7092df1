"""CLI commands of the quantizer: `gptq-convert quantize` and `gptq-convert eval`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click
import torch

from ..checkpoint.commands import quiet_option
from ..checkpoint.emit import Target
from ..errors import user_errors
from .qep import DEFAULT_ALPHA, QEP
from .solver import ACT_ORDERS, QuantSpec


def resolve_model(model: str) -> Path:
    """A local directory, or a Hub id found in the local Hugging Face cache (never downloaded here)."""
    path = Path(model)
    if path.is_dir():
        return path
    if path.exists() or model.count("/") != 1:
        raise click.BadParameter(f"{model}: not a model directory nor a Hub id (owner/name)", param_hint="MODEL")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model, local_files_only=True))
    except LocalEntryNotFoundError:
        raise click.BadParameter(f"{model}: not in the local Hugging Face cache; download it first "
                                 f"(`hf download {model}`) on a machine with network access", param_hint="MODEL") from None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine", param_hint="--device")
    return dev


def _dtype(name: str) -> torch.dtype | None:
    return None if name == "auto" else getattr(torch, name)


def _dynamic(value: str | None, skip: tuple[str, ...]) -> dict | None:
    dynamic = {}
    if value:
        text = Path(value[1:]).read_text() if value.startswith("@") else value
        try:
            dynamic = json.loads(text)
        except json.JSONDecodeError as e:
            raise click.BadParameter(f"not JSON ({e})", param_hint="--dynamic") from None
        if not isinstance(dynamic, dict):
            raise click.BadParameter("expected a JSON object of regex -> overrides", param_hint="--dynamic")
    dynamic.update({f"-:{pattern}": {} for pattern in skip})
    return dynamic or None


COMMON = [
    click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto."),
    click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto",
                 show_default=True, help="Forward dtype (auto: the checkpoint's on CUDA, float32 on CPU)."),
]


def _common(f):
    for option in reversed(COMMON):
        f = option(f)
    return f


@click.command(short_help="Quantize a float model with GPTQ (or RTN) into a checkpoint.")
@click.argument("model")
@click.argument("out", type=click.Path())
@click.option("--method", type=click.Choice(["gptq", "rtn"]), default="gptq", show_default=True,
              help="GPTQ, or round-to-nearest (no calibration: the baseline).")
@click.option("--bits", type=click.Choice(["2", "3", "4", "8"]), default="4", show_default=True,
              help="Bits per weight code.")
@click.option("--group-size", type=int, default=128, show_default=True,
              help="Input channels sharing one scale and zero; -1 for one group per output channel.")
@click.option("--sym/--asym", default=True, show_default=True,
              help="Symmetric grid (zero fixed at 2^(bits-1)) or asymmetric (zero fitted per group).")
@click.option("--act-order", type=click.Choice(ACT_ORDERS), default="static", show_default=True,
              help="Column order: none; static (decreasing Hessian diagonal, groups of the original layout, "
                   "trivial g_idx); desc (same order, groups in that order: desc_act with a g_idx).")
@click.option("--damp", type=float, default=0.01, show_default=True, help="Damping, relative to mean(diag H).")
@click.option("--mse", type=float, default=2.4, show_default=True,
              help="Clip each group's range where that lowers the quantization error (usually a better "
                   "model); 0 turns it off. The value is the norm of the search (GPTQModel's mse; 2.4 in "
                   "the reference tools): per row the range is shrunk to p x [min, max], p = 1.00, 0.99, ... "
                   "0.21, keeping the p with the least sum |Q(w) - w|^norm. 0: min-max, as AutoGPTQ and "
                   "GPTQModel do by default. GPTQ and RTN.")
@click.option("--calib", "calib", multiple=True, type=click.Path(exists=True),
              help="Calibration .txt/.jsonl file or directory (repeatable); default: the bundled corpus.")
@click.option("--nsamples", type=int, default=128, show_default=True, help="Calibration rows.")
@click.option("--seqlen", type=int, default=2048, show_default=True, help="Tokens per calibration row.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the calibration sampling.")
@click.option("--format", "fmt", type=click.Choice([t.value for t in Target]), default="gptq-v1", show_default=True,
              help="Checkpoint format (asymmetric gptq-v1 keeps zeros >= 1, since v1 stores z-1).")
@click.option("--dynamic", help="GPTQModel-style per-module overrides, JSON or @file: "
                                "{\"+:regex\": {\"bits\": 8, \"group_size\": 32}, \"-:regex\": {}}.")
@click.option("--skip", multiple=True, help="Regex of modules kept in float (repeatable; same as -:regex).")
@click.option("--lm-head", is_flag=True, help="Quantize lm_head too (refused when tied to the embeddings).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Calibration rows per forward.")
@click.option("--qep", is_flag=True,
              help="Quantization error propagation (Arai & Ichikawa, 2025): fit each layer to the full-precision "
                   "model's outputs instead of its own, correcting the error of the layers quantized before it. "
                   "Carries a second (full-precision) stream of activations; about 2x the calibration forwards.")
@click.option("--qep-alpha", multiple=True, metavar="[REGEX=]ALPHA",
              help="Share of the propagated error QEP corrects, in [0, 1]: REGEX=ALPHA for the modules whose full "
                   "name matches (re.search, first match wins; repeatable), a bare ALPHA for all others. "
                   f"Default: {', '.join(f'{p}={a}' if p else str(a) for p, a in DEFAULT_ALPHA)}.")
@click.option("--qep-compare", is_flag=True,
              help="With --qep, also solve every layer without the correction and report both output errors "
                   "against the full-precision model (one more GPTQ loop and layer forward per layer).")
@_common
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("-v", "--verbose", is_flag=True, help="Log every layer's output error.")
@quiet_option
def quantize(model, out, method, bits, group_size, sym, act_order, damp, mse, calib, nsamples, seqlen, seed, fmt,
             dynamic, skip, lm_head, batch_size, qep, qep_alpha, qep_compare, device, dtype, overwrite, verbose, quiet):
    """Quantize the float model MODEL (directory or cached Hub id) into the checkpoint OUT.

    GPTQ layer by layer, the model streamed from its safetensors; OUT appears only when complete and
    holds quantize_report.json (per-module loss, per-layer output error, time per stage).
    """
    from .calibration import build_calibration
    from .pipeline import Job
    from .pipeline import quantize as run

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    target = Target(fmt)
    if target is Target.COMPRESSED_TENSORS and bits == "3":
        raise click.BadParameter("compressed-tensors holds 2-, 4- or 8-bit weights", param_hint="--bits")
    model_dir = resolve_model(model)
    if Path(out).exists() and not overwrite:
        raise click.ClickException(f"{out}: already exists (pass --overwrite to replace it)")
    if (qep_alpha or qep_compare) and not qep:
        raise click.UsageError("--qep-alpha and --qep-compare need --qep")
    if qep and method != "gptq":
        raise click.UsageError("--qep corrects GPTQ's targets: it needs --method gptq")
    try:
        spec = QuantSpec(int(bits), group_size, sym, act_order, damp, mse=mse)
        qep_settings = QEP(QEP.parse_alpha(qep_alpha), qep_compare) if qep else None
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    job = Job(model_dir=model_dir, out_dir=Path(out), spec=spec, target=target, dynamic=_dynamic(dynamic, skip),
              lm_head=lm_head, method=method, device=resolve_device(device), dtype=_dtype(dtype),
              batch_size=batch_size, overwrite=overwrite, progress=not quiet, qep=qep_settings)
    calibration = None
    if method == "gptq":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        calibration = build_calibration(tokenizer, list(calib), nsamples, seqlen, seed)
    with user_errors():
        report = run(job, calibration)
    for key, what in (("rel_error", "relative layer output error"),
                      ("fp_error", "relative layer output error against the full-precision model"),
                      ("fp_error_without_qep", "the same without the QEP correction")):
        errors = [layer[key] for layer in report["layers"] if key in layer]
        if errors:
            click.echo(f"{what}: mean {sum(errors) / len(errors):.4g}, max {max(errors):.4g}")
    click.echo("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report["seconds"].items()))
    click.echo(f"wrote {out}")


@click.command("eval", short_help="Perplexity of a float or quantized model on a text file.")
@click.argument("model")
@click.option("--data", "data", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Text file, read whole and tokenized once (no BOS).")
@click.option("--seqlen", type=int, default=512, show_default=True, help="Tokens per non-overlapping window.")
@click.option("--base", help="The float model MODEL was quantized from: adds the per-layer relative output "
                             "error of MODEL and of round-to-nearest (same settings) against it.")
@click.option("--layer-windows", type=int, default=16, show_default=True,
              help="Windows used for the per-layer report.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Windows per forward.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the results here.")
@_common
@quiet_option
def evaluate(model, data, seqlen, base, layer_windows, batch_size, json_out, device, dtype, quiet):
    """Perplexity of MODEL (float or quantized: dequantized into transformers) on a text file."""
    from .eval import layer_report, load_model, perplexity

    dev = resolve_device(device)
    model_dir = resolve_model(model)
    from transformers import AutoTokenizer

    with user_errors():  # a malformed checkpoint: the one-line message of every command (validate)
        lm = load_model(model_dir, dev, _dtype(dtype))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = Path(data).read_text(encoding="utf-8")
    result = perplexity(lm, tokenizer, text, seqlen, batch_size, progress=not quiet)
    click.echo(f"perplexity {result['ppl']:.4f} ({result['windows']} windows of {seqlen}, "
               f"{result['tokens_scored']} tokens scored)")
    if base:
        base_lm = load_model(resolve_model(base), dev, _dtype(dtype))
        rows = layer_report(base_lm, lm, tokenizer, text, seqlen, layer_windows, batch_size, progress=not quiet)
        result["layers"] = rows
        click.echo(f"{'layer':>5} {'rel. error':>12} {'rtn':>12} {'ratio':>7}")
        for r in rows:
            ratio = r["error"] / r["rtn_error"] if r["rtn_error"] else float("nan")
            click.echo(f"{r['layer']:>5} {r['error']:>12.4g} {r['rtn_error']:>12.4g} {ratio:>7.3f}")
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")


COMMANDS = [quantize, evaluate]
