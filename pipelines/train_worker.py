"""One Ray Train worker of a run (`train_loop_per_worker`, started by `fit_one` in pipelines/train.py).

start from the last checkpoint or the base → pull batches with `get_dataset_shard("train").iter_torch_batches`,
whose collate function decodes and augments them (facediffuser.training.ingest; on a GPU worker on Ray Data's
prefetch thread, overlapping the step) → DDP step (facediffuser.training.step) → every `checkpoint_every` steps
all ranks report, rank 0 with a checkpoint: model directory + optimizer state (safetensors) + metrics.csv.

At each checkpoint the ranks all-gather a checksum of their trainable parameters; its spread (0 when DDP kept them
identical) goes into the metrics and the checkpoint. Test-only fault injection: the `train.step` point of
facediffuser/faults.py (`FACEDIFFUSER_FAULTS`, forwarded by the driver to the workers), never the config.
Progress: rank 0 writes its step and loss to a `ProgressBoard` actor, and the driver draws them (`show_progress`;
both in pipelines/train_progress.py). What the ranks report, and rank 0's checkpoint: pipelines/train_report.py.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from cluster.runtime import where
from facediffuser import faults
from facediffuser.devices import torch_device
from facediffuser.training.metrics import METRIC_COLUMNS, read_metrics
from pipelines.train_config import TrainConfig
from pipelines.train_progress import progress_reporter
from pipelines.train_report import report, worker_placement


def injected_fault(step: int, rank: int, world: int, run_name: str) -> None:
    """Tests only, off unless FACEDIFFUSER_FAULTS names `train.step` (facediffuser/faults.py): the last rank
    raises once, just before that step. The `train.marker` file (default: one per run name in the temp
    directory) records that it did, so the group Ray Train restarts does not fail again."""
    if faults.armed_int("train.step") != step or rank != world - 1:
        return
    marker = Path(faults.armed("train.marker") or Path(tempfile.gettempdir()) / f"facediffuser-fail-{run_name}")
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"failed at step {step}\n")
    # Ray Train's controller collects reports every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s): a crash straight
    # after a checkpoint report can beat the controller to it, and the restart would then start from the
    # checkpoint before. Give it three polls so the test always sees the case it describes (resume from the
    # latest one).
    time.sleep(3 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")))
    faults.fire("train.step")


def example_collate(config: TrainConfig, seed: int):
    """The worker's collate function: a batch of shard rows (pyarrow) → training tensors (decode + augmentation)."""
    import torch
    from ray.data.collate_fn import ArrowBatchCollateFn

    from facediffuser.training.ingest import example_builder

    builder = example_builder(config.model, config.base, config.tiny, config.resolution, seed=seed)

    class BuildExamples(ArrowBatchCollateFn):
        def __call__(self, batch):
            return {key: torch.from_numpy(value) for key, value in builder(batch).items()}

    return BuildExamples()


@dataclass
class WorkerRun:
    """What a worker carries from step to step."""

    model: object  # facediffuser.training.step.TrainingModel
    optimizer: object
    optim: object  # facediffuser.training.step.OptimConfig
    parts: dict  # the loaded components (tokenizer and scheduler are saved with every checkpoint)
    step: int = 0
    attempt: int = 0  # restarts so far: 0 on a fresh run, +1 for every resume
    history: list[dict] = field(default_factory=list)  # metric rows up to `step`
    resumed: bool = False
    placement: dict = field(default_factory=dict)  # {"worker_nodes": "id,id,...", "ddp_backend": ...} (all ranks)


def start(config: TrainConfig, rank: int, device) -> WorkerRun:
    """The model and optimizer from Ray Train's latest checkpoint of this run when there is one, else the base."""
    import ray.train

    from facediffuser.training import checkpoint as ckpt
    from facediffuser.training.step import OptimConfig, TrainingModel, make_optimizer

    optim = OptimConfig(lr=config.lr, mixed_precision=config.mixed_precision)
    restored = ray.train.get_checkpoint()
    with restored_checkpoint(restored) as restored_dir:
        if restored_dir:
            parts = ckpt.load_components(Path(restored_dir) / ckpt.MODEL_SUBDIR, config.model, log=lambda m: None)
        else:
            parts = ckpt.load_components(
                config.base,
                config.model,
                tiny=config.tiny,
                image_encoder=config.image_encoder,
                variant=config.variant,
                log=print if rank == 0 else (lambda m: None),
            )
        if config.gradient_checkpointing:  # recompute each UNet block in backward: far less activation memory
            parts["unet"].enable_gradient_checkpointing()
        model = TrainingModel(
            config.model,
            parts["unet"],
            parts["vae"],
            parts["text_encoder"],
            parts["scheduler"].config,
            parts["subject_encoder"],
            optim,
            seed=config.seed + rank,
        )
        model.to(device)
        run = WorkerRun(model, make_optimizer(model, optim), optim, parts, resumed=restored is not None)
        if restored_dir:
            run.step, extra = ckpt.load_training_state(Path(restored_dir) / ckpt.STATE_FILE, run.optimizer)
            run.attempt = int(extra.get("attempt", 0)) + 1
            run.history = [r for r in read_metrics(Path(restored_dir) / "metrics.csv") if int(r["step"]) <= run.step]
    for group in run.optimizer.param_groups:  # --lr on a resumed run wins over the stored one
        group["lr"] = config.lr
    model.train()
    return run


@contextlib.contextmanager
def restored_checkpoint(checkpoint):
    """The checkpoint's files in a local directory (None without a checkpoint). A local checkpoint is read where it
    is. A remote one is downloaded into this rank's own temporary directory: with Ray's shared one
    (`Checkpoint.as_directory`), a rank arriving after another's download downloads again over the files that rank
    is reading (seen as a half-written scheduler_config.json on a two-worker S3 resume)."""
    import pyarrow.fs

    if checkpoint is None or isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield checkpoint.path if checkpoint else None
        return
    with tempfile.TemporaryDirectory(prefix="facediffuser-restore-") as scratch:
        yield checkpoint.to_directory(scratch)


def worker_device(config: TrainConfig, rank: int):
    """This worker's torch device. A GPU worker whose torch sees no GPU fails here with one line naming its node
    (FACEDIFFUSER_CPU_UNDER_GPU=1: CPU kernels instead, for rehearsals on logical GPUs)."""
    import ray.train.torch
    import torch

    kind = torch_device(1 if config.use_gpu else 0, f"{config.model} train worker rank {rank} on {where()}")
    return ray.train.torch.get_device() if kind == "cuda" else torch.device("cpu")


def record_step(
    config: TrainConfig,
    run: WorkerRun,
    metrics: dict,
    seconds: float,
    world: int,
    report_progress,
) -> None:
    """One step's metrics: into the run's history and to the progress board (rank 0)."""
    metrics.update(
        step=run.step,
        attempt=run.attempt,
        seconds=seconds,
        samples_per_s=config.batch_size * world / max(seconds, 1e-9),
    )
    run.history.append({k: metrics[k] for k in METRIC_COLUMNS})
    report_progress(step=run.step, loss=metrics["loss"])


def train_loop_per_worker(config_dict: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from facediffuser.training.step import TrainStep

    progress = config_dict.pop("progress", None)  # the driver's ProgressBoard actor (rank 0 reports to it)
    config = TrainConfig(**config_dict)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    report_progress = progress_reporter(progress, config.model, rank)
    collate = example_collate(config, seed=config.seed + 1000 * rank)  # seeds torch too: seed the worker after
    torch.manual_seed(config.seed + 1000 * rank)
    device = worker_device(config, rank)
    placement = worker_placement()
    if device.type == "cpu":  # as many torch threads as CPUs this worker was given (at least one)
        torch.set_num_threads(max(1, int(config.cpus_per_worker)))
    run = start(config, rank, device)
    # the device given (the model is on it already): Ray's own choice would be cuda:0 for a GPU worker, also
    # under FACEDIFFUSER_CPU_UNDER_GPU=1, and DDP would then ask for a CUDA device that is not there
    step_fn = TrainStep(
        ray.train.torch.prepare_model(run.model, move_to_device=device), run.optimizer, run.optim, device
    )
    shard = ray.train.get_dataset_shard("train")
    # On a GPU the next batch is built on Ray Data's prefetch thread while the step runs on the device. On CPU
    # workers that thread would only compete with the step for the GIL and the cores: build it inline instead.
    prefetch = 1 if device.type == "cuda" else 0
    # batches go to this worker's device (Ray's "auto" would send them to cuda:0 on a GPU worker without CUDA)
    report_progress(step=run.step, total=config.max_steps, resumed_from=run.step if run.resumed else None)
    run.placement = placement
    last = time.perf_counter()
    while run.step < config.max_steps:  # one pass holds many epochs (build_dataset); a long run takes several passes
        for batch in shard.iter_torch_batches(
            batch_size=config.batch_size, drop_last=True, collate_fn=collate, prefetch_batches=prefetch, device=device
        ):
            injected_fault(run.step + 1, rank, world, config.name)
            metrics = step_fn(batch)
            run.step += 1
            now = time.perf_counter()
            record_step(config, run, metrics, now - last, world, report_progress)
            if run.step % config.checkpoint_every == 0 or run.step == config.max_steps:
                report(config, run, rank)
                now = time.perf_counter()  # checkpoint time is not step time
            last = now
            if run.step >= config.max_steps:
                break
