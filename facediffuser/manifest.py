"""Provenance written beside every result: package versions and content hashes of model directories."""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
from pathlib import Path

PACKAGES = ("facediffuser", "torch", "diffusers", "transformers", "ray", "numpy", "pyarrow", "mediapipe")


def package_versions(names=PACKAGES) -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def directory_hash(path: str | Path) -> str:
    """sha256 over every file's relative path and bytes, in sorted order (streamed; large files are fine).
    Hidden files (e.g. a cache's bookkeeping) are not part of the model."""
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(str(file.relative_to(root)).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def module_hash(*modules) -> str:
    """sha256 over the tensors of in-memory modules (for models that have no directory, e.g. --tiny)."""
    digest = hashlib.sha256()
    for module in modules:
        for key, tensor in sorted(module.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
