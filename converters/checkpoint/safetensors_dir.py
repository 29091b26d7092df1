"""Tensor-by-tensor access to the safetensors files of a model directory (one file or sharded).

Nothing is loaded until asked for: `get` reads one tensor at a time with pread into its own buffer, so
reading a 70B checkpoint needs memory for the largest tensor only.  (Reading through safetensors' memory
map would leave every page touched resident and counted in the process's RSS until the file is closed.)
safe_open still checks each file's header and size on opening, so a truncated or corrupt file fails with
its path in the message.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from gptq_vllm.formats.errors import FormatError

NON_WEIGHT_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json",
)

# safetensors dtype code -> torch dtype.
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}


class SafetensorsDir:
    def __init__(self, path: str | Path, files: list[str] | None = None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: not a directory")
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        self._layout: dict[Path, tuple[object, int, dict]] = {}  # file -> (open file, data start, header)
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
            self._file_layout(f)  # every header read up front: get() is then safe to call from threads
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

    def _file_layout(self, f: Path) -> tuple[object, int, dict]:
        if f not in self._layout:
            self._open(f)  # safe_open has checked the header and the file size
            handle = open(f, "rb")
            (n,) = struct.unpack("<Q", handle.read(8))
            self._layout[f] = (handle, 8 + n, json.loads(handle.read(n)))
        return self._layout[f]

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise FormatError(f"{self.path}: tensor {name} is missing")
        f = self._where[name]
        try:
            handle, start, header = self._file_layout(f)
            entry = header[name]
            begin, end = entry["data_offsets"]
            buf = torch.empty(end - begin, dtype=torch.uint8)
            if end > begin and os.preadv(handle.fileno(), [buf.numpy()], start + begin) != end - begin:
                raise OSError("file ends early")
            return buf.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            raise FormatError(f"{f}: cannot read tensor {name} ({e}); truncated or corrupt?") from e

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self._where[name]).get_slice(name).get_shape())

    def tensor_nbytes(self, name: str) -> int:
        """Size of one tensor's data on disk, from the header alone."""
        begin, end = self._file_layout(self._where[name])[2][name]["data_offsets"]
        return end - begin

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def config(self) -> dict:
        cfg = self.path / "config.json"
        return json.loads(cfg.read_text()) if cfg.exists() else {}
