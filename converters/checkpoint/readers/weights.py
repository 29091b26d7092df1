"""Which safetensors files of a checkpoint directory hold its weights (formats.md §2.1, §2.5).

In AutoGPTQ's order: `model_file_base_name`, then `gptq_model-{bits}bit-{group_size}g`, then `model`, each
as `<base>.safetensors.index.json` (sharded) or `<base>.safetensors`; failing those, the one
`*.safetensors.index.json`, or every `*.safetensors` file.  Pickle weights are refused: they cannot be
read lazily (or safely).
"""

from __future__ import annotations

import json
from pathlib import Path

from gptq_vllm.formats.errors import FormatError

from .config import QuantConfig

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _from_index(index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise FormatError(f"{index}: not a safetensors index (no weight_map): {e}") from e
    return sorted(set(weight_map.values()))


def weight_files(directory: Path, config: QuantConfig) -> list[str]:
    """File names (relative to directory) of the checkpoint's weights."""
    bases = []
    if config.weight_base_name:
        bases.append(config.weight_base_name)
    if config.method == "gptq":
        bases.append(f"gptq_model-{config.base.bits}bit-{config.base.group_size}g")
    bases.append("model")
    for base in bases:
        if (directory / f"{base}.safetensors.index.json").exists():
            return _from_index(directory / f"{base}.safetensors.index.json")
        if (directory / f"{base}.safetensors").exists():
            return [f"{base}.safetensors"]
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return _from_index(indexes[0])
    if len(indexes) > 1:
        raise FormatError(f"{directory}: several safetensors indexes ({', '.join(i.name for i in indexes)}); "
                          f"set model_file_base_name in the quantization config to pick one")
    files = sorted(f.name for f in directory.glob("*.safetensors"))
    split = [f for f in files if ".split-" in f]
    if split:
        raise FormatError(f"{directory}: {', '.join(split)} are parts of one split file; join them first "
                          f"(cat {directory}/*.split-* > {directory}/model.safetensors) and remove the parts")
    if files:
        return files
    pickles = sorted(f.name for f in directory.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise FormatError(f"{directory}: weights are pickle files ({', '.join(pickles)}); only safetensors "
                          f"checkpoints can be read tensor by tensor (and safely)")
    raise FormatError(f"{directory}: no .safetensors weight files")
