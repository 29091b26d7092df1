"""Atomic, sharded, streaming safetensors checkpoint writer.

Tensors are added one at a time and written straight into the current shard file, so memory stays
bounded by the tensor being written, whatever the size of the checkpoint.  A shard's JSON header is
only known at its end, so its first HEADER_RESERVE bytes are kept free and the header is written there
when the shard is closed (padded with spaces, which the safetensors format allows); a header that does
not fit makes the shard be rewritten once behind a larger header.  A new shard starts before a tensor
that would take the current one past max_shard_bytes.

With background=True the file writes run on a worker thread (they release the GIL), so the caller's
computation overlaps them; at most queue_bytes of tensors wait, and a write error surfaces at the next
add() or at finish().

Everything goes to a hidden temporary directory beside the destination, which is renamed into place only
by finish(); an exception (or close() without finish()) removes it, so a failed run never leaves a
partial checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import struct
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from .safetensors_dir import DTYPES

DEFAULT_SHARD_BYTES = 4 * 2**30
HEADER_RESERVE = 2**20  # bytes; about 6000 tensors per shard before the rewrite fallback
SAFETENSORS_DTYPES = {dtype: code for code, dtype in DTYPES.items()}


class _Shard:
    """One safetensors file being written: data streamed after a reserved header region."""

    def __init__(self, path: Path, metadata: dict[str, str]):
        self.path = path
        self.metadata = metadata
        self.entries: dict[str, dict] = {}
        self.nbytes = 0
        self._file = open(path, "wb")
        self._file.seek(8 + HEADER_RESERVE)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} cannot be stored in safetensors")
        data = tensor.reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self.entries[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self.nbytes, self.nbytes + data.size]}
        self.nbytes += data.size

    def close(self) -> None:
        header = json.dumps({"__metadata__": self.metadata, **self.entries}, separators=(",", ":")).encode()
        if len(header) <= HEADER_RESERVE:
            self._file.seek(0)
            self._file.write(struct.pack("<Q", HEADER_RESERVE) + header.ljust(HEADER_RESERVE, b" "))
            self._file.close()
            return
        self._file.close()
        size = -(-len(header) // 8) * 8
        rewritten = self.path.with_name(self.path.name + ".rewrite")
        with open(self.path, "rb") as src, open(rewritten, "wb") as dst:
            dst.write(struct.pack("<Q", size) + header.ljust(size, b" "))
            src.seek(8 + HEADER_RESERVE)
            shutil.copyfileobj(src, dst, 64 * 2**20)
        os.replace(rewritten, self.path)

    def abort(self) -> None:
        self._file.close()


# Weight files a CheckpointWriter names (any shard count): a previous output may have had more shards.
WEIGHT_FILES = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")


def _make_tmp(destination: Path) -> Path:
    """A new hidden directory beside `destination`, with the mode the umask gives any new directory
    (tempfile.mkdtemp's 0700 would make the finished checkpoint private; reading the umask would race
    with the writer thread's file creation)."""
    while True:
        tmp = destination.with_name(f".{destination.name}.tmp-{secrets.token_hex(4)}")
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


def check_replaceable(destination: Path, written: set[str]) -> None:
    """Refuse to --overwrite a directory holding anything this write would not replace (subdirectories,
    files it does not write): replacing it must delete only a previous output, not unrelated work."""
    other = sorted(p.name + ("/" if p.is_dir() else "") for p in destination.iterdir()
                   if not (p.is_file() and (p.name in written or WEIGHT_FILES.fullmatch(p.name))))
    if other:
        raise FileExistsError(f"{destination}: holds files a checkpoint would not ({', '.join(other[:5])}"
                              f"{', ...' if len(other) > 5 else ''}); --overwrite replaces only a checkpoint "
                              f"directory: remove them or choose another destination")


class CheckpointWriter:
    def __init__(self, destination: str | os.PathLike, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 overwrite: bool = False, metadata: dict[str, str] | None = None,
                 background: bool = False, queue_bytes: int = 256 * 2**20):
        self.destination = Path(destination)
        if self.destination.exists() and not overwrite:
            raise FileExistsError(f"{self.destination}: already exists (pass --overwrite to replace it)")
        if self.destination.exists() and not self.destination.is_dir():
            raise FileExistsError(f"{self.destination}: not a directory; --overwrite replaces a checkpoint directory")
        self.destination.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = _make_tmp(self.destination)
        self.overwrite = overwrite
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._shard: _Shard | None = None
        self._shards: list[list[str]] = []
        self._names: set[str] = set()
        self.total_bytes = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer") if background else None
        self._queue: deque[tuple[Future, int]] = deque()
        self._queued_bytes = 0
        self.queue_bytes = queue_bytes

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        self._names.add(name)
        t = tensor.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        self.total_bytes += nbytes
        if self._pool is None:
            self._write(name, t)
            return
        self._queue.append((self._pool.submit(self._write, name, t), nbytes))
        self._queued_bytes += nbytes
        while self._queue and (self._queued_bytes > self.queue_bytes or self._queue[0][0].done()):
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        future, nbytes = self._queue.popleft()
        self._queued_bytes -= nbytes
        future.result()

    def _write(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self._shard is not None and self._shard.nbytes and self._shard.nbytes + nbytes > self.max_shard_bytes:
            self._close_shard()
        if self._shard is None:
            self._shard = _Shard(self.tmp / f"shard-{len(self._shards):05d}.safetensors", self.metadata)
        self._shard.write(name, t)

    def add_all(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            self.add(name, t)

    def _close_shard(self) -> None:
        if self._shard is None:
            return
        self._shard.close()
        self._shards.append(sorted(self._shard.entries))
        self._shard = None

    def write_json(self, filename: str, obj: dict) -> None:
        (self.tmp / filename).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def copy_file(self, source: str | os.PathLike, filename: str | None = None) -> None:
        # Content and times, not the mode: Hub cache blobs are read-only, the copy must be the user's to edit
        # (a new file, so the umask sets its mode).
        target = self.tmp / (filename or Path(source).name)
        shutil.copyfile(source, target)
        st = os.stat(source)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))

    def finish(self) -> Path:
        """Name the shards HF-style, write the index (when sharded) and move the directory into place."""
        while self._queue:
            self._wait_oldest()
        self._close_shard()
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
            check_replaceable(self.destination, {p.name for p in self.tmp.iterdir()})
            shutil.rmtree(self.destination)
        os.replace(self.tmp, self.destination)
        self.tmp = None
        return self.destination

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            self._queue.clear()
        if self._shard is not None:
            self._shard.abort()
            self._shard = None
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
