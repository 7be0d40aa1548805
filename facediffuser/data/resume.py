"""Continuing an interrupted preprocess run: what an earlier run with the same settings left in OUTPUT.
No Ray here (`pipelines/preprocess.py` calls it on the driver)."""

from __future__ import annotations

import json

import pyarrow.fs as pafs

from facediffuser.data import io as dataio
from facediffuser.data import output_dir
from facediffuser.data.preprocess_config import PreprocessConfig
from facediffuser.data.schema import SCHEMA_VERSION

# What decides the rows written: a rerun with the same values continues the previous output, other values replace it.
OUTPUT_SETTINGS = (
    "input",
    "source",
    "detector",
    "captioner",
    "max_subjects",
    "resolution",
    "max_pixels",
    "min_face_score",
    "min_side",
    "min_face_percent",
    "min_face_focus",
    "duplicate_distance",
)


def previous_work(config: PreprocessConfig, ids: set[str]) -> tuple[set[str], list[dict]]:
    """What an earlier run with the same settings already left in OUTPUT: (ids in readable shard files, reject
    rows). First removes OUTPUT/manifest.json (until this run ends, training refuses the output). A shard file cut
    short by an interrupted run is deleted (its rows are done again), and so is one holding a row whose input is
    gone (its other rows are done again). Output made with other settings, or by an older version (no run.json),
    is removed. Writes OUTPUT/run.json for this run."""
    import pyarrow.parquet as pq

    output_dir.remove_manifest(config.output)
    shards_uri = dataio.join(config.output, output_dir.SHARDS_DIR)
    rejects_uri = dataio.join(config.output, output_dir.REJECTS_DIR)
    run_uri = dataio.join(config.output, output_dir.RUN_FILE)
    settings = {"schema_version": SCHEMA_VERSION, **{k: getattr(config, k) for k in OUTPUT_SETTINGS}}
    try:
        before = json.loads(dataio.read_bytes(run_uri)) if dataio.exists(run_uri) else None
    except ValueError:  # cut short while written: settings unknown, so the output is replaced
        before = {}
    done: set[str] = set()
    rejects: list[dict] = []
    if before != settings:
        if before is not None or dataio.exists(shards_uri):
            changed = sorted(k for k in settings if (before or {}).get(k) != settings[k]) if before else ["(unknown)"]
            print(
                f"--output {config.output}: replacing the previous output (made with other settings: "
                f"{', '.join(changed)})",
                flush=True,
            )
        dataio.remove_dir(shards_uri)
        dataio.remove_dir(rejects_uri)
        dataio.write_bytes(run_uri, json.dumps(settings, indent=2).encode())
        return done, rejects
    fs, path = dataio.resolve(shards_uri)
    files = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    for info in files:
        try:
            file_ids = pq.read_table(info.path, columns=["id"], filesystem=fs).column("id").to_pylist()
        except Exception:  # cut short by the interruption
            file_ids = None
        if file_ids is None or not set(file_ids) <= ids:
            fs.delete_file(info.path)
        else:
            done.update(file_ids)
    rejects_file = dataio.join(rejects_uri, "rejects.parquet")
    if dataio.exists(rejects_file):
        fs, path = dataio.resolve(rejects_file)
        rejects = pq.read_table(path, filesystem=fs).to_pylist()
    return done, rejects
