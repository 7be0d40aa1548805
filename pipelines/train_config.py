"""The settings of `facediffuser train` and their checks: `TrainConfig` (its fields give the flags, defaults and
help) and what `validate` runs before any work: --storage can hold the run, --base holds the model's parts, the
shards of --data are readable and hold our schema. One-line errors naming the flag.

Below the driver (pipelines/train.py) and the modules it drives (train_inputs, train_worker, train_export), which
all take a `TrainConfig`; it imports none of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from facediffuser.config import arg
from facediffuser.data import io as dataio
from facediffuser.data.schema import check_schema
from facediffuser.model_dir import MODELS

PRECISIONS = ("bf16", "fp16", "no")
AUTO = " (default: derived from the cluster's CPUs and GPUs; the command prints what it chose)"


@dataclass
class TrainConfig:
    model: str = arg(
        help="which model(s) to train; 'both' runs the two side by side", choices=(*MODELS, "both")
    )  # one config per model: the command line's "both" becomes two
    data: str | list[str] = arg(
        help="preprocess output directories (or s3:// prefixes), or their shards/ directories", nargs="+"
    )
    storage: str = arg(help="where runs live: a directory or s3:// prefix")
    name: str = arg(help="run name; rerunning with the same name resumes")
    base: str | None = arg(
        None, "base model: SD layout directory (+subject_encoder/ for the SDM) or hub id", group="source"
    )
    tiny: bool = arg(False, "start from the small random test models", group="source")
    variant: str | None = arg(
        None,
        "weight variant of --base, e.g. fp16 for a hub directory's *.fp16.safetensors "
        "files (read into fp32 master weights)",
    )
    image_encoder: str | None = arg(
        None, "CLIP vision directory for a new subject encoder when --base has no subject_encoder/"
    )
    workers: int | None = arg(None, "Ray Train workers per model" + AUTO)
    use_gpu: bool = arg(False, "one GPU per worker")
    cpus_per_worker: float | None = arg(None, "CPUs reserved per worker" + AUTO)
    data_cpus: float | None = arg(None, "CPUs per Ray Data read task" + AUTO)
    max_steps: int = arg(1000, "optimizer steps in all; a rerun with more continues the run")
    batch_size: int = arg(4, "per worker")
    lr: float = arg(1e-5, "learning rate, constant; a resumed run takes the new value")
    checkpoint_every: int = arg(500, "steps between checkpoints")
    keep_checkpoints: int = arg(2, "checkpoints kept in the run directory")
    max_failures: int = arg(3, "worker failures survived, each resuming from the last checkpoint")
    mixed_precision: str = arg("bf16", "GPU only", choices=PRECISIONS)
    gradient_checkpointing: bool = arg(
        False,
        "recompute the UNet's blocks in the backward pass: slower steps, far less activation memory (docs/sizing.md)",
    )
    resolution: int | None = arg(None, "training image side (default: the model's, 512 for SD1.5 and 128 for --tiny)")
    seed: int = arg(0, "seed of the model's noise, the data order and the augmentation")

    @property
    def run_root(self) -> str:
        return dataio.join(self.storage, self.name)

    def validate(self) -> None:
        """Every setting against its rule, then what they name: --storage can hold the run, --base holds the model's
        parts (a hub id is checked once it is fetched: `fetch_base`), and the shards of --data are readable and
        hold at least one batch per worker (`check_data` reads them). One-line errors naming the flag."""
        self._check_values()
        check_storage(self.storage)
        if not self.tiny and not is_hub_id(self.base):
            check_base(self.base, self.model, self.variant)
        rows = check_data(self.data)
        if rows < self.batch_size * (self.workers or 1):
            raise ValueError(
                f"--data has {rows} rows, fewer than one batch for every worker "
                f"({self.workers or 1} × {self.batch_size}); lower --batch-size"
            )

    def _check_values(self) -> None:
        if self.model not in MODELS:
            raise ValueError(
                f"--model must be sdm or tdm in one config (the command line's 'both' makes one per "
                f"model), got {self.model!r}"
            )
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", self.name):
            raise ValueError(f"--name {self.name!r}: use letters, digits, '.', '_' or '-'")
        if self.variant and self.tiny:
            raise ValueError("--variant names the weight files of --base; --tiny has none")
        if self.variant is not None and not re.fullmatch(r"[A-Za-z0-9_-]+", self.variant):
            raise ValueError(f"--variant {self.variant!r}: a weight-file variant is a word like fp16")
        if self.tiny == bool(self.base):
            raise ValueError(
                "--base and --tiny exclude each other"
                if self.tiny
                else "give --base MODEL_DIR (or --tiny for the small random test models)"
            )
        for name in ("workers", "max_steps", "batch_size", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("cpus_per_worker", "data_cpus"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.max_failures < 0:
            raise ValueError("--max-failures must be >= 0")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"--mixed-precision must be bf16, fp16 or no, got {self.mixed_precision!r}")
        if self.resolution is not None and (self.resolution < 64 or self.resolution % 64):
            raise ValueError(f"--resolution must be a multiple of 64, got {self.resolution}")


def check_storage(storage: str) -> None:
    """--storage is a directory (or will be), or an s3:// prefix in a bucket that exists."""
    fs, path = dataio.resolve(storage)
    try:
        if fs.get_file_info(path).type == pafs.FileType.File:
            raise ValueError(f"--storage {storage}: is a file, expected a directory or s3:// prefix")
        if dataio.is_s3(storage) and fs.get_file_info(path.split("/", 1)[0]).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"--storage {storage}: S3 bucket does not exist")
    except OSError as exc:
        raise FileNotFoundError(f"--storage {storage}: cannot be reached ({str(exc).splitlines()[0]})") from None


# ------------------------------------------------------------------------------------ the checks


def data_uris(data: str | list[str]) -> list[str]:
    return [data] if isinstance(data, str) else list(data)


def check_data(data: str | list[str]) -> int:
    """Shards exist, are readable and have our schema; → row count over all of them. One-line errors."""
    import pyarrow.dataset as pads

    rows = 0
    for uri in data_uris(data):
        fs, path, info = dataio.file_info(uri, "--data")
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"--data {uri}: no such file, directory or S3 prefix")
        try:
            dataset = pads.dataset(path, filesystem=fs, format="parquet", exclude_invalid_files=False)
            files = list(dataset.files)
        except Exception as exc:  # pyarrow raises several types for non-Parquet content
            raise ValueError(f"--data {uri}: not readable as Parquet ({str(exc).splitlines()[0]})") from None
        if not files:
            raise ValueError(f"--data {uri}: no Parquet shards found")
        check_schema(dataset.schema, what=f"--data {uri}")
        count = dataset.count_rows()
        if count == 0:
            raise ValueError(f"--data {uri}: the shards hold no rows")
        rows += count
    return rows


def is_hub_id(base: str | None) -> bool:
    """`owner/name` naming no local path: a Hugging Face hub id, fetched by `fetch_base`."""
    return bool(base) and not Path(base).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", base) is not None


def check_base(base: str, model: str, variant: str | None = None) -> None:
    """The local base directory holds what loading `model` from it needs (no weights are read)."""
    from facediffuser.training.checkpoint import check_base_dir

    try:
        check_base_dir(base, model, variant)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"--base: {exc}") from None
