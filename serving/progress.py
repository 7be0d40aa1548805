"""What the sampler's denoising thread tells the world about a batch: which rows stay (a cancelled request's rows
leave at the next step), and, for jobs, each step with its stage and a cheap preview every few steps.

Events go to the JobStore from the replica's event loop, in order, and never block the denoising thread.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections import deque
from dataclasses import dataclass, field

import torch

from facediffuser.images import png_bytes
from facediffuser.preview import mask_image, preview_images
from facediffuser.sampling import stage_of

log = logging.getLogger("ray.serve")


@dataclass
class Progress:
    """Counters of a sampler replica (GET /v1/stats): requests answered, requests cancelled while queued or
    running, image-steps denoised (one image through one iteration: a cancelled request's stop growing at its next
    step), and the last few batches (requests, images, image-steps, cancelled requests)."""

    served: int = 0
    cancelled: int = 0
    image_steps: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=16))

    def batch_done(self, requests: int, images: int, image_steps: int, cancelled: int) -> None:
        self.served += requests - cancelled
        self.recent.append({"requests": requests, "images": images, "image_steps": image_steps, "cancelled": cancelled})


def _b64_png(image) -> str:
    return base64.b64encode(png_bytes(image)).decode()


class JobReporter:
    """One batch's rows and jobs, for `snf_denoise(keep_rows=..., on_step=...)`.

    `group` are the sampler's jobs in batch order (each with request["num_images"] rows); `store` is the JobStore
    handle (None: nothing is reported), `loop` the replica's event loop, `every` the preview period in steps,
    `progress` the replica's counters.
    """

    def __init__(self, store, loop: asyncio.AbstractEventLoop, group: list, every: int, progress: Progress):
        self.store, self.loop, self.every, self.progress = store, loop, every, progress
        self.owner = [job for job in group for _ in range(job.request["num_images"])]  # original row → its job
        self.alive = list(range(len(self.owner)))  # original rows still in the batch, in batch order
        self.boundaries = (0, 0)
        self.mask_sum: torch.Tensor | None = None  # per row: sum of the fusion masks so far
        self.mask_steps = 0
        self.image_steps = 0
        self.lock = asyncio.Lock()  # FIFO: events reach the store in the order they happened

    def started(self, boundaries: tuple[int, int]) -> None:
        self.boundaries = boundaries
        self._send([(job.job_id, "started", {}) for job in self._jobs()])

    def keep_rows(self, i: int) -> list[int] | None:
        """Before iteration i: the positions of the rows whose request is still wanted (None: all of them)."""
        kept = [p for p, row in enumerate(self.alive) if not self.owner[row].cancelled]
        if len(kept) == len(self.alive):
            return None
        self.alive = [self.alive[p] for p in kept]
        if self.mask_sum is not None:
            self.mask_sum = self.mask_sum[kept]
        return kept

    def on_step(self, i: int, steps: int, latents: torch.Tensor, mask: torch.Tensor | None) -> None:
        self.image_steps += latents.shape[0]
        self.progress.image_steps += latents.shape[0]  # live: a test sees a cancelled request's count stop
        if mask is not None:
            mask = mask[:, 0].float().cpu()
            self.mask_sum = mask if self.mask_sum is None else self.mask_sum + mask
            self.mask_steps += 1
        jobs = self._jobs()
        if not jobs:
            return
        stage = stage_of(i, *self.boundaries)
        events = [(job.job_id, "step", {"step": i + 1, "steps": steps, "stage": stage}) for job in jobs]
        if self.every and (i + 1) % self.every == 0 and i + 1 < steps:  # the last step's picture is the result
            events += self._previews(i + 1, latents, jobs)
        self._send(events)

    def _previews(self, step: int, latents: torch.Tensor, jobs: list) -> list[tuple[str, str, dict]]:
        pictures = preview_images(latents)
        fusion = None if self.mask_sum is None else self.mask_sum / self.mask_steps
        events = []
        for job in jobs:
            positions = [p for p, row in enumerate(self.alive) if self.owner[row] is job]
            data = {
                "step": step,
                "images": [_b64_png(pictures[p]) for p in positions],
                # the job's images' masks one under the other, like /v1/generate's fusion_masks grid
                "fusion_mask": None if fusion is None else _b64_png(mask_image(torch.cat(list(fusion[positions])))),
            }
            events.append((job.job_id, "preview", data))
        return events

    def _jobs(self) -> list:
        """Jobs (with an id) that still have rows in the batch, in batch order."""
        seen: list = []
        for row in self.alive:
            job = self.owner[row]
            if job.job_id is not None and not job.cancelled and job not in seen:
                seen.append(job)
        return seen

    def _send(self, events: list) -> None:
        if events and self.store is not None:
            asyncio.run_coroutine_threadsafe(self._post(events), self.loop)

    async def _post(self, events: list) -> None:
        async with self.lock:
            try:
                await self.store.record_many.remote(events)
            except Exception as exc:  # progress is best effort: the job's result is recorded by its ingress
                log.warning("job progress not recorded: %s: %s", type(exc).__name__, exc)
