"""One Ray Train worker of a run (`train_loop_per_worker`, started by `fit_one` in pipelines/train.py).

start from the last checkpoint or the base → pull batches with `get_dataset_shard("train").iter_torch_batches`,
whose collate function decodes and augments them (facediffuser.training.ingest; on a GPU worker on Ray Data's
prefetch thread, overlapping the step) → DDP step (facediffuser.training.step) → every `checkpoint_every` steps
all ranks report, rank 0 with a checkpoint: model directory + optimizer state (safetensors) + metrics.csv.

At each checkpoint the ranks all-gather a checksum of their trainable parameters; its spread (0 when DDP kept them
identical) goes into the metrics and the checkpoint. Test-only fault injection: the `train.step` point of
facediffuser/faults.py (`FACEDIFFUSER_FAULTS`, forwarded by the driver to the workers), never the config.
Progress: rank 0 writes its step and loss to a `ProgressBoard` actor, and the driver draws them (`show_progress`).
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
from facediffuser.training.metrics import METRIC_COLUMNS, read_metrics, write_metrics
from pipelines.progress_metrics import train_metrics
from pipelines.train_config import TrainConfig


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


class ProgressBoard:
    """A tiny actor (0 CPUs) that rank 0 of each run writes its step and loss to; the driver draws the bars."""

    def __init__(self):
        self.state: dict[str, dict] = {}

    def update(self, model: str, **fields) -> None:
        self.state.setdefault(model, {}).update(fields)

    def read(self) -> dict[str, dict]:
        return self.state


def show_progress(board, configs: list[TrainConfig], futures: list) -> None:
    """The driver's side of the board: one bar per model, fed by rank 0 of each run, until every run has finished."""
    import concurrent.futures

    import ray
    from tqdm.auto import tqdm

    bars = {
        c.model: tqdm(total=c.max_steps, desc=f"train {c.model}", position=i, mininterval=1.0, dynamic_ncols=True)
        for i, c in enumerate(configs)
    }
    said = set()
    try:
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
    finally:  # also when stopped (SIGTERM/SIGINT): the bars end before the command's last line
        for bar in bars.values():
            bar.close()


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
    exported: dict | None,
) -> None:
    """One step's metrics: into the run's history, to the progress board and to Prometheus (rank 0)."""
    metrics.update(
        step=run.step,
        attempt=run.attempt,
        seconds=seconds,
        samples_per_s=config.batch_size * world / max(seconds, 1e-9),
    )
    run.history.append({k: metrics[k] for k in METRIC_COLUMNS})
    report_progress(step=run.step, loss=metrics["loss"])
    if exported is not None:
        exported["steps"].inc(tags={"model": config.model})
        exported["loss"].set(metrics["loss"], tags={"model": config.model})


def train_loop_per_worker(config_dict: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from facediffuser.training.step import TrainStep

    progress = config_dict.pop("progress", None)  # the driver's ProgressBoard actor (rank 0 reports to it)
    config = TrainConfig(**config_dict)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    report_progress = (
        (lambda **fields: progress.update.remote(config.model, **fields))
        if progress and rank == 0
        else (lambda **fields: None)
    )
    exported = train_metrics() if rank == 0 else None  # Prometheus, through Ray (pipelines/progress_metrics.py)
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
            record_step(config, run, metrics, now - last, world, report_progress, exported)
            if run.step % config.checkpoint_every == 0 or run.step == config.max_steps:
                report(config, run, rank)
                now = time.perf_counter()  # checkpoint time is not step time
            last = now
            if run.step >= config.max_steps:
                break


def report(config: TrainConfig, run: WorkerRun, rank: int) -> None:
    """All ranks report; rank 0 attaches the checkpoint, written to a temp dir first (Ray uploads it whole)."""
    import ray.train

    from facediffuser.training import checkpoint as ckpt

    spread = rank_spread(param_checksum(run.model))
    latest = run.history[-1]
    metrics = {
        "step": run.step,
        "attempt": run.attempt,
        "loss": latest["loss"],
        "loss_den": latest["loss_den"],
        "loss_loc": latest["loss_loc"],
        "param_rank_spread": spread,
        **run.placement,
    }
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    model = run.model
    with tempfile.TemporaryDirectory(prefix=f"facediffuser-{config.model}-ckpt-") as tmp:
        ckpt.save_model_dir(
            Path(tmp) / ckpt.MODEL_SUBDIR,
            config.model,
            unet=model.unet,
            vae=model.vae,
            text_encoder=model.text_encoder,
            tokenizer=run.parts["tokenizer"],
            scheduler=run.parts["scheduler"],
            subject_encoder=model.subject_encoder,
        )
        ckpt.save_training_state(
            Path(tmp) / ckpt.STATE_FILE,
            run.optimizer,
            run.step,
            {"attempt": run.attempt, "model": config.model, "param_rank_spread": spread},
        )
        write_metrics(run.history, Path(tmp) / "metrics.csv")
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"checkpoint_{run.step:08d}",
        )


def worker_placement() -> dict:
    """{"worker_nodes": the Ray node id of every rank, in rank order, comma-separated; "ddp_backend": the
    torch.distributed backend} — gathered from all ranks, so rank 0's report says where the run went."""
    import torch.distributed as dist

    from cluster.runtime import node_id

    here = node_id()
    if not (dist.is_available() and dist.is_initialized()):
        return {"worker_nodes": here, "ddp_backend": "none"}
    nodes = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, here)
    return {"worker_nodes": ",".join(nodes), "ddp_backend": str(dist.get_backend())}


def param_checksum(model) -> float:
    import torch

    with torch.no_grad():
        return float(sum(p.detach().double().sum() for p in model.trainable_parameters()))


def rank_spread(value: float) -> float:
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
