"""What the Ray Train workers report at each checkpoint: all ranks their step, losses, the spread of their
parameter checksums (0 when DDP kept them identical) and where the run went; rank 0 also the checkpoint (model
directory, optimizer state, metrics.csv)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from facediffuser.training.metrics import write_metrics
from pipelines.train_config import TrainConfig


def report(config: TrainConfig, run, rank: int) -> None:
    """All ranks report `run` (a pipelines.train_worker.WorkerRun); rank 0 attaches the checkpoint, written to a
    temp dir first (Ray uploads it whole)."""
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
