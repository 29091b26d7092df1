"""Readers: a checkpoint directory in any supported format -> canonical QuantizedWeights, module by module.

    ckpt = open_checkpoint(path)            # config dialect detected, weight files found, nothing loaded
    for module in ckpt.modules():
        weight = ckpt.load(module)          # validated QuantizedWeight (errors name file, tensor, shape)
    for name in ckpt.passthrough():         # tensors that are not part of a quantized module
        tensor = ckpt.tensors.get(name)
"""

from __future__ import annotations

from pathlib import Path

from gptq_vllm.formats.errors import FormatError
from gptq_vllm.formats.gptq import ZeroFormat
from gptq_vllm.formats.quant_config import ModuleParams

from ..safetensors_dir import SafetensorsDir
from .base import Checkpoint
from .compressed import CompressedTensorsCheckpoint
from .config import QuantConfig, load_quant_config
from .gptq import GPTQCheckpoint
from .mygptq import MyGPTQCheckpoint
from .weights import weight_files

__all__ = ["Checkpoint", "ModuleParams", "QuantConfig", "open_checkpoint"]


def open_checkpoint(path: str | Path, checkpoint_format: ZeroFormat | None = None) -> Checkpoint:
    """Open a local checkpoint directory; checkpoint_format overrides the v1/v2 zero convention of GPTQ files."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory")
    config = load_quant_config(path)
    tensors = SafetensorsDir(path, weight_files(path, config))
    if config.method == "gptq":
        return GPTQCheckpoint(path, config, tensors, checkpoint_format)
    if checkpoint_format is not None:
        raise FormatError(f"{path}: --checkpoint-format applies to GPTQ checkpoints, not {config.method}")
    if config.method == "compressed-tensors":
        return CompressedTensorsCheckpoint(path, config, tensors)
    return MyGPTQCheckpoint(path, config, tensors)
