"""Dropping rows of a batch between denoising iterations (`snf_denoise`'s `keep_rows`, for cancelled requests).

Everything the loop carries per row is cut to the kept rows: the scheduler's per-sample history, per-row generators,
layout regions, the fusion masks kept so far and the latents and embeddings. Shared state (sigmas, timesteps,
counters) is never touched.
"""

from __future__ import annotations

from typing import Sequence

import torch

# Scheduler attributes that hold one entry per sample (diffusers 0.42): PNDM `ets`/`cur_sample`/`cur_model_output`,
# DPM-Solver and UniPC `model_outputs` (UniPC also `last_sample`), Heun/KDPM2 `sample`/`prev_derivative`. Sigmas,
# timesteps and counters are shared by all rows and are never touched.
PER_SAMPLE_SCHEDULER_STATE = (
    "ets",
    "cur_sample",
    "cur_model_output",
    "model_outputs",
    "last_sample",
    "sample",
    "prev_derivative",
)


def kept_positions(answer: Sequence[int] | None, batch: int) -> list[int] | None:
    """keep_rows' answer → sorted positions to keep, or None when every row stays (nothing to do)."""
    if answer is None:
        return None
    kept = sorted(int(k) for k in answer)
    if len(set(kept)) != len(kept) or any(not 0 <= k < batch for k in kept):
        raise ValueError(f"keep_rows must name distinct rows of the current batch of {batch}, got {list(answer)}")
    return None if len(kept) == batch else kept


def _take(value, index: torch.Tensor, batch: int):
    """One scheduler state value (tensor, list of tensors, None, 0) with only the rows at `index`. A tensor of
    another length is left alone: PNDM keeps `cur_sample` from an earlier call and overwrites it before use."""
    if isinstance(value, (list, tuple)):
        return type(value)(_take(v, index, batch) for v in value)
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return value.index_select(0, index.to(value.device))
    return value


def prune_scheduler(scheduler, index: torch.Tensor, batch: int) -> None:
    """Slice the scheduler's per-sample history to the kept rows; refuse state we do not know how to slice, since
    leaving it whole would silently mix rows (or fail on a shape) in the next multistep update."""
    state = vars(scheduler)  # not getattr: ConfigMixin's __getattr__ would answer for config keys
    for name in PER_SAMPLE_SCHEDULER_STATE:
        if name in state:
            state[name] = _take(state[name], index, batch)
    for name, value in state.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        if name not in PER_SAMPLE_SCHEDULER_STATE and any(
            isinstance(v, torch.Tensor) and v.ndim >= 2 and v.shape[0] == batch for v in values
        ):
            raise ValueError(f"cannot drop rows: {type(scheduler).__name__}.{name} looks per-sample and is not known")


def drop_rows(kept, scheduler, regions, generator, masks, *tensors):
    """Keep only the rows at positions `kept` of everything the loop carries per row → (generator, tensors).

    `regions` (installed in the SDM's attention) and the scheduler are changed in place; so are the masks kept so
    far, so that every mask has the same rows as the returned latents. None tensors stay None."""
    batch = tensors[0].shape[0]
    index = torch.tensor(kept, dtype=torch.long)
    prune_scheduler(scheduler, index, batch)
    if regions is not None:
        regions.keep_samples(kept)
    if masks is not None:
        masks[:] = [m.index_select(0, index.to(m.device)) for m in masks]
    if isinstance(generator, list):  # per-row generators: the kept rows go on drawing their own noise
        generator = [generator[k] for k in kept]
    sliced = tuple(None if x is None else x.index_select(0, index.to(x.device)) for x in tensors)
    return generator, sliced
