"""Tensor-by-tensor access to the safetensors files of a model directory (one file or sharded).

Nothing is loaded until asked for: `get` memory-maps one tensor at a time, so reading a 70B checkpoint
needs memory for the largest tensor only.  A truncated or corrupt file fails with its path in the message.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from gptq_vllm.formats.errors import FormatError

NON_WEIGHT_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json",
)


class SafetensorsDir:
    def __init__(self, path: str | Path, files: list[str] | None = None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: not a directory")
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        index = self.path / "model.safetensors.index.json"
        if files is not None:
            shard_files = [self.path / f for f in files]
        elif index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            shard_files = sorted({self.path / f for f in weight_map.values()})
        else:
            shard_files = sorted(self.path.glob("*.safetensors"))
        if not shard_files:
            raise FileNotFoundError(f"{self.path}: no .safetensors files")
        for f in shard_files:
            for name in self._open(f).keys():
                if name in self._where:
                    raise FormatError(f"{f}: tensor {name} also appears in {self._where[name]}")
                self._where[name] = f
        self.files = shard_files

    def _open(self, f: Path):
        if f not in self._handles:
            if not f.exists():
                raise FileNotFoundError(f"{f}: listed in the index but missing")
            try:
                self._handles[f] = safe_open(str(f), framework="pt")
            except (SafetensorError, OSError) as e:
                raise FormatError(f"{f}: not a readable safetensors file ({e}); truncated or corrupt?") from e
        return self._handles[f]

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> Path:
        return self._where[name]

    def metadata(self, name: str | None = None) -> dict[str, str]:
        f = self._where[name] if name is not None else self.files[0]
        return self._open(f).metadata() or {}

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise FormatError(f"{self.path}: tensor {name} is missing")
        f = self._where[name]
        try:
            return self._open(f).get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise FormatError(f"{f}: cannot read tensor {name} ({e}); truncated or corrupt?") from e

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self._where[name]).get_slice(name).get_shape())

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def config(self) -> dict:
        cfg = self.path / "config.json"
        return json.loads(cfg.read_text()) if cfg.exists() else {}
