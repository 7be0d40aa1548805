"""Loading the models a deployment replica needs, on the device it has."""

from __future__ import annotations

import torch

from facediffuser.devices import torch_device
from facediffuser.model_loading import identity as model_identity
from facediffuser.model_loading import load_pipeline


def replica_device() -> str:
    """The GPU when Ray gave this replica one, else the CPU. Given a GPU that torch cannot see, the replica fails
    with one line naming its node (FACEDIFFUSER_CPU_UNDER_GPU=1: CPU kernels, rehearsals only; devices.py)."""
    from cluster.runtime import assigned_gpus, where

    return torch_device(assigned_gpus(), f"serve replica on {where()}")


def load_models(config, drop: tuple[str, ...]):
    """(pipeline, model info) for a ServeConfig: the pipeline without the components this deployment never uses
    (`drop`), on the replica's device; model info = {"model", "hashes", "model_version"} of what was loaded."""
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    pipe = load_pipeline(config.model, config.tiny, torch_dtype=getattr(torch, config.dtype))
    model_info = model_identity(pipe, config.model)  # taken before any part is dropped
    for name in drop:
        setattr(pipe, name, None)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(replica_device()), model_info
