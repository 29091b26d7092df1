"""Where a checkpoint comes from: a local directory, or a Hugging Face Hub id resolved by huggingface_hub.

A Hub id is downloaded (or, with HF_HUB_OFFLINE=1 or without network, taken from the local cache) with
`snapshot_download`; `revision` picks a branch, tag or commit, e.g. TheBloke's per-variant branches such
as `gptq-4bit-32g-actorder_True`.  Pickle and other-framework weights are not fetched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gptq_vllm.formats.errors import FormatError

# Files a GPTQ conversion never needs: other weight formats of the same model.
IGNORE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.gguf", "*.onnx", "original/*"]


class SourceError(FormatError):
    """A source that is neither a local directory nor a resolvable Hub id."""


@dataclass(frozen=True)
class Source:
    path: Path  # local directory holding the files
    repo_id: str | None = None  # Hub id, when resolved from the Hub
    revision: str | None = None  # as asked for (branch, tag or commit)
    commit: str | None = None  # the commit the files are from

    def describe(self) -> dict:
        if self.repo_id is None:
            return {"source": str(self.path)}
        return {"source": self.repo_id, "revision": self.revision, "commit": self.commit}

    def __str__(self) -> str:
        return str(self.path) if self.repo_id is None else f"{self.repo_id}@{self.revision}"


def resolve(source: str, revision: str | None = None) -> Source:
    """A local directory as is, or a Hub id downloaded / found in the huggingface_hub cache."""
    local = Path(source).expanduser()
    if local.exists():
        if not local.is_dir():
            raise SourceError(f"{source}: not a directory")
        if revision is not None:
            raise SourceError(f"{source}: --revision applies to Hub ids, not to local directories")
        return Source(local.resolve())
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        raise SourceError(f"{source}: no such directory, and not a Hub id (owner/name)") from None
    try:
        path = Path(snapshot_download(source, revision=revision, ignore_patterns=IGNORE_PATTERNS))
    except Exception as e:  # huggingface_hub raises many types (offline, not found, auth, network)
        raise SourceError(
            f"{source}: cannot get revision {revision or 'main'!r} from the Hub or the local cache "
            f"({type(e).__name__}: {e}); offline (HF_HUB_OFFLINE=1) only cached snapshots are used"
        ) from e
    return Source(path, repo_id=source, revision=revision or "main", commit=path.name)
