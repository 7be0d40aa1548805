"""The local cache (FACEDIFFUSER_CACHE, default ~/.cache/facediffuser: model mirrors, remembered hashes) and the one
way files are written into it (`write_atomic`). Imports nothing of the project, so every module may use it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("FACEDIFFUSER_CACHE", Path.home() / ".cache" / "facediffuser"))


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file renamed in: a reader sees the old file or the new one whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
