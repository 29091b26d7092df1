"""CLI commands of the quantizer."""

from __future__ import annotations

import click

from gptq_vllm.formats.gptq import ZeroFormat

from .rtn import quantize_checkpoint_rtn


@click.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path())
@click.option("--bits", type=click.Choice(["2", "3", "4", "8"]), default="4", show_default=True,
              help="Bits per weight code.")
@click.option("--group-size", type=int, default=128, show_default=True,
              help="Input channels sharing one scale and zero; -1 for one group per output channel.")
@click.option("--sym/--asym", default=True, show_default=True,
              help="Symmetric grid (zero fixed at 2^(bits-1)) or asymmetric (zero fitted per group).")
@click.option("--format", "fmt", type=click.Choice(["gptq-v1", "gptq-v2"]), default="gptq-v1", show_default=True,
              help="Zero-point convention of the written GPTQ checkpoint (v1 stores z-1, v2 stores z).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def quantize(model, out, bits, group_size, sym, fmt, overwrite):
    """Quantize the float checkpoint MODEL (a local directory) into a GPTQ checkpoint OUT.

    Round-to-nearest per group; OUT appears only when complete.
    """
    zero_format = ZeroFormat.V1 if fmt == "gptq-v1" else ZeroFormat.V2
    path = quantize_checkpoint_rtn(model, out, int(bits), group_size, sym, zero_format, overwrite)
    click.echo(f"wrote {path}")


COMMANDS = [quantize]
