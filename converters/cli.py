"""`gptq-convert`: quantize, convert, inspect, verify and evaluate GPTQ checkpoints."""

from __future__ import annotations

import click

from .checkpoint.commands import COMMANDS as CHECKPOINT_COMMANDS
from .quantize.commands import COMMANDS as QUANTIZE_COMMANDS


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="gptq-vllm")
def main() -> None:
    """Quantize models with GPTQ and repack GPTQ checkpoints for `vllm serve --quantization mygptq`."""


for command in (*QUANTIZE_COMMANDS, *CHECKPOINT_COMMANDS):
    main.add_command(command)
