"""Mirroring an s3:// model directory into the local cache, safely under concurrency (layout:
facediffuser/model_dir.py).

One process at a time checks or downloads a URI (a file lock); a download goes to a unique temp dir renamed into
place when complete; versions are content-addressed and an old one is removed only when no loader holds it; a key
that would land outside the target is refused before anything is written.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from facediffuser.cache import cache_root, write_atomic
from facediffuser.data import io as dataio
from facediffuser.manifest import directory_hash
from facediffuser.model_dir import content_version, named_hashes, parts

DOWNLOAD_THREADS = 8


@dataclass
class MirroredModel:
    uri: str
    root: Path  # <cache>/mirrors/<uri hash>/<version>
    version: str
    hashes: dict[str, str]  # part → directory_hash
    downloaded: bool = False  # this call fetched it (False: an existing copy was reused)

    def named_hashes(self) -> dict[str, str]:
        return named_hashes(self.uri.rstrip("/").rsplit("/", 1)[-1], self.hashes)


def mirror(uri: str) -> Path:
    """An s3:// model prefix → a complete local copy (downloaded only when the remote listing changed).

    Safe with several processes on one machine (the Serve encoder and sampler replicas): one downloads under the
    URI's file lock into a unique temp dir and renames it into place; the others wait and reuse it. A newer
    version never replaces files in place: it gets its own directory, and older ones are removed only once
    nobody holds them (see `mirrored`)."""
    with mirrored(uri) as copy:
        return copy.root


@contextlib.contextmanager
def mirrored(uri: str) -> Iterator[MirroredModel]:
    """`mirror`, holding the version's shared lock until the block ends (load inside it)."""
    uri = uri.rstrip("/")
    files = _remote_files(uri)
    stamp = hashlib.sha256(json.dumps([(rel, size, mtime) for rel, _, size, mtime in files]).encode()).hexdigest()
    home = cache_root() / "mirrors" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    home.mkdir(parents=True, exist_ok=True)
    with _locked(home / ".lock", fcntl.LOCK_EX):
        index = _read_json(home / "index.json")
        version = index.get(stamp)
        meta = _read_json(home / f"{version}.json") if version else {}
        downloaded = not version or not (home / version).is_dir() or "hashes" not in meta
        if downloaded:
            version, meta = _download(uri, files, home)
            write_atomic(home / "index.json", json.dumps({**index, stamp: version}, indent=1))
        reader = _lock(home / f"{version}.lock", fcntl.LOCK_SH)
        _prune(home, keep=version)
    try:
        yield MirroredModel(uri=uri, root=home / version, version=version, hashes=meta["hashes"], downloaded=downloaded)
    finally:
        reader.close()


def _remote_files(uri: str) -> list[tuple[str, str, int, str]]:
    """(relative key, store path, size, mtime) of every object under the prefix, each key checked."""
    import pyarrow.fs as pafs

    fs, prefix = dataio.resolve(uri)
    try:
        listing = fs.get_file_info(pafs.FileSelector(prefix, recursive=True))
    except FileNotFoundError:
        raise FileNotFoundError(f"model directory not found: {uri}") from None
    except OSError as exc:
        raise FileNotFoundError(f"model {uri}: cannot be listed ({str(exc).splitlines()[0]})") from None
    files = []
    for info in listing:
        if info.type != pafs.FileType.File:
            continue
        if not info.path.startswith(prefix.rstrip("/") + "/"):
            raise ValueError(f"model {uri}: listed object {info.path!r} is not below the prefix; refusing to mirror")
        relative = info.path[len(prefix.rstrip("/")) + 1 :]
        check_key(relative, uri)
        files.append((relative, info.path, info.size, str(info.mtime)))
    if not files:
        raise FileNotFoundError(f"model directory not found: {uri} (no objects under that prefix)")
    return sorted(files)


def check_key(relative: str, uri: str, target: Path | None = None) -> Path:
    """An object key relative to the model prefix → its path under `target` (default: a stand-in root); a key
    that is not a plain relative path, or that resolves outside `target`, raises ValueError."""
    segments = relative.split("/")
    if not relative or relative.startswith("/") or any(s in ("", ".", "..") for s in segments):
        raise ValueError(
            f"model {uri}: object key {relative!r} is not a plain relative path (it has '..', '.', an "
            "empty or a leading '/' part) and could resolve outside the mirror; refusing to mirror it"
        )
    base = (target or Path("/mirror-root")).resolve()
    path = (base / relative).resolve() if target else Path(os.path.normpath(base / relative))
    if not path.is_relative_to(base):
        raise ValueError(f"model {uri}: object key {relative!r} resolves outside the mirror directory {base}")
    return path


def _download(uri: str, files: list[tuple[str, str, int, str]], home: Path) -> tuple[str, dict]:
    """Copy every listed object into a fresh temp dir under `home`, hash it, rename it to <version>/."""
    fs, _ = dataio.resolve(uri)
    incoming = Path(tempfile.mkdtemp(prefix=".incoming-", dir=home))
    try:

        def fetch(entry):
            relative, path, size, _ = entry
            dest = check_key(relative, uri, incoming)
            dest.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(path) as source, open(dest, "wb") as out:
                shutil.copyfileobj(source, out, 8 << 20)
            if dest.stat().st_size != size:
                raise OSError(
                    f"model {uri}: {relative} changed while it was mirrored ({size} → "
                    f"{dest.stat().st_size} bytes); try again"
                )

        with ThreadPoolExecutor(DOWNLOAD_THREADS) as pool:
            list(pool.map(fetch, files))
        hashes = {part: directory_hash(incoming / part) for part in parts(incoming)}
        version = content_version(hashes)
        meta = {"uri": uri, "model_version": version, "hashes": hashes}
        write_atomic(home / f"{version}.json", json.dumps(meta, indent=1))
        if (home / version).is_dir():  # the same content under a new listing (e.g. re-uploaded)
            shutil.rmtree(incoming)
        else:
            os.rename(incoming, home / version)
        return version, meta
    except BaseException:
        shutil.rmtree(incoming, ignore_errors=True)
        raise


def _prune(home: Path, keep: str) -> None:
    """Under the URI's exclusive lock: drop interrupted downloads, and every other version nobody is reading."""
    for path in home.iterdir():
        if path.name.startswith(".incoming-"):
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_dir() and path.name != keep:
            try:
                holder = _lock(home / f"{path.name}.lock", fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a process is loading it; a later mirror removes it
            try:
                trash = Path(tempfile.mkdtemp(prefix=".incoming-", dir=home))
                os.rename(path, trash / "old")
                shutil.rmtree(trash, ignore_errors=True)
                (home / f"{path.name}.json").unlink(missing_ok=True)
            finally:
                holder.close()
    index = _read_json(home / "index.json")
    kept = {stamp: version for stamp, version in index.items() if (home / version).is_dir()}
    if kept != index:
        write_atomic(home / "index.json", json.dumps(kept, indent=1))


def _lock(path: Path, mode: int):
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, mode)
    except BaseException:
        handle.close()
        raise
    return handle


@contextlib.contextmanager
def _locked(path: Path, mode: int):
    handle = _lock(path, mode)
    try:
        yield handle
    finally:
        handle.close()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
