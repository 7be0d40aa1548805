"""The Sampler's requests inside a batch (`BatchJob`: its plan, seeds, cancellation) and what a group of them
shares in one snf_denoise call: the stacked embeddings, the layout regions; afterwards each job's mask pictures.
No Ray here."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from facediffuser.images import png_bytes
from facediffuser.layout import SubjectRegions
from facediffuser.visualize import mask_pictures


@dataclass
class BatchJob:
    """One request inside a batch; `key` groups requests that can share one snf_denoise call."""

    request: dict
    embeds: dict
    arrived: float
    key: tuple = ()
    iterations: int = 0
    boundaries: tuple[int, int] = (0, 0)
    job_id: str | None = None  # an asynchronous job (POST /v1/jobs): its steps and previews go to the JobStore
    cancelled: bool = False  # its caller went away: it leaves the queue, or its rows leave the batch at the next step

    @property
    def seeds(self) -> list[int]:
        """Image k of a request always uses seed + k."""
        return [self.request["seed"] + k for k in range(self.request["num_images"])]


def stacked_embeddings(group: list[BatchJob], names: tuple[str, ...], device, dtype) -> list[torch.Tensor]:
    """Each of the embeddings `names`, every job's repeated per image, stacked into the batch."""
    return [
        torch.cat([job.embeds[name].repeat(job.request["num_images"], 1, 1) for job in group]).to(device, dtype)
        for name in names
    ]


def group_regions(group: list[BatchJob], latent_size) -> SubjectRegions:
    """Each image of a boxed batch: its request's subject tokens and boxes."""
    per_image = [job for job in group for _ in range(job.request["num_images"])]
    return SubjectRegions(
        tokens=[job.embeds["subject_tokens"] for job in per_image],
        boxes=[[tuple(b) for b in job.request["boxes"]] for job in per_image],
        latent_size=tuple(latent_size),
    )


def add_mask_pictures(output: dict, job: BatchJob, images: list, masks: torch.Tensor | None, latent_size) -> None:
    """Adds the job's fusion mask grid and, when fusion ran, each image's overlay (PNG bytes) to `output`."""
    job_masks = masks if masks is not None else torch.zeros(0, len(images), *latent_size)
    grid, overlays = mask_pictures(images, job_masks, boxes=job.request["boxes"])
    output["fusion_masks"] = png_bytes(grid)
    if overlays:
        output["overlays"] = [png_bytes(overlay) for overlay in overlays]
