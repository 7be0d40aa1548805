"""What a training run reads, on the driver: `--data` resolved to the shards of finished preprocess runs and
checked, the one Ray Data dataset holding every epoch of the run (the workers pull it with `get_dataset_shard`, see
pipelines/train_worker.py), and `--base` checked or, for a hub id, fetched once before any work.

The checks fail in one line naming the flag and its value, before any Ray work starts (those `validate` runs live
with the settings, pipelines/train_config.py).
"""

from __future__ import annotations

import os
from dataclasses import replace

import pyarrow.fs as pafs

from facediffuser.data import io as dataio
from pipelines.train_config import TrainConfig, check_base, data_uris, is_hub_id

EPOCHS_PER_PASS = 16  # one ingest execution, and so one actor pool and one set of imports, covers this many epochs
IN_MEMORY_BYTES = 64 * 2**20  # shards up to this size are read once by the driver and shuffled per epoch in memory


def resolve_data(values: list[str]) -> list[str]:
    """Each --data value → the shards directory of a FINISHED preprocess run: a preprocess output (its shards/), or
    a shards/ directory itself (its manifest is ../manifest.json). The manifest must be complete
    (facediffuser/data/output_dir.py: written when the run ended, counts that add up, the shard files exactly the ones
    it lists); otherwise a one-line error names it, so a run in progress, cut short or changed since is never read.
    Says in one line what each value resolved to."""
    from facediffuser.data import output_dir

    if len({dataio.is_s3(v) for v in values}) > 1:
        raise ValueError("--data: give either local directories or s3:// prefixes, not both")
    resolved = []
    for value in values:
        uri = value.rstrip("/") if dataio.is_s3(value) else dataio.resolve(value)[1]
        _, _, info = dataio.file_info(uri, "--data")  # an unreachable store fails here, in one line
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"--data {value}: no such file, directory or S3 prefix")
        if any(
            dataio.exists(dataio.join(uri, name))
            for name in (output_dir.MANIFEST_FILE, output_dir.RUN_FILE, output_dir.SHARDS_DIR)
        ):
            output = uri  # a preprocess output (finished or not)
        elif uri.rsplit("/", 1)[-1] == output_dir.SHARDS_DIR:
            output = uri.rsplit("/", 1)[0]  # its shards/ directory
        else:
            raise ValueError(
                f"--data {value}: not a preprocess output (no {output_dir.MANIFEST_FILE}) nor its "
                f"{output_dir.SHARDS_DIR}/ directory; train reads what `facediffuser preprocess` wrote"
            )
        note = output_dir.check_complete(output, f"--data {value}")
        counts = note["counts"]
        shards = dataio.join(output, output_dir.SHARDS_DIR)
        if counts["written"] == 0:
            raise ValueError(
                f"--data {value}: preprocess wrote no rows ({counts['rejected']} rejected; reasons in "
                f"{dataio.join(output, output_dir.REJECTS_DIR, 'rejects.parquet')})"
            )
        print(
            f"--data {value}: preprocess output; reading {shards} ({counts['written']} rows written, "
            f"{counts['rejected']} rejected, schema v{note.get('schema_version', '?')})"
        )
        resolved.append(shards)
    return resolved


def ray_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """Like `dataio.resolve`, but an S3 filesystem carries the driver's endpoint and credentials itself.

    Ray Data read tasks and Ray Train's controller and workers get this object pickled; without explicit
    credentials the AWS SDK in a process started without the AWS_* variables falls back to instance metadata
    lookups, which hang off EC2."""
    fs, path = dataio.resolve(uri)
    if not dataio.is_s3(uri) or not os.environ.get("AWS_ACCESS_KEY_ID"):
        return fs, path
    return pafs.S3FileSystem(
        access_key=os.environ["AWS_ACCESS_KEY_ID"],
        secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        session_token=os.environ.get("AWS_SESSION_TOKEN"),
        endpoint_override=os.environ.get("AWS_ENDPOINT_URL"),
        region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
    ), path


def epochs_per_pass(config: TrainConfig, rows: int) -> int:
    """Epochs one pass of the ingest must hold so that every worker gets `max_steps` full batches (capped)."""
    per_epoch = max(1, rows // (config.workers * config.batch_size))  # full batches per worker and epoch
    return max(1, min(EPOCHS_PER_PASS, -(-config.max_steps // per_epoch) + 1))  # +1: the equal split may trim rows


def build_dataset(config: TrainConfig, rows: int):
    """shards → rows, for all the epochs of the run in one dataset (a worker iterates it once).

    Small shards (IN_MEMORY_BYTES) are read once here and each epoch is a seeded permutation of their rows, so the
    ingest starts no Ray Data tasks at all. Larger ones stream: each epoch is a read of the shards in its own seeded
    file order, and the reads are unioned. Either way the pipeline is planned and started once per run, not once
    per epoch (on small datasets a restart per epoch cost more than the training itself)."""
    import numpy as np
    import pyarrow.dataset as pads
    import ray
    from ray.data import FileShuffleConfig

    uris = data_uris(config.data)
    fs, _ = ray_filesystem(uris[0])
    paths = [dataio.resolve(uri)[1] for uri in uris]
    epochs = epochs_per_pass(config, rows)
    shards = pads.dataset(
        [f for p in paths for f in pads.dataset(p, filesystem=fs, format="parquet").files],
        filesystem=fs,
        format="parquet",
    )
    if sum(info.size for info in fs.get_file_info(shards.files)) <= IN_MEMORY_BYTES:
        table = shards.to_table()
        order = np.random.default_rng(config.seed)
        return ray.data.from_arrow([table.take(order.permutation(table.num_rows)) for _ in range(epochs)])
    reads = [
        ray.data.read_parquet(
            paths,
            filesystem=fs,
            shuffle=FileShuffleConfig(seed=config.seed + epoch),
            ray_remote_args={"num_cpus": config.data_cpus},
        )
        for epoch in range(epochs)
    ]
    return reads[0].union(*reads[1:]) if len(reads) > 1 else reads[0]


# ------------------------------------------------------------------------------------ --base


def fetch_base(configs: list[TrainConfig]) -> list[TrainConfig]:
    """A hub id given as --base → its local snapshot, fetched (or found in the hub cache) once, before any training
    work, so that every worker reads the same local files; checked like a local --base. → the configs using it."""
    base = configs[0].base
    if not is_hub_id(base):
        return configs
    try:
        from huggingface_hub import snapshot_download

        variant = configs[0].variant  # the one variant's weights (the hub SD1.5 repo holds several GB of each)
        weights = f"*.{variant}.safetensors" if variant else "*.safetensors"
        local = snapshot_download(
            base, allow_patterns=["*.json", "*.txt", weights], ignore_patterns=["safety_checker/*"]
        )
    except Exception as exc:
        raise FileNotFoundError(
            f"--base {base}: not a local directory and not fetchable from the hub ({type(exc).__name__})"
        ) from None
    for config in configs:
        check_base(local, config.model, config.variant)
    return [replace(config, base=local) for config in configs]
