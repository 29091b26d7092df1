"""Atomic, sharded, streaming safetensors checkpoint writer.

Tensors are added one at a time and flushed to a shard whenever the pending bytes reach the shard
size, so memory stays bounded by one shard.  Everything goes to a hidden temporary directory beside
the destination, which is renamed into place only by finish(); an exception (or close() without
finish()) removes it, so a failed run never leaves a partial checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

DEFAULT_SHARD_BYTES = 4 * 2**30


class CheckpointWriter:
    def __init__(self, destination: str | os.PathLike, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 overwrite: bool = False, metadata: dict[str, str] | None = None):
        self.destination = Path(destination)
        if self.destination.exists() and not overwrite:
            raise FileExistsError(f"{self.destination}: already exists (pass overwrite to replace it)")
        self.destination.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.destination.name}.tmp-", dir=self.destination.parent))
        self.overwrite = overwrite
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self._names: set[str] = set()
        self.total_bytes = 0

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        self._names.add(name)
        t = tensor.detach().to("cpu").contiguous()
        self._pending[name] = t
        nbytes = t.numel() * t.element_size()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes
        if self._pending_bytes >= self.max_shard_bytes:
            self._flush()

    def add_all(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            self.add(name, t)

    def _flush(self) -> None:
        if not self._pending:
            return
        index = len(self._shards)
        save_file(self._pending, str(self.tmp / f"shard-{index:05d}.safetensors"), metadata=self.metadata)
        self._shards.append(sorted(self._pending))
        self._pending = {}
        self._pending_bytes = 0

    def write_json(self, filename: str, obj: dict) -> None:
        (self.tmp / filename).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def copy_file(self, source: str | os.PathLike, filename: str | None = None) -> None:
        shutil.copy2(source, self.tmp / (filename or Path(source).name))

    def finish(self) -> Path:
        """Name the shards HF-style, write the index (when sharded) and move the directory into place."""
        self._flush()
        n = len(self._shards)
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.tmp / f"shard-{i:05d}.safetensors", self.tmp / final)
            weight_map.update({name: final for name in names})
        if n > 1:
            self.write_json("model.safetensors.index.json",
                            {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))})
        if self.destination.exists() and self.overwrite:
            shutil.rmtree(self.destination)
        os.replace(self.tmp, self.destination)
        self.tmp = None
        return self.destination

    def close(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
