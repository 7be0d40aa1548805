"""`facediffuser train` / `python -m pipelines.train`: fine-tune the TDM and/or the SDM on Ray Train.

shards (local dir or s3://) → Ray Data reads (all the run's epochs in one dataset)
→ `get_dataset_shard("train").iter_torch_batches` in each TorchTrainer worker, whose collate function decodes and
augments (METHOD.md §3; on a GPU worker on Ray Data's prefetch thread, overlapping the step) → DDP step
(facediffuser.training.step) → every N steps a checkpoint = model directory + optimizer state (safetensors).

Storage layout (STORAGE/NAME):
  sdm/, tdm/                  Ray Train run directories (checkpoints, Ray's state); rerun the same command
                              (same --storage and --name) to resume from the last checkpoint
  sdm/metrics.csv, loss_curve.png   per-step metrics of the finished run
  final/sdm, final/tdm        model directories: `facediffuser generate --model STORAGE/NAME/final`
                              With --model sdm (or tdm) the other one is the untrained base, written once
                              (final/export.json says which parts were trained).

`--model both` runs the two trainings side by side (one driver thread per TorchTrainer) on one cluster.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import json
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pyarrow.fs as pafs

from facediffuser.data import io as dataio
from facediffuser.data.schema import check_schema

AWS_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_DEFAULT_REGION", "AWS_REGION")
FAIL_AT_STEP_ENV = "FACEDIFFUSER_FAIL_AT_STEP"  # test-only fault injection: one worker raises once at this step
FAIL_MARKER_ENV = "FACEDIFFUSER_FAIL_MARKER"  # the file whose existence means "already failed once"
METRIC_COLUMNS = ("step", "attempt", "loss", "loss_den", "loss_loc", "lr", "grad_norm", "samples_per_s", "seconds")


@dataclass
class TrainConfig:
    model: str  # "sdm" | "tdm" (one run); the CLI's "both" becomes two configs
    data: str | list[str]  # shards directories or s3:// prefixes
    storage: str
    name: str
    base: str | None = None
    tiny: bool = False
    image_encoder: str | None = None
    # Resources: None = derived from the cluster Ray finds (plan_resources), so a plain command fits the machine.
    workers: int | None = None
    use_gpu: bool = False
    cpus_per_worker: float | None = None
    data_cpus: float | None = None  # per Ray Data read task
    max_steps: int = 1000
    batch_size: int = 4  # per worker
    lr: float = 1e-5
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    mixed_precision: str = "bf16"  # used on GPU only
    max_failures: int = 3
    resolution: int | None = None  # default: the model's native size (512 for SD1.5, 128 for --tiny)
    seed: int = 0
    fail_at_step: int | None = None
    fail_marker: str | None = None
    worker_env: dict = field(default_factory=dict)

    @property
    def run_root(self) -> str:
        return dataio.join(self.storage, self.name)


# ------------------------------------------------------------------------------------ validation (no Ray)


def data_uris(data: str | list[str]) -> list[str]:
    return [data] if isinstance(data, str) else list(data)


def resolve_data(values: list[str]) -> list[str]:
    """Each --data value → the shards directory of a FINISHED preprocess run: a preprocess output (its shards/), or
    a shards/ directory itself (its manifest is ../manifest.json). The manifest must be complete
    (facediffuser/data/output.py: written when the run ended, counts that add up, the shard files exactly the ones
    it lists); otherwise a one-line error names it, so a run in progress, cut short or changed since is never read.
    Says in one line what each value resolved to."""
    from facediffuser.data import output as layout

    if len({dataio.is_s3(v) for v in values}) > 1:
        raise ValueError("--data: give either local directories or s3:// prefixes, not both")
    resolved = []
    for value in values:
        uri = value.rstrip("/") if dataio.is_s3(value) else dataio.resolve(value)[1]
        _, _, info = dataio.file_info(uri, "--data")  # an unreachable store fails here, in one line
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"--data {value}: no such file, directory or S3 prefix")
        if any(dataio.exists(dataio.join(uri, name)) for name in (layout.MANIFEST_FILE, layout.RUN_FILE,
                                                                    layout.SHARDS_DIR)):
            output = uri  # a preprocess output (finished or not)
        elif uri.rsplit("/", 1)[-1] == layout.SHARDS_DIR:
            output = uri.rsplit("/", 1)[0]  # its shards/ directory
        else:
            raise ValueError(f"--data {value}: not a preprocess output (no {layout.MANIFEST_FILE}) nor its "
                             f"{layout.SHARDS_DIR}/ directory; train reads what `facediffuser preprocess` wrote")
        note = layout.check_complete(output, f"--data {value}")
        counts = note["counts"]
        shards = dataio.join(output, layout.SHARDS_DIR)
        if counts["written"] == 0:
            raise ValueError(f"--data {value}: preprocess wrote no rows ({counts['rejected']} rejected; reasons in "
                             f"{dataio.join(output, layout.REJECTS_DIR, 'rejects.parquet')})")
        print(f"--data {value}: preprocess output; reading {shards} ({counts['written']} rows written, "
              f"{counts['rejected']} rejected, schema v{note.get('schema_version', '?')})")
        resolved.append(shards)
    return resolved


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


def check_base(config: TrainConfig) -> None:
    if config.tiny:
        return
    if not config.base:
        raise ValueError("give --base MODEL_DIR (or --tiny for the small random test models)")
    from facediffuser.training.checkpoint import check_base_dir

    try:
        check_base_dir(config.base, config.model)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"--base: {exc}") from None


def resolve_base(base: str | None) -> str | None:
    """A local directory stays; anything else is taken as a Hugging Face hub id and fetched (or found in the
    hub cache) once, before any training work, so that every worker reads the same local files."""
    if not base or Path(base).exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", base):
        return base
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(base, allow_patterns=["*.json", "*.txt", "*.safetensors"])
    except Exception as exc:
        raise FileNotFoundError(f"--base {base}: not a local directory and not fetchable from the hub "
                                f"({type(exc).__name__})") from None


def validate(config: TrainConfig, rows: int) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", config.name):
        raise ValueError(f"--name {config.name!r}: use letters, digits, '.', '_' or '-'")
    for name in ("workers", "max_steps", "batch_size", "checkpoint_every", "keep_checkpoints"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    if config.max_failures < 0:
        raise ValueError("--max-failures must be >= 0")
    if not config.lr > 0:
        raise ValueError(f"--lr must be > 0, got {config.lr}")
    if config.mixed_precision not in ("bf16", "fp16", "no"):
        raise ValueError(f"--mixed-precision must be bf16, fp16 or no, got {config.mixed_precision!r}")
    if config.resolution is not None and (config.resolution < 64 or config.resolution % 64):
        raise ValueError(f"--resolution must be a multiple of 64, got {config.resolution}")
    for name in ("cpus_per_worker", "data_cpus"):
        if getattr(config, name) is not None and not getattr(config, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(config, name)}")
    if rows < config.batch_size * (config.workers or 1):
        raise ValueError(f"--data has {rows} rows, fewer than one batch for every worker "
                         f"({config.workers or 1} × {config.batch_size}); lower --batch-size")
    fs, path = dataio.resolve(config.storage)
    try:
        if fs.get_file_info(path).type == pafs.FileType.File:
            raise ValueError(f"--storage {config.storage}: is a file, expected a directory or s3:// prefix")
        if dataio.is_s3(config.storage) and fs.get_file_info(path.split("/", 1)[0]).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"--storage {config.storage}: S3 bucket does not exist")
    except OSError as exc:
        raise FileNotFoundError(f"--storage {config.storage}: cannot be reached ({str(exc).splitlines()[0]})") from None


# ------------------------------------------------------------------------------------ Ray Data ingest


def example_collate(config: TrainConfig, seed: int):
    """The worker's collate function: a batch of shard rows (pyarrow) → training tensors (decode + augmentation).
    (Built in a function so that importing this module imports neither Ray Data nor torch.)"""
    import torch
    from ray.data.collate_fn import ArrowBatchCollateFn

    from facediffuser.training.data import DataConfig, ExampleBuilder

    resolution, object_resolution = _model_sizes(config)
    builder = ExampleBuilder(DataConfig(config.model, resolution=resolution, object_resolution=object_resolution),
                             _tokenizer(config), seed=seed)

    class BuildExamples(ArrowBatchCollateFn):
        def __call__(self, batch):
            return {key: torch.from_numpy(value) for key, value in builder(batch).items()}

    return BuildExamples()


def _tokenizer(config: TrainConfig):
    from transformers import CLIPTokenizer

    from facediffuser.prompts import ensure_image_token

    if config.tiny:
        from facediffuser.models.tiny import tiny_tokenizer

        return tiny_tokenizer()
    from facediffuser.training.checkpoint import _model_root

    root, _ = _model_root(Path(config.base), config.model)
    folder = root / "tokenizer" if (root / "tokenizer").is_dir() else Path(config.base) / "tokenizer"
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    ensure_image_token(tokenizer)
    return tokenizer


def _model_sizes(config: TrainConfig) -> tuple[int, int]:
    """(target resolution, object crop size) from the base's configs, without loading weights."""
    if config.tiny:
        from facediffuser.models.tiny import TINY_IMAGE_SIZE, TINY_OBJECT_SIZE

        native, objects = TINY_IMAGE_SIZE, TINY_OBJECT_SIZE
    else:
        from diffusers import UNet2DConditionModel

        from facediffuser.training.checkpoint import _model_root

        root, folder = _model_root(Path(config.base), config.model)
        native = UNet2DConditionModel.load_config(str(root), subfolder=folder)["sample_size"] * 8
        subject = next((d for d in (root / "subject_encoder", Path(config.base) / "subject_encoder") if d.is_dir()), None)
        objects = json.loads((subject / "config.json").read_text())["vision_config"]["image_size"] if subject else 224
    return config.resolution or native, objects


EPOCHS_PER_PASS = 16  # one ingest execution, and so one actor pool and one set of imports, covers this many epochs


def epochs_per_pass(config: TrainConfig, rows: int) -> int:
    """Epochs one pass of the ingest must hold so that every worker gets `max_steps` full batches (capped)."""
    per_epoch = max(1, rows // (config.workers * config.batch_size))  # full batches per worker and epoch
    return max(1, min(EPOCHS_PER_PASS, -(-config.max_steps // per_epoch) + 1))  # +1: the equal split may trim rows


IN_MEMORY_BYTES = 64 * 2**20  # shards up to this size are read once by the driver and shuffled per epoch in memory


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
    shards = pads.dataset([f for p in paths for f in pads.dataset(p, filesystem=fs, format="parquet").files],
                          filesystem=fs, format="parquet")
    if sum(info.size for info in fs.get_file_info(shards.files)) <= IN_MEMORY_BYTES:
        table = shards.to_table()
        order = np.random.default_rng(config.seed)
        return ray.data.from_arrow([table.take(order.permutation(table.num_rows)) for _ in range(epochs)])
    reads = [ray.data.read_parquet(paths, filesystem=fs, shuffle=FileShuffleConfig(seed=config.seed + epoch),
                                   ray_remote_args={"num_cpus": config.data_cpus})
             for epoch in range(epochs)]
    return reads[0].union(*reads[1:]) if len(reads) > 1 else reads[0]


# ------------------------------------------------------------------------------------ the worker loop


def _maybe_fail(config: TrainConfig, step: int, rank: int, world: int) -> None:
    """Test-only fault injection: the last rank raises once when it is about to run `step`."""
    if config.fail_at_step != step or rank != world - 1 or not config.fail_marker:
        return
    marker = Path(config.fail_marker)
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"failed at step {step}\n")
    # Ray Train's controller collects reports every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s): a crash straight after
    # a checkpoint report can beat the controller to it, and the restart would then start from the checkpoint
    # before. Give it three polls so the test always sees the case it describes (resume from the latest one).
    time.sleep(3 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")))
    raise RuntimeError(f"injected fault at step {step} ({FAIL_AT_STEP_ENV})")


def _param_checksum(model) -> float:
    import torch

    with torch.no_grad():
        return float(sum(p.detach().double().sum() for p in model.trainable_parameters()))


def _rank_spread(value: float) -> float:
    """max − min of `value` over ranks: 0 when every rank holds the same parameters."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0.0
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    gathered = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, torch.tensor([value], dtype=torch.float64, device=device))
    values = [float(v) for v in gathered]
    return max(values) - min(values)


def train_loop_per_worker(config_dict: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from facediffuser.training import checkpoint as ckpt
    from facediffuser.training.step import OptimConfig, TrainingModel, TrainStep, make_optimizer

    progress = config_dict.pop("progress", None)  # the driver's ProgressBoard actor (rank 0 reports to it)
    config = TrainConfig(**config_dict)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    report_progress = (lambda **fields: progress.update.remote(config.model, **fields)) if progress and rank == 0 \
        else (lambda **fields: None)
    collate = example_collate(config, seed=config.seed + 1000 * rank)  # seeds torch too: seed the worker after
    torch.manual_seed(config.seed + 1000 * rank)
    device = ray.train.torch.get_device()
    if device.type == "cpu":  # as many torch threads as CPUs this worker was given (at least one)
        torch.set_num_threads(max(1, int(config.cpus_per_worker)))
    optim = OptimConfig(lr=config.lr, mixed_precision=config.mixed_precision)

    restored = ray.train.get_checkpoint()
    history: list[dict] = []
    start_step, attempt = 0, 0
    with (restored.as_directory() if restored else contextlib.nullcontext()) as restored_dir:
        if restored_dir:
            parts = ckpt.load_components(Path(restored_dir) / ckpt.MODEL_SUBDIR, config.model, log=lambda m: None)
        else:
            parts = ckpt.load_components(config.base, config.model, tiny=config.tiny, image_encoder=config.image_encoder,
                                         log=print if rank == 0 else (lambda m: None))
        model = TrainingModel(config.model, parts["unet"], parts["vae"], parts["text_encoder"], parts["scheduler"].config,
                              parts["subject_encoder"], optim, seed=config.seed + rank)
        model.to(device)
        optimizer = make_optimizer(model, optim)
        if restored_dir:
            start_step, extra = ckpt.load_training_state(Path(restored_dir) / ckpt.STATE_FILE, optimizer)
            attempt = int(extra.get("attempt", 0)) + 1
            history = [r for r in _read_metrics(Path(restored_dir) / "metrics.csv") if int(r["step"]) <= start_step]
    for group in optimizer.param_groups:  # --lr on a resumed run wins over the stored one
        group["lr"] = config.lr
    model.train()
    wrapped = ray.train.torch.prepare_model(model, move_to_device=False)
    step_fn = TrainStep(wrapped, optimizer, optim, device)
    shard = ray.train.get_dataset_shard("train")
    # On a GPU the next batch is built on Ray Data's prefetch thread while the step runs on the device. On CPU
    # workers that thread would only compete with the step for the GIL and the cores: build it inline instead.
    prefetch = 1 if device.type == "cuda" else 0
    report_progress(step=start_step, total=config.max_steps, resumed_from=start_step if restored else None)

    step = start_step
    last = time.perf_counter()
    while step < config.max_steps:  # one pass holds many epochs (build_dataset); a long run takes several passes
        for batch in shard.iter_torch_batches(batch_size=config.batch_size, drop_last=True, collate_fn=collate,
                                              prefetch_batches=prefetch):
            _maybe_fail(config, step + 1, rank, world)
            metrics = step_fn(batch)
            step += 1
            now = time.perf_counter()
            metrics.update(step=step, attempt=attempt, seconds=now - last,
                           samples_per_s=config.batch_size * world / max(now - last, 1e-9))
            last = now
            history.append({k: metrics[k] for k in METRIC_COLUMNS})
            report_progress(step=step, loss=metrics["loss"])
            if step % config.checkpoint_every == 0 or step == config.max_steps:
                _report(config, model, parts, optimizer, step, attempt, history, rank)
                last = time.perf_counter()  # checkpoint time is not step time
            if step >= config.max_steps:
                break


class ProgressBoard:
    """A tiny actor (0 CPUs) that rank 0 of each run writes its step and loss to; the driver draws the bars."""

    def __init__(self):
        self.state: dict[str, dict] = {}

    def update(self, model: str, **fields) -> None:
        self.state.setdefault(model, {}).update(fields)

    def read(self) -> dict[str, dict]:
        return self.state


def _report(config, model, parts, optimizer, step, attempt, history, rank) -> None:
    """All ranks report; rank 0 attaches the checkpoint, written to a temp dir first (Ray uploads it whole)."""
    import ray.train

    from facediffuser.training import checkpoint as ckpt

    spread = _rank_spread(_param_checksum(model))
    latest = history[-1]
    metrics = {"step": step, "attempt": attempt, "loss": latest["loss"], "loss_den": latest["loss_den"],
               "loss_loc": latest["loss_loc"], "param_rank_spread": spread}
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix=f"facediffuser-{config.model}-ckpt-") as tmp:
        ckpt.save_model_dir(Path(tmp) / ckpt.MODEL_SUBDIR, config.model, unet=model.unet, vae=model.vae,
                            text_encoder=model.text_encoder, tokenizer=parts["tokenizer"], scheduler=parts["scheduler"],
                            subject_encoder=model.subject_encoder)
        ckpt.save_training_state(Path(tmp) / ckpt.STATE_FILE, optimizer, step,
                                 {"attempt": attempt, "model": config.model, "param_rank_spread": spread})
        _write_metrics(history, Path(tmp) / "metrics.csv")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{step:08d}")


def _write_metrics(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


# ------------------------------------------------------------------------------------ driver side


def ray_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """Like `dataio.resolve`, but an S3 filesystem carries the driver's endpoint and credentials itself.

    Ray Data read tasks and Ray Train's controller and workers get this object pickled; without explicit
    credentials the AWS SDK in a process started without the AWS_* variables falls back to instance metadata
    lookups, which hang off EC2."""
    fs, path = dataio.resolve(uri)
    if not dataio.is_s3(uri) or not os.environ.get("AWS_ACCESS_KEY_ID"):
        return fs, path
    return pafs.S3FileSystem(
        access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        session_token=os.environ.get("AWS_SESSION_TOKEN"), endpoint_override=os.environ.get("AWS_ENDPOINT_URL"),
        region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
    ), path


def _storage(config: TrainConfig) -> tuple[pafs.FileSystem, str]:
    return ray_filesystem(config.storage)


def fit_one(config: TrainConfig, progress=None) -> dict:
    """Run (or resume) one TorchTrainer; export its final model dir and metrics. → summary dict."""
    import ray.train
    from ray.train.torch import TorchTrainer

    fs, storage_path = _storage(config)
    trainer = TorchTrainer(
        train_loop_per_worker,
        # credentials travel in the runtime env only
        train_loop_config={**asdict(config), "worker_env": {}, "progress": progress},
        scaling_config=ray.train.ScalingConfig(num_workers=config.workers, use_gpu=config.use_gpu,
                                               resources_per_worker={"CPU": config.cpus_per_worker}),
        datasets={"train": build_dataset(config, check_data(config.data))},
        # one worker: nothing to split, and without a split the dataset runs inside the worker instead of in a
        # SplitCoordinator actor (one more process, polling for the whole run)
        dataset_config=ray.train.DataConfig(datasets_to_split=[] if config.workers == 1 else "all"),
        run_config=ray.train.RunConfig(
            name=config.model,
            storage_path=f"{storage_path.rstrip('/')}/{config.name}",
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.keep_checkpoints),
            worker_runtime_env={"env_vars": config.worker_env} if config.worker_env else None,
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{config.model}: training finished without a checkpoint")
    return export_final(config, result.checkpoint)


def export_final(config: TrainConfig, checkpoint) -> dict:
    """Copy the last checkpoint's model dir to RUN/final/<model> (temp name, then swapped in) and write the
    metrics table + loss curve next to the Ray run directory."""
    from facediffuser.training.checkpoint import MODEL_SUBDIR

    fs, _ = _storage(config)
    final_uri = dataio.join(config.run_root, "final", config.model)
    _replace_dir(checkpoint.filesystem, f"{checkpoint.path}/{MODEL_SUBDIR}", fs, final_uri)
    with tempfile.TemporaryDirectory() as tmp:
        pafs.copy_files(f"{checkpoint.path}/metrics.csv", f"{tmp}/metrics.csv",
                        source_filesystem=checkpoint.filesystem, destination_filesystem=pafs.LocalFileSystem())
        rows = _read_metrics(Path(tmp) / "metrics.csv")
        plot_losses(rows, Path(tmp) / "loss_curve.png", title=f"{config.name} {config.model}")
        run_dir = dataio.join(config.run_root, config.model)
        for name in ("metrics.csv", "loss_curve.png"):
            dataio.write_bytes(dataio.join(run_dir, name), (Path(tmp) / name).read_bytes())
    last = rows[-1]
    return {"model": config.model, "steps": int(last["step"]), "loss_den": last["loss_den"], "loss_loc": last["loss_loc"],
            "restarts": int(last["attempt"]), "model_dir": final_uri, "metrics": dataio.join(run_dir, "metrics.csv")}


def _replace_dir(source_fs, source_path: str, fs, dest_uri: str) -> None:
    """Put a copy of `source_path` at `dest_uri`; locally it is staged under a temp name and renamed in."""
    _, dest = dataio.resolve(dest_uri)
    staging = dest.rstrip("/") + ".incoming"
    if fs.get_file_info(staging).type != pafs.FileType.NotFound:
        fs.delete_dir(staging)
    if dataio.is_s3(dest_uri):  # S3 has no directory rename: replace in place
        if fs.get_file_info(dest).type != pafs.FileType.NotFound:
            fs.delete_dir(dest)
        pafs.copy_files(source_path, dest, source_filesystem=source_fs, destination_filesystem=fs)
        return
    pafs.copy_files(source_path, staging, source_filesystem=source_fs, destination_filesystem=fs)
    if fs.get_file_info(dest).type != pafs.FileType.NotFound:
        fs.delete_dir(dest)
    fs.move(staging, dest)


def plot_losses(rows: list[dict], out: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    figure, (den_axis, loc_axis) = plt.subplots(1, 2, figsize=(10, 3.5))
    den_axis.plot(steps, [r["loss_den"] for r in rows], lw=1)
    den_axis.set(xlabel="step", ylabel="denoising loss", title=f"{title} L_den".strip())
    loc_axis.plot(steps, [r["loss_loc"] for r in rows], lw=1, color="tab:orange")
    loc_axis.set(xlabel="step", ylabel="localization loss", title=f"{title} L_loc".strip())
    for restart in sorted({r["step"] for r, p in zip(rows[1:], rows) if r["attempt"] != p["attempt"]}):
        for axis in (den_axis, loc_axis):
            axis.axvline(restart - 0.5, color="grey", ls="--", lw=0.8)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)


def pair_with_base(config: TrainConfig) -> str | None:
    """A single-model run: put the base's other model beside it (once) so final/ is a complete pipeline."""
    from facediffuser.training import checkpoint as ckpt

    other = "tdm" if config.model == "sdm" else "sdm"
    other_uri = dataio.join(config.run_root, "final", other)
    if dataio.exists(dataio.join(other_uri, "unet")):
        return None
    parts = ckpt.load_components(config.base, other, tiny=config.tiny, image_encoder=config.image_encoder)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt.save_model_dir(tmp, other, **{k: parts[k] for k in ("unet", "vae", "text_encoder", "tokenizer", "scheduler",
                                                                  "subject_encoder")})
        _replace_dir(pafs.LocalFileSystem(), tmp, _storage(config)[0], other_uri)
    return other


def plan_resources(configs: list[TrainConfig], cluster_cpus: float, cluster_gpus: float) -> tuple[list[TrainConfig], str]:
    """Fill in the resources the user left open from the cluster Ray found; → (configs, one line saying what).

    One CPU stays unreserved: Ray Data lists the shard files in a task that needs a whole free CPU, and the
    ingest never starts without it. The rest is shared evenly by the runs: without GPUs one worker per run
    (several CPU workers on one machine only add DDP traffic), with GPUs one worker per GPU. Decoding happens in
    the workers (example_collate), so the read tasks get a small slice and the workers the rest."""
    share = (cluster_cpus - 1) / len(configs)
    planned = []
    for config in configs:
        workers = config.workers or (max(1, int(cluster_gpus // len(configs))) if config.use_gpu else 1)
        data_cpus = config.data_cpus or round(max(min(share / 8, 1.0), 0.05), 2)
        cpus_per_worker = config.cpus_per_worker or round(max((share - data_cpus) / workers, 0.05), 2)
        planned.append(replace(config, workers=workers, data_cpus=data_cpus, cpus_per_worker=cpus_per_worker))
    needed = sum(c.workers * c.cpus_per_worker + c.data_cpus for c in planned)
    if cluster_cpus - needed < 1 - 1e-9:
        raise ValueError(f"the cluster has {cluster_cpus:g} CPUs; training needs {needed:g} plus 1 free for Ray Data's "
                         "file listing: lower --workers, --cpus-per-worker or --data-cpus, or leave them out")
    p = planned[0]
    gpus = ", 1 GPU" if p.use_gpu else ""
    line = (f"resources per model: {p.workers} worker(s) × {p.cpus_per_worker:g} CPU{gpus}, Ray Data reads "
            f"{p.data_cpus:g} CPU (cluster: {cluster_cpus:g} CPUs, {cluster_gpus:g} GPUs; 1 CPU left free)")
    return planned, line


def train(configs: list[TrainConfig], verbose: bool = False) -> list[dict]:
    """Run the trainings (side by side when there are several). Each TorchTrainer is driven from a thread of this
    process (a launcher task per run would be one more process importing Ray Train). → one summary per model."""
    import ray

    from pipelines.ray_runtime import init_ray

    init_ray(verbose=verbose)
    resources = ray.cluster_resources()
    configs, line = plan_resources(configs, resources.get("CPU", 0), resources.get("GPU", 0))
    print(line, flush=True)
    board = ray.remote(num_cpus=0)(ProgressBoard).remote()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(configs), thread_name_prefix="fit")
    try:
        futures = [pool.submit(fit_one, c, board) for c in configs]
        _show_progress(board, configs, futures)
    finally:  # on Ctrl-C, do not wait here: shutting Ray down ends the fits
        pool.shutdown(wait=False)
    summaries, errors = [], []
    for config, future in zip(configs, futures):
        try:
            summaries.append(future.result())
        except Exception as exc:
            errors.append(f"{config.model}: {_root_cause(exc)}")
    if errors:
        raise RuntimeError("training failed (" + "; ".join(errors) + "); rerun the same command to resume "
                           "from the last checkpoint")
    return summaries


def _show_progress(board, configs: list[TrainConfig], futures: list) -> None:
    """One bar per model, fed by the workers through `board`, until every run has finished."""
    import ray
    from tqdm.auto import tqdm

    bars = {c.model: tqdm(total=c.max_steps, desc=f"train {c.model}", position=i, mininterval=1.0, dynamic_ncols=True)
            for i, c in enumerate(configs)}
    said = set()
    while True:
        finished = all(f.done() for f in futures)
        for model, state in ray.get(board.read.remote()).items():
            bar = bars[model]
            if state.get("resumed_from") and model not in said:
                said.add(model)
                bar.write(f"{model}: resuming from the checkpoint at step {state['resumed_from']}")
            bar.n = state.get("step", 0)
            if "loss" in state:
                bar.set_postfix(loss=f"{state['loss']:.4f}", refresh=False)
            bar.refresh()
        if finished:
            break
        concurrent.futures.wait(futures, timeout=1.0)
    for bar in bars.values():
        bar.close()


def _root_cause(exc: BaseException) -> str:
    text = str(exc)
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    for line in reversed(lines):  # Ray wraps errors in tracebacks: keep the last "SomethingError: ..." line
        if re.match(r"^[\w.]+(Error|Exception): ", line):
            return line[:300]
    return (lines[-1] if lines else type(exc).__name__)[:300]


def write_export_note(configs: list[TrainConfig], paired: str | None) -> None:
    first = configs[0]
    note_uri = dataio.join(first.run_root, "final", "export.json")
    previous = json.loads(dataio.read_bytes(note_uri)) if dataio.exists(note_uri) else {}
    for config in configs:
        previous[config.model] = {"trained": True, "run": dataio.join(first.run_root, config.model)}
    if paired:
        previous.setdefault(paired, {"trained": False, "base": "tiny" if first.tiny else first.base})
    dataio.write_bytes(note_uri, json.dumps(previous, indent=2).encode())


# ------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, choices=("tdm", "sdm", "both"), help="which model(s) to train")
    parser.add_argument("--data", required=True, nargs="+",
                        help="preprocess output directories (or s3:// prefixes), or their shards/ directories")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--base", help="base model: SD layout directory (+subject_encoder/ for the SDM) or hub id")
    source.add_argument("--tiny", action="store_true", help="start from the small random test models")
    parser.add_argument("--image-encoder", default=None,
                        help="CLIP vision directory for a new subject encoder when --base has no subject_encoder/")
    parser.add_argument("--storage", required=True, help="where runs live: a directory or s3:// prefix")
    parser.add_argument("--name", required=True, help="run name; rerunning with the same name resumes")
    auto = " (default: derived from the cluster's CPUs and GPUs; the command prints what it chose)"
    parser.add_argument("--workers", type=int, default=None, help="Ray Train workers per model" + auto)
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    parser.add_argument("--cpus-per-worker", type=float, default=None, help="CPUs reserved per worker" + auto)
    parser.add_argument("--data-cpus", type=float, default=None, help="CPUs per Ray Data read task" + auto)
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=4, help="per worker")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--keep-checkpoints", type=int, default=2)
    parser.add_argument("--max-failures", type=int, default=3, help="worker failures survived (resume from checkpoint)")
    parser.add_argument("--mixed-precision", default="bf16", choices=("bf16", "fp16", "no"), help="GPU only")
    parser.add_argument("--resolution", type=int, default=None, help="training image side (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="show Ray's own log lines on the terminal")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    fail_at = os.environ.get(FAIL_AT_STEP_ENV)
    base = None if args.tiny else args.base
    config = TrainConfig(
        model="sdm" if args.model == "both" else args.model, data=args.data, storage=args.storage, name=args.name,
        base=base, tiny=args.tiny, image_encoder=args.image_encoder, workers=args.workers, use_gpu=args.use_gpu,
        cpus_per_worker=args.cpus_per_worker, data_cpus=args.data_cpus,
        max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr, checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints, mixed_precision=args.mixed_precision, max_failures=args.max_failures,
        resolution=args.resolution, seed=args.seed,
        fail_at_step=int(fail_at) if fail_at else None,
        fail_marker=os.environ.get(FAIL_MARKER_ENV) or (
            str(Path(tempfile.gettempdir()) / f"facediffuser-fail-{args.name}") if fail_at else None),
        worker_env={name: os.environ[name] for name in AWS_VARIABLES if name in os.environ},
    )
    if not dataio.is_s3(config.storage):
        config.storage = dataio.resolve(config.storage)[1]
    config.data = resolve_data(args.data)
    return config


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    rows = check_data(config.data)
    validate(config, rows)
    config.base = resolve_base(config.base)
    models = ["tdm", "sdm"] if args.model == "both" else [args.model]
    configs = [replace(config, model=m) for m in models]
    for c in configs:
        check_base(c)
    print(f"training {' and '.join(models)} on {rows} rows from {', '.join(data_uris(config.data))} → {config.run_root}")
    summaries = train(configs, verbose=args.verbose)
    paired = pair_with_base(configs[0]) if len(configs) == 1 else None
    write_export_note(configs, paired)
    for s in summaries:
        print(f"{s['model']}: {s['steps']} steps, loss_den {s['loss_den']:.4f}, loss_loc {s['loss_loc']:.4f}, "
              f"restarts {s['restarts']}; model {s['model_dir']}; metrics {s['metrics']}")
    if paired:
        print(f"{paired}: untrained base, paired so that final/ is a complete Face-diffuser model")
    print(f"final model: {dataio.join(config.run_root, 'final')}")
    return 0


if __name__ == "__main__":
    from facediffuser.cli import module_main

    module_main("train")
