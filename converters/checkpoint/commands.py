"""CLI commands that read and write existing checkpoints (convert, inspect, verify)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click

from gptq_vllm.formats.gptq import ZeroFormat
from gptq_vllm.formats.kernel_layout import Layout

from ..errors import user_errors
from .convert import convert as convert_checkpoint
from .emit import Target
from .hub import resolve
from .inspect import inspect as inspect_checkpoint
from .inspect import render
from .readers import open_checkpoint
from .verify import verify as verify_checkpoints

SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def _parse_size(ctx, param, value: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
    if m is None or m.group(2).lower() not in SIZE_UNITS:
        raise click.BadParameter(f"{value!r}: expected a size such as 500MB or 2GiB")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2).lower()])


def _zero_format(value: str | None) -> ZeroFormat | None:
    return None if value is None else ZeroFormat.parse(value)


revision_option = click.option(
    "--revision", default=None,
    help="Branch, tag or commit of a Hub SRC, e.g. TheBloke's gptq-4bit-32g-actorder_True (default: main).")
checkpoint_format_option = click.option(
    "--checkpoint-format", type=click.Choice([f.value for f in ZeroFormat]), default=None,
    help="Zero-point convention of a GPTQ SRC, overriding its config: gptq (v1, stores z-1) or gptq_v2 "
         "(stores z).  Without it the config's value is used and checked against the data, and a "
         "mislabelled checkpoint is refused.")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bar.")


@click.command(short_help="Repack a quantized checkpoint (GPTQ, GPTQModel, llm-compressor) for mygptq.")
@click.argument("src")
@click.argument("dst", type=click.Path(file_okay=False, path_type=Path))
@click.option("--to", "target", type=click.Choice([t.value for t in Target]), default=Target.MYGPTQ.value,
              show_default=True,
              help="Output format: mygptq (our kernel layout, for `vllm serve --quantization mygptq`), gptq-v1 / "
                   "gptq-v2 (AutoGPTQ/GPTQModel tensors), or compressed-tensors (pack-quantized).")
@click.option("--layout", type=click.Choice([layout.value for layout in Layout]), default=None,
              help="Kernel layout of --to mygptq: marlin (2/3/4/8-bit, K % 128 == 0, N % 64 == 0, group_size "
                   "-1/32/64/128) or exllama (2/3/4/8-bit, any shape).  Default: marlin.")
@checkpoint_format_option
@revision_option
@click.option("--shard-size", default="4GiB", show_default=True, callback=_parse_size,
              help="Largest output file; bigger checkpoints are split into shards with an index (e.g. 500MB, 2GiB).")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists (only once the new checkpoint is complete).")
@quiet_option
def convert(src, dst, target, layout, checkpoint_format, revision, shard_size, overwrite, quiet):
    """Convert the quantized checkpoint SRC (a local directory or a Hub id) into DST.

    SRC may be an AutoGPTQ / TheBloke, GPTQModel (v1 or v2, `dynamic`), transformers/optimum GPTQ or
    compressed-tensors pack-quantized checkpoint, in one safetensors file or sharded.  Every tensor is
    validated (shapes, dtypes, g_idx, finite scales, zero-point convention).  For --to mygptq, act-order
    is folded in offline: rows are stored permuted with their `perm`, and an MLP down projection's
    permutation is absorbed into gate/up so it needs no gather at all.  Other tensors, the tokenizer and
    generation files are copied unchanged; config.json gets the new quantization_config with the
    provenance in `meta`.  SRC is only read; DST appears only when complete.
    """
    with user_errors():
        source = resolve(src, revision)
        r = convert_checkpoint(source, dst, Target(target), Layout(layout) if layout else None,
                               _zero_format(checkpoint_format), shard_size, overwrite, progress=not quiet)
    act = (f"{r.act_order_modules} with act-order: {r.perms_absorbed} permutations absorbed into gate/up, "
           f"{r.perms_stored} stored" if r.act_order_modules else "no act-order")
    click.echo(f"wrote {r.destination}: {r.modules} quantized modules ({act}); read {r.bytes_in / 1e6:.1f} MB "
               f"in {r.seconds:.1f} s ({r.bytes_in / 1e6 / max(r.seconds, 1e-9):.0f} MB/s)")


@click.command(short_help="Describe a quantized checkpoint and list its problems.")
@click.argument("src")
@revision_option
@checkpoint_format_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@quiet_option
def inspect(src, revision, checkpoint_format, as_json, quiet):
    """Describe the quantized checkpoint SRC (a local directory or a Hub id) and list its problems.

    Shows the format and dialect, zero-point convention (declared and seen in the data), bits, group
    size, act-order, layers, size, and which kernel layouts can hold it.  Every module is decoded and
    validated; problems are collected rather than stopping at the first.  Exit status 1 when there are
    problems.
    """
    with user_errors():
        source = resolve(src, revision)
        report = inspect_checkpoint(source, open_checkpoint(source.path, _zero_format(checkpoint_format)),
                                    progress=not quiet)
    click.echo(json.dumps(report.as_dict(), indent=2) if as_json else render(report))
    if report.problems:
        raise SystemExit(1)


@click.command(short_help="Prove that a converted checkpoint holds the weights of its source.")
@click.argument("src")
@click.argument("dst")
@revision_option
@checkpoint_format_option
@quiet_option
def verify(src, dst, revision, checkpoint_format, quiet):
    """Prove that DST (e.g. the output of convert) holds the same weights as SRC.

    Both are decoded module by module (layouts, stored and absorbed permutations undone) and their
    dequantized weights compared exactly; every other tensor must be identical.  --revision and
    --checkpoint-format apply to SRC.  Exit status 1, naming each differing module, when they differ.
    """
    with user_errors():
        src_ckpt = open_checkpoint(resolve(src, revision).path, _zero_format(checkpoint_format))
        dst_ckpt = open_checkpoint(resolve(dst).path)
        report = verify_checkpoints(src_ckpt, dst_ckpt, progress=not quiet)
    if not report.ok:
        for line in report.mismatches:
            click.echo(f"MISMATCH {line}", err=True)
        raise click.ClickException(f"{dst} differs from {src} in {len(report.mismatches)} places")
    absorbed = f", {report.absorbed} absorbed permutations accounted for" if report.absorbed else ""
    click.echo(f"OK: {report.modules} quantized modules and {report.tensors} other tensors identical{absorbed}")


COMMANDS: list = [convert, inspect, verify]
