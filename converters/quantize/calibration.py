"""Calibration data: local text files -> fixed-length token rows, deterministically.

Inputs are .txt files (one document each), .jsonl files (one document per line, with a "text" field
or a chat "messages" list rendered with the model's chat template) or directories of them.  With no
input, the license-clean corpus bundled in converters/data is used (its README gives provenance and
hashes).

Documents are shuffled with the seed, each wrapped in the tokenizer's BOS/EOS (when it has them) and
concatenated into one stream, which is cut into rows of exactly seqlen tokens: no padding, so no
padding can enter a Hessian.  nsamples of those rows are drawn without replacement with the seed.
The SHA-256 of the token rows goes into the checkpoint metadata, so a run can be reproduced and two
runs compared.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_CORPUS = Path(__file__).resolve().parents[1] / "data"
SUFFIXES = (".txt", ".jsonl")


@dataclass
class Calibration:
    rows: torch.Tensor  # int64 [nsamples, seqlen]
    meta: dict  # what quantize_config.json["meta"]["calibration"] records


def _files(paths: list[str | Path]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix in SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{p}: no .txt or .jsonl files")
            out += found
        elif p.suffix in SUFFIXES:
            if not p.is_file():
                raise FileNotFoundError(f"{p}: no such file")
            out.append(p)
        else:
            raise ValueError(f"{p}: calibration files must be .txt or .jsonl (or a directory of them)")
    return out


def _documents(path: Path, tokenizer) -> list[tuple[str, bool]]:
    """(text, rendered by the chat template) per document."""
    if path.suffix == ".txt":
        return [(path.read_text(encoding="utf-8"), False)]
    docs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON object ({e})") from None
        if isinstance(rec, dict) and isinstance(rec.get("text"), str):
            docs.append((rec["text"], False))
        elif isinstance(rec, dict) and isinstance(rec.get("messages"), list):
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError(f"{path}:{n}: 'messages' given but the tokenizer has no chat template")
            docs.append((tokenizer.apply_chat_template(rec["messages"], tokenize=False), True))
        else:
            raise ValueError(f"{path}:{n}: expected an object with a 'text' string or a 'messages' list")
    return docs


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_calibration(tokenizer, paths: list[str | Path] | None = None, nsamples: int = 128, seqlen: int = 2048,
                      seed: int = 0) -> Calibration:
    """nsamples rows of seqlen tokens from the given files (the bundled corpus when paths is empty)."""
    files = _files(paths or [DEFAULT_CORPUS])
    docs = [d for f in files for d in _documents(f, tokenizer) if d[0].strip()]
    if not docs:
        raise ValueError("the calibration files hold no text")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(docs), generator=g).tolist()
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for i in order:
        text, chat = docs[i]
        # Plain text is text: a literal "<s>" in it is not the BOS token.  A chat template's markers are.
        ids = tokenizer(text, add_special_tokens=False, split_special_tokens=not chat, verbose=False)["input_ids"]
        starts = bos and chat and ids[:1] == bos  # templates that write the BOS themselves
        stream += ([] if starts else bos) + ids + eos
    available = len(stream) // seqlen
    if available == 0:
        raise ValueError(f"the calibration data has {len(stream)} tokens, fewer than one row of {seqlen}")
    if available < nsamples:
        log.warning("calibration data gives only %d rows of %d tokens (asked for %d); using all of them",
                    available, seqlen, nsamples)
    rows = torch.tensor(stream[: available * seqlen], dtype=torch.int64).view(available, seqlen)
    pick = torch.randperm(available, generator=g)[: min(nsamples, available)]
    rows = rows[pick].contiguous()
    meta = {
        "files": [{"name": f.name, "sha256": _sha256(f)} for f in files],
        "default_corpus": not paths,
        "documents": len(docs),
        "stream_tokens": len(stream),
        "nsamples": rows.shape[0],
        "seqlen": seqlen,
        "seed": seed,
        "tokens_sha256": hashlib.sha256(rows.to(torch.int32).numpy().tobytes()).hexdigest(),
    }
    return Calibration(rows, meta)
