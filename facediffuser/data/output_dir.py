"""The preprocessing output directory and what makes it complete (no Ray here).

    OUTPUT/run.json                 written when a run starts: the settings (a rerun with the same ones continues)
    OUTPUT/shards/*.parquet         the rows (SHARD_SCHEMA)
    OUTPUT/rejects/rejects.parquet  the inputs that were not written, with stage and reason
    OUTPUT/manifest.json            removed when a run starts, written when it ends: counts, config, and the
                                    list of shard files (name, rows, bytes) the finished run left

So a manifest exists only for a finished run, and `check_complete` (what `train` asks before it reads the shards)
also checks that the shard files are still exactly the listed ones and that the counts add up
(input = written + rejected, written = the listed rows).
"""

from __future__ import annotations

import json
import posixpath

import pyarrow.fs as pafs

from facediffuser.data import io as dataio

SHARDS_DIR, REJECTS_DIR, MANIFEST_FILE, RUN_FILE = "shards", "rejects", "manifest.json", "run.json"


class IncompleteOutput(ValueError):
    """A preprocess output that training must not read (one-line reason)."""


def _hidden(relative: str) -> bool:
    """Names pyarrow's dataset discovery (and so training's reader) skips: a part starting with '.' or '_'."""
    return any(part.startswith((".", "_")) for part in relative.split("/"))


def shard_sizes(shards_uri: str) -> dict[str, int]:
    """{relative path: bytes} of every file under `shards_uri` a Parquet reader would pick up ({} when absent)."""
    fs, root = dataio.resolve(shards_uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    sizes = {}
    for info in infos:
        if info.type == pafs.FileType.File:
            relative = posixpath.relpath(info.path, root)
            if not _hidden(relative):
                sizes[relative] = info.size
    return sizes


def describe_shards(shards_uri: str) -> list[dict]:
    """[{"file", "rows", "bytes"}] of the shard files, sorted by name; rows from each file's Parquet footer."""
    import pyarrow.parquet as pq

    fs, root = dataio.resolve(shards_uri)
    listing = []
    for relative, size in sorted(shard_sizes(shards_uri).items()):
        with fs.open_input_file(f"{root}/{relative}") as handle:
            rows = pq.ParquetFile(handle).metadata.num_rows
        listing.append({"file": relative, "rows": rows, "bytes": size})
    return listing


def remove_manifest(output_uri: str) -> None:
    """A run starts: until it ends, the output has no manifest (training refuses it)."""
    uri = dataio.join(output_uri, MANIFEST_FILE)
    if dataio.exists(uri):
        fs, path = dataio.resolve(uri)
        fs.delete_file(path)


def write_manifest(output_uri: str, manifest: dict) -> dict:
    """The last write of a finished run: `manifest` (with "counts") plus the list of shard files now in
    OUTPUT/shards. Raises RuntimeError when the files hold another number of rows than counts["written"]."""
    listing = describe_shards(dataio.join(output_uri, SHARDS_DIR))
    rows = sum(entry["rows"] for entry in listing)
    written = manifest["counts"]["written"]
    if rows != written:
        raise RuntimeError(
            f"{dataio.join(output_uri, SHARDS_DIR)}: the shard files hold {rows} rows, "
            f"the run wrote {written}; no manifest written"
        )
    manifest = {**manifest, "shards": listing}
    dataio.write_bytes(dataio.join(output_uri, MANIFEST_FILE), json.dumps(manifest, indent=2).encode())
    return manifest


def _names(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f", … ({len(names)} in all)" if len(names) > limit else "")


def check_complete(output_uri: str, what: str) -> dict:
    """The manifest of a finished run whose shard files are all still there, unchanged → the manifest.
    Else IncompleteOutput: one line starting with `what`, naming the manifest and what is wrong."""
    manifest_uri = dataio.join(output_uri, MANIFEST_FILE)
    rerun = "rerun `facediffuser preprocess` with the same --input and --output to finish it"
    manifest = _finished_manifest(manifest_uri, what, rerun)
    _check_shard_files(output_uri, manifest["shards"], manifest_uri, what, rerun)
    return manifest


def _finished_manifest(manifest_uri: str, what: str, rerun: str) -> dict:
    """The manifest at `manifest_uri`, checked on its own: there, JSON, its counts adding up, and a listing of
    shard files that holds the rows written. Else IncompleteOutput."""
    if not dataio.exists(manifest_uri):
        raise IncompleteOutput(
            f"{what}: no {manifest_uri}: the preprocess run there is in progress or was cut short; {rerun}"
        )
    try:
        manifest = json.loads(dataio.read_bytes(manifest_uri))
    except ValueError as exc:
        raise IncompleteOutput(f"{what}: {manifest_uri} is not valid JSON ({str(exc).splitlines()[0]}); {rerun}")
    counts = manifest.get("counts") if isinstance(manifest, dict) else None
    numbers = {k: counts.get(k) for k in ("input", "written", "rejected")} if isinstance(counts, dict) else {}
    if not numbers or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in numbers.values()):
        raise IncompleteOutput(f"{what}: {manifest_uri} has no input/written/rejected counts; {rerun}")
    if numbers["input"] != numbers["written"] + numbers["rejected"]:
        raise IncompleteOutput(
            f"{what}: {manifest_uri} is incomplete: {numbers['input']} in, {numbers['written']} written, "
            f"{numbers['rejected']} rejected; {rerun}"
        )
    listing = manifest.get("shards")
    if not isinstance(listing, list) or not all(
        isinstance(e, dict) and isinstance(e.get("file"), str) and isinstance(e.get("rows"), int) for e in listing
    ):
        raise IncompleteOutput(
            f"{what}: {manifest_uri} lists no shard files (written by an older preprocess?); {rerun}"
        )
    listed_rows = sum(e["rows"] for e in listing)
    if listed_rows != numbers["written"]:
        raise IncompleteOutput(
            f"{what}: {manifest_uri} is incomplete: its shard files hold {listed_rows} rows, "
            f"{numbers['written']} written; {rerun}"
        )
    return manifest


def _check_shard_files(output_uri: str, listing: list[dict], manifest_uri: str, what: str, rerun: str) -> None:
    """The shard files under `output_uri` are those `listing` names, at the sizes it records. Else
    IncompleteOutput naming the missing, unlisted and changed files."""
    listed = {e["file"]: e.get("bytes") for e in listing}
    present = shard_sizes(dataio.join(output_uri, SHARDS_DIR))
    missing = sorted(set(listed) - set(present))
    extra = sorted(set(present) - set(listed))
    changed = sorted(name for name in set(listed) & set(present) if listed[name] != present[name])
    if missing or extra or changed:
        problems = [
            f"{len(names)} {kind}: {_names(names)}"
            for kind, names in (
                ("listed shard files missing", missing),
                ("shard files not listed", extra),
                ("shard files changed", changed),
            )
            if names
        ]
        raise IncompleteOutput(
            f"{what}: the shards differ from {manifest_uri} ({'; '.join(problems)}): changed after "
            f"the run finished, or another run is writing there; {rerun}"
        )
