"""The Sampler deployment: both UNets, the VAE and the scheduler; one snf_denoise call per group of compatible
requests (same steps, size, scheduler, guidance and stage boundaries; boxed only with boxed), each from latents
drawn from its own seeds, so a batched request gets the same images it would get alone."""

from __future__ import annotations

import asyncio
import logging
import time

import torch
from ray import serve

from facediffuser import faults
from facediffuser.images import png_bytes, tensor_to_pil
from facediffuser.manifest import package_versions, sampling_record
from facediffuser.model_dir import version_mismatch
from facediffuser.noise import seeded_latents
from facediffuser.sampling import boundaries_from_fractions, snf_denoise
from facediffuser.schedulers import make_scheduler, scheduler_name
from serving.api import internal_error
from serving.batch_jobs import BatchJob, add_mask_pictures, group_regions, stacked_embeddings
from serving.coalescer import Coalescer, histogram, no_concurrent_batches_warning
from serving.metrics import sampler_metrics
from serving.models import load_models
from serving.progress import JobReporter, Progress
from serving.settings import ServeConfig

MAX_CONSECUTIVE_FAILURES = 3


@serve.deployment(name="Sampler")
class SamplerDeployment:
    """Both UNets, the VAE and the scheduler config; one snf_denoise call per group of compatible requests."""

    def __init__(self, config: dict, store=None):
        cfg = ServeConfig.from_dict(config)
        self.store, self.preview_every = store, cfg.preview_every
        self.progress = Progress()
        self.metrics = sampler_metrics()
        self.pipe, self.model_info = load_models(cfg, drop=())
        self.pipe.text_encoder = self.pipe.subject_encoder = None  # the encoder deployment owns those
        self.versions = package_versions()
        self.consecutive_failures = 0
        self.default_size = self.pipe.sdm_unet.config.sample_size * self.pipe.vae_scale_factor
        logging.getLogger("ray.serve").addFilter(no_concurrent_batches_warning)
        # One snf_denoise call at a time; each takes up to max_batch_size waiting requests that share a key.
        self.coalescer = Coalescer(
            self._run_group, limit=cfg.max_batch_size, key=lambda job: job.key, dropped=lambda job: job.cancelled
        )
        self.configure_batching(cfg.max_batch_size, cfg.batch_wait_timeout_s)
        self.batches_served = 0

    def arm_fault(self, point: str, value: str = "RuntimeError") -> None:
        """TESTS ONLY (tests/test_serve.py): arm a fault point in this replica (facediffuser/faults.py; here
        `serve.sampler`, whose next snf_denoise call then raises once). Reachable only through a Ray deployment
        handle, not over HTTP or config."""
        faults.arm(point, value)

    def ready(self) -> dict:
        return {**self.model_info, "default_size": self.default_size, "batches_served": self.batches_served}

    def stats(self) -> dict:
        """Batches this replica formed so far: `formed_batches` maps requests per snf_denoise call → calls."""
        formed = self.coalescer.sizes
        calls = sum(formed.values())
        taken = sum(size * count for size, count in formed.items())
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "batches_served": self.batches_served,
            "requests_served": self.progress.served,
            "formed_batches": histogram(formed),
            "mean_batch_requests": round(taken / calls, 3) if calls else None,
            "max_batch_size": self.max_batch_size,
            "batch_wait_timeout_s": self.batch_wait_timeout_s,
            "consecutive_failures": self.consecutive_failures,
            "queued": len(self.coalescer.waiting),
            "cancelled_requests": self.progress.cancelled,
            "denoised_image_steps": self.progress.image_steps,
            "recent_batches": list(self.progress.recent),
        }

    def configure_batching(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        """Change batching on a running replica (the benchmark compares on/off on the same warm replica)."""
        self.max_batch_size, self.batch_wait_timeout_s = max_batch_size, batch_wait_timeout_s
        self.coalescer.limit = max_batch_size
        self.generate.set_max_batch_size(max_batch_size)
        self.generate.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def check_health(self) -> None:
        """Unhealthy (Serve replaces the replica) when models are missing or sampling keeps failing."""
        if self.pipe.sdm_unet is None or self.pipe.tdm_unet is None or self.pipe.vae is None:
            raise RuntimeError("sampler models not loaded")
        if self.consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
            raise RuntimeError(f"{self.consecutive_failures} batches in a row failed")

    def _plan(self, job: BatchJob) -> None:
        r = job.request
        scheduler = make_scheduler(r["scheduler"], self.pipe.scheduler.config)
        scheduler.set_timesteps(r["steps"])
        job.iterations = len(scheduler.timesteps)
        job.boundaries = boundaries_from_fractions(r["alpha"], r["beta"], job.iterations)
        size = (r["height"] or self.default_size, r["width"] or self.default_size)
        # boxed requests run the SDM's attention with a bias: they batch only with other boxed ones
        job.key = (r["scheduler"], r["steps"], size, float(r["guidance_scale"]), job.boundaries, r["boxes"] is not None)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.05, max_concurrent_batches=1024)
    async def generate(self, jobs: list[BatchJob]) -> list[dict]:
        """Requests that arrived within batch_wait_timeout_s of each other; the coalescer runs them (see Coalescer)."""
        return await self.coalescer(jobs)

    async def _run_group(self, group: list[BatchJob]) -> list[dict]:
        reporter = JobReporter(self.store, asyncio.get_running_loop(), group, self.preview_every, self.progress)
        self.metrics["queue"].set(len(self.coalescer.waiting))
        self.metrics["batch"].observe(len(group))
        started = time.perf_counter()
        try:
            outputs = await asyncio.to_thread(self._denoise_group, group, reporter)
            self.consecutive_failures = 0
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            outputs = [
                {"error": (503, "unavailable", "out of GPU memory; retry shortly or ask for fewer/smaller images")}
            ] * len(group)
        except Exception as exc:  # a fault on our side, ValueError included (requests were checked before): answer
            self.consecutive_failures += 1  # 500 for this batch only, details in the log; health decides the rest
            outputs = [{"error": internal_error("sampling", exc).as_tuple()}] * len(group)
        self.batches_served += 1
        self.metrics["denoise"].observe(time.perf_counter() - started)
        if reporter.image_steps:  # Ray's counters take positive increments only
            self.metrics["image_steps"].inc(reporter.image_steps)
        self.metrics["queue"].set(len(self.coalescer.waiting))
        return outputs

    async def submit(self, request: dict, embeds: dict, job_id: str | None = None) -> dict:
        mismatch = version_mismatch({"encoder": embeds, "sampler": self.model_info})
        # the embeddings come from another model than these UNets (checked per request, not only in /healthz)
        if mismatch:
            return {"error": (503, "model_mismatch", mismatch)}
        job = BatchJob(request=request, embeds=embeds, arrived=time.perf_counter(), job_id=job_id)
        try:
            self._plan(job)
        except ValueError as exc:
            return {"error": (422, "invalid_request", str(exc))}
        try:
            return await self.generate(job)
        except asyncio.CancelledError:  # Serve cancels us when our caller went away (client gone, job cancelled)
            job.cancelled = True
            self.progress.cancelled += 1
            self.metrics["cancelled"].inc()
            raise

    @torch.no_grad()
    def _denoise_group(self, group: list[BatchJob], reporter: "JobReporter") -> list[dict | None]:
        """One snf_denoise call and one VAE decode for the group → each job's output (see _job_output); None for a
        job cancelled on the way (its rows left the batch at the step after it was cancelled)."""
        faults.fire("serve.sampler", once=True)  # tests only: off unless armed (arm_fault)
        pipe = self.pipe
        scheduler_kind, steps, (height, width), guidance, (start_merge_step, final_step), boxed = group[0].key
        scheduler = make_scheduler(scheduler_kind, pipe.scheduler.config)  # fresh: solvers keep per-call state
        dtype, device = pipe.sdm_unet.dtype, pipe.sdm_unet.device
        shape = (4, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        # Each image's noise comes from its own seed, as in the pipeline; its generator then feeds any stochastic
        # scheduler: an image does not depend on who else is in the batch.
        latents, generators = seeded_latents(shape, [seed for job in group for seed in job.seeds])
        latents = (latents * scheduler.init_noise_sigma).to(device, dtype)
        want_masks = any(job.request["return_masks"] for job in group)
        denoise_started = time.perf_counter()
        reporter.started((start_merge_step, final_step))
        result = snf_denoise(
            pipe.tdm_unet,
            pipe.sdm_unet,
            scheduler,
            latents,
            *stacked_embeddings(group, ("null", "text", "augmented"), device, dtype),
            num_inference_steps=steps,
            guidance_scale=guidance,
            start_merge_step=start_merge_step,
            final_step=final_step,
            return_masks=want_masks,
            generator=generators,
            regions=group_regions(group, shape[1:]) if boxed else None,
            keep_rows=reporter.keep_rows,
            on_step=reporter.on_step,
        )
        decode_started = time.perf_counter()
        images = tensor_to_pil(pipe.decode_latents(result.latents)) if result.rows else []
        masks = torch.stack(result.masks)[:, :, 0].float().cpu() if want_masks and result.masks else None
        batch = {
            "batch_size": len(images),
            "batch_requests": len(group),
            "denoise_started": denoise_started,
            "denoise_s": decode_started - denoise_started,
            "decode_s": time.perf_counter() - decode_started,
            "scheduler": scheduler_name(scheduler),
            "fusion_steps": result.fusion_steps,
        }
        outputs = self._outputs(group, result.rows, images, masks, batch, shape[1:])
        self.progress.batch_done(len(group), len(latents), reporter.image_steps, outputs.count(None))
        return outputs

    def _outputs(self, group: list[BatchJob], rows_kept: list[int], images: list, masks, batch: dict, latent_size):
        """The batch's images and masks → each job's output; None for a job cancelled, or whose rows left the
        batch (`rows_kept`: the original rows the result still holds, in its order)."""
        position = {row: k for k, row in enumerate(rows_kept)}  # original row → row of the result
        outputs, offset = [], 0
        for job in group:
            rows = list(range(offset, offset + job.request["num_images"]))
            offset += len(rows)
            if job.cancelled or any(row not in position for row in rows):
                outputs.append(None)  # nobody waits for it any more
                continue
            kept = [position[row] for row in rows]
            job_masks = masks[:, kept] if masks is not None else None
            outputs.append(self._job_output(job, [images[k] for k in kept], job_masks, batch, latent_size))
        return outputs

    def _job_output(self, job: BatchJob, images: list, masks: torch.Tensor | None, batch: dict, latent_size) -> dict:
        """One request's answer: PNG images, seeds, batch and timing facts, the manifest, and mask pictures when
        it asked for them."""
        request = job.request
        height, width = job.key[2]
        output = {
            "images": [png_bytes(image) for image in images],
            "seeds": job.seeds,
            "batch_size": batch["batch_size"],
            "batch_requests": batch["batch_requests"],
            "timings": {
                "queue_s": batch["denoise_started"] - job.arrived,
                "denoise_s": batch["denoise_s"],
                "decode_s": batch["decode_s"],
            },
            # how it was sampled, with the model and versions; the ingress adds the request's side
            "manifest": {
                **sampling_record(
                    scheduler=batch["scheduler"],
                    steps=request["steps"],
                    iterations=job.iterations,
                    guidance_scale=job.key[3],
                    size=(width, height),
                    boxes=request["boxes"],
                    subject_scales=request["subject_scales"],
                    boundaries=job.boundaries,
                    alpha=request["alpha"],
                    beta=request["beta"],
                    fusion_steps=batch["fusion_steps"],
                ),
                **self.model_info,
                "versions": self.versions,
            },
        }
        if request["return_masks"]:
            add_mask_pictures(output, job, images, masks, latent_size)
        return output
