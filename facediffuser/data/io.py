"""One code path for local directories and s3:// prefixes (pyarrow filesystems; S3 honours AWS_ENDPOINT_URL)."""

from __future__ import annotations

import posixpath
from pathlib import Path

import pyarrow.fs as pafs

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """URI → (filesystem, path inside it). Local paths become absolute."""
    uri = str(uri)
    if is_s3(uri):
        return pafs.FileSystem.from_uri(uri.rstrip("/"))
    if "://" in uri:
        raise ValueError(f"{uri}: only local paths and s3:// URIs are supported")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    uri = str(uri).rstrip("/")
    if is_s3(uri):
        return posixpath.join(uri, *parts)
    return str(Path(uri).joinpath(*parts))


def _to_uri(uri: str, path: str) -> str:
    """A path from a filesystem listing back to the URI form the user gave."""
    return f"s3://{path}" if is_s3(uri) else path


def list_files(uri: str, extensions: tuple[str, ...]) -> list[tuple[str, str]]:
    """(relative path, URI) of every file under `uri` whose name ends with one of `extensions`, sorted."""
    fs, root = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    found = []
    for info in infos:
        if info.type == pafs.FileType.File and info.path.lower().endswith(extensions):
            relative = posixpath.relpath(info.path, root) if is_s3(uri) else str(Path(info.path).relative_to(root))
            found.append((relative.replace("\\", "/"), _to_uri(uri, info.path)))
    return sorted(found)


def read_bytes(uri: str, filesystem: pafs.FileSystem | None = None) -> bytes:
    fs, path = resolve(uri)
    with (filesystem or fs).open_input_stream(path) as handle:
        return handle.read()


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = resolve(uri)
    fs.create_dir(posixpath.dirname(path) if is_s3(uri) else str(Path(path).parent), recursive=True)
    with fs.open_output_stream(path) as handle:
        handle.write(data)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def remove_dir(uri: str) -> None:
    """Delete a directory (or S3 prefix) if it exists: reruns replace their previous output."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def file_info(uri: str, flag: str) -> tuple[pafs.FileSystem, str, pafs.FileInfo]:
    """(filesystem, path, info) of `uri`; an unreachable store is a one-line FileNotFoundError naming `flag`."""
    fs, path = resolve(uri)
    try:
        return fs, path, fs.get_file_info(path)
    except OSError as exc:
        raise FileNotFoundError(f"{flag} {uri}: cannot be reached ({str(exc).splitlines()[0]})") from None


def check_input_dir(uri: str) -> None:
    """Raise FileNotFoundError/ValueError (one line) unless `uri` is an existing directory or S3 prefix."""
    _, _, info = file_info(uri, "--input")
    if info.type == pafs.FileType.File:
        raise ValueError(f"--input {uri}: is a file, expected a directory or s3:// prefix")
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"--input {uri}: no such directory or S3 prefix")


def check_output_dir(uri: str) -> None:
    """Raise unless `uri` can be an output directory: not an existing file; an S3 bucket that exists."""
    fs, path = resolve(uri)
    try:
        info = fs.get_file_info(path)
        if is_s3(uri):
            bucket = path.split("/", 1)[0]
            if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise FileNotFoundError(f"--output {uri}: S3 bucket {bucket!r} does not exist")
    except OSError as exc:
        raise FileNotFoundError(f"--output {uri}: cannot be reached ({str(exc).splitlines()[0]})") from None
    if info.type == pafs.FileType.File:
        raise ValueError(f"--output {uri}: is an existing file, expected a directory")
    if not is_s3(uri):
        parent = Path(path).parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise ValueError(f"--output {uri}: {parent} is a file")
