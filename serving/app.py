"""Ray Serve app: HTTP ingress → subject encoder → SNF sampler (both UNets and the VAE on one replica).

    facediffuser serve --tiny --port 8000          # local Ray, blocks until Ctrl-C
    serve deploy serving/config/serve.yaml         # the same app on a running cluster (import path: app_builder)

The sampler calls `facediffuser.sampling.snf_denoise` once per batch: compatible requests (same steps, size,
scheduler, guidance and stage boundaries) that arrive together are denoised in one call, each from latents drawn
from its own seeds, so a batched request gets the same images it would get alone.
"""

# No `from __future__ import annotations`: FastAPI must see real types in the ingress signatures.

import argparse
import asyncio
import base64
import hashlib
import hmac
import io
import ipaddress
import logging
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError

from facediffuser.model_dir import identity as model_identity, load_pipeline, version_mismatch
from facediffuser.images import tensor_to_pil
from facediffuser.manifest import package_versions
from facediffuser.prompts import strip_markers
from facediffuser.sampling import boundaries_from_fractions, snf_denoise
from facediffuser.schedulers import SCHEDULERS, make_scheduler, scheduler_name
from facediffuser.layout import SubjectRegions
from facediffuser.visualize import mask_grid, mask_overlay

from serving.api import (
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    Limits,
    RequestError,
    check_request,
    internal_error,
    log,
    validation_message,
)

TOKEN_ENV = "FACEDIFFUSER_API_TOKEN"
STATIC_PAGE = Path(__file__).parent / "static" / "index.html"
RETRY_AFTER_S = 2
MAX_CONSECUTIVE_FAILURES = 3
# Copies of a request body the ingress holds while the request is in flight: the raw body, the parsed JSON, the
# validated model's strings, the decoded photos (3/4). Used to size its queue (ingress_capacity, docs/serving.md).
PAYLOAD_COPIES = 4
# Paths served without a token (probes, the page, the API docs); every other path needs it when one is set.
PUBLIC_PATHS = frozenset({"/", "/healthz", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"})


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def refuse_anonymous(host: str, api_token: str | None, allow_anonymous: bool) -> None:
    """ValueError (one line, naming the way out) for an unauthenticated API on an address others can reach."""
    if api_token or allow_anonymous or is_loopback(host):
        return
    raise ValueError(
        f"refusing to serve on {host} without a bearer token: set ${TOKEN_ENV}, or pass --allow-anonymous "
        "(config key allow_anonymous: true) to serve it unauthenticated"
    )


def auth_mode(config: "ServeConfig", host: str | None = None) -> str:
    """One line saying who may call the API (printed by `facediffuser serve`, logged by the ingress)."""
    host = host or config.host
    if config.api_token:
        return "authentication: bearer token required on /v1/*"
    if is_loopback(host):
        return f"authentication: off (no ${TOKEN_ENV}); listening on {host}, reachable from this machine only"
    return (f"authentication: OFF on {host} (allow_anonymous): anyone who can reach this address can use the API "
            f"and its GPUs; set ${TOKEN_ENV} to require a token")


@dataclass
class ServeConfig:
    """Everything the app needs; built from CLI flags (`run`) or the YAML's `args` (`app_builder`)."""

    model: str | None = None
    tiny: bool = False
    # Where Serve's HTTP proxies listen: `facediffuser serve` starts them there; for `serve deploy` keep it equal to
    # http_options.host (app_builder also checks the running proxies' address).
    host: str = "127.0.0.1"
    port: int = 8000
    app_name: str = "facediffuser"
    route_prefix: str = "/"
    api_token: str | None = None  # default: $FACEDIFFUSER_API_TOKEN
    allow_anonymous: bool = False  # serve without a token on a non-loopback host (refused otherwise)
    dtype: str = "float32"
    face_detector: str | None = "mediapipe"  # None: no detection, whole photo padded square
    cache_size: int = 256
    # resources and scaling (sampler = both UNets + VAE; encoder = text + CLIP vision)
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    encoder_num_gpus: float = 0.0
    encoder_num_cpus: float = 0.5
    ingress_num_cpus: float = 0.1
    torch_threads: int = 0  # 0: torch's default
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 4.0
    max_ongoing_requests: int = 8
    max_queued_requests: int = 32
    max_batch_size: int = 4  # requests per snf_denoise call; 1 turns batching off
    batch_wait_timeout_s: float = 0.05
    health_check_period_s: float = 10.0
    # Memory request bodies may take on the ingress's node; bounds the ingress's ongoing and queued requests
    # (ingress_capacity; arithmetic in docs/serving.md).
    ingress_memory_mb: int = 4096
    limits: dict = field(default_factory=dict)  # Limits fields

    def __post_init__(self):
        if self.api_token is None:
            self.api_token = os.environ.get(TOKEN_ENV) or None
        refuse_anonymous(self.host, self.api_token, self.allow_anonymous)
        if not self.tiny and not self.model:
            raise ValueError("give a model directory (--model DIR) or --tiny")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 1 <= min_replicas <= max_replicas, got {self.min_replicas}, {self.max_replicas}")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError("max_ongoing_requests must be >= max_batch_size (a batch needs that many in flight)")
        Limits(**self.limits)  # unknown keys and bad values fail here, before any deployment starts
        ingress_capacity(self)  # the ingress memory must hold at least one request and one queued

    @classmethod
    def from_dict(cls, values: dict) -> "ServeConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown serve config keys: {', '.join(unknown)}")
        return cls(**values)


def ingress_capacity(config: ServeConfig) -> tuple[int, int]:
    """(max_ongoing_requests, max_queued_requests) of the ingress: as many as the encoder and sampler can hold
    (4 x theirs x max_replicas), but no more than fit `ingress_memory_mb`: an ongoing request holds about
    PAYLOAD_COPIES x max_payload_bytes in the ingress replica, a queued one its body (1x) in Serve's HTTP proxy."""
    payload = Limits(**config.limits).max_payload_bytes
    memory = config.ingress_memory_mb * 2**20
    if memory < (PAYLOAD_COPIES + 1) * payload:
        raise ValueError(f"ingress_memory_mb={config.ingress_memory_mb} cannot hold one request and one queued: "
                         f"needs {PAYLOAD_COPIES + 1} x max_payload_bytes = {(PAYLOAD_COPIES + 1) * payload / 2**20:.0f} MiB")
    ongoing = min(4 * config.max_ongoing_requests * config.max_replicas, (memory - payload) // (PAYLOAD_COPIES * payload))
    left = (memory - ongoing * PAYLOAD_COPIES * payload) // payload
    wanted = left if config.max_queued_requests < 0 else 4 * config.max_queued_requests * config.max_replicas
    return ongoing, max(1, min(wanted, left))


def _running_http_host() -> str | None:
    """The address the running Serve's HTTP proxies listen on, when this process is in a Ray session that has a
    Serve controller (best effort: None otherwise). Never starts Ray."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
        return client.http_config.host if client is not None else None
    except Exception:
        return None


def _load(config: ServeConfig, drop: tuple[str, ...]):
    """The pipeline without the components this deployment never uses (`drop`), on the GPU when it has one."""
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    pipe = load_pipeline(config.model, config.tiny, torch_dtype=getattr(torch, config.dtype))
    loaded = model_identity(pipe, config.model)  # model, hashes, model_version: taken before any part is dropped
    for name in drop:
        setattr(pipe, name, None)
    device = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() else "cpu"
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), loaded


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- batching
class _Coalescer:
    """One `run(items) -> outputs` call at a time; each call takes up to `limit` of the items waiting by then.

    Why: `@serve.batch` forms the next batch while one runs and keeps it until that one is done (Ray forms
    batches before taking its max_concurrent_batches semaphore). Requests that arrive during a long call thus sit
    in many small batches, each waiting its turn: under load the formed batches stayed near 1 request. So the
    batch handlers here only hand their requests over (their `max_concurrent_batches` is high on purpose), and
    whenever the work is free, the next call takes what is waiting: oldest first and, with `key`, those that share
    the oldest's key. One handler at a time holds `lock` (FIFO) and runs calls until its own items are done.
    """

    def __init__(self, run, limit: int, key=None):
        self.run, self.limit, self.key = run, limit, key
        self.waiting: list[tuple[object, asyncio.Future]] = []
        self.lock: asyncio.Lock | None = None  # made on first use, on the replica's event loop
        self.sizes: Counter = Counter()  # items per run call → calls

    async def __call__(self, items: list) -> list:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        self.waiting.extend(zip(items, futures))
        if self.lock is None:
            self.lock = asyncio.Lock()
        async with self.lock:
            while not all(future.done() for future in futures):
                await self._run_next()
        return [future.result() for future in futures]

    def _take(self) -> list[tuple[object, asyncio.Future]]:
        key = self.key(self.waiting[0][0]) if self.key else None
        taken, kept = [], []
        for entry in self.waiting:
            fits = len(taken) < self.limit and (self.key is None or self.key(entry[0]) == key)
            (taken if fits else kept).append(entry)
        self.waiting = kept
        return taken

    async def _run_next(self) -> None:
        taken = self._take()
        try:
            outputs = await self.run([item for item, _ in taken])
        except BaseException as exc:  # the items taken with it must not wait forever
            for _, future in taken:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("interrupted"))
            if not isinstance(exc, Exception):
                raise
            return
        self.sizes[len(taken)] += 1
        for (_, future), output in zip(taken, outputs):
            future.set_result(output)


def _no_concurrent_batches_warning(record: logging.LogRecord) -> bool:
    """Serve warns when max_batch_size × max_concurrent_batches exceeds max_ongoing_requests; with _Coalescer that
    is intended (a formed batch only hands its requests over), so this warning is dropped."""
    return "max_concurrent_batches" not in record.getMessage()


# ---------------------------------------------------------------------------------------------- deployments
@serve.deployment(name="SubjectEncoder")
class SubjectEncoderDeployment:
    """Reference photos → face crop → CLIP image tokens (LRU-cached by content hash) → prompt embeddings."""

    def __init__(self, config: dict):
        from serving.subjects import IdentityScoring, SubjectEncoding

        cfg = ServeConfig.from_dict(config)
        pipe, self.loaded_model = _load(cfg, drop=("sdm_unet", "tdm_unet", "vae"))
        detector = None
        if cfg.face_detector:
            from facediffuser.data.faces import make_detector

            detector = make_detector(cfg.face_detector)
        max_reference_pixels = Limits(**cfg.limits).max_reference_pixels
        self.encoding = SubjectEncoding(pipe, detector, cfg.cache_size, max_reference_pixels)
        from facediffuser.metrics.identity import DlibEmbedder, IdentityScorer

        # dlib: CPU, bundled CC0 weights; references shrunk to a bounded copy, descriptors in a bounded LRU cache
        self.identity = IdentityScoring(IdentityScorer(DlibEmbedder()), cfg.cache_size, max_reference_pixels)
        self._test_fault: Exception | None = None
        logging.getLogger("ray.serve").addFilter(_no_concurrent_batches_warning)
        # Requests that arrive while a call runs are encoded together in the next one (identical ones once), so
        # requests that came in together leave together and can meet in one sampler batch.
        self.coalescer = _Coalescer(self._encode_many, limit=cfg.max_ongoing_requests)
        self.encode.set_max_batch_size(cfg.max_ongoing_requests)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0, max_concurrent_batches=1024)
    async def encode(self, prompts: list[str], negative_prompts: list[str | None],
                     references: list[list[list[bytes]]], subject_scales: list[list[float] | None]) -> list[dict]:
        """Per request: {"null", "text", "augmented", "reference_sha256", "subject_tokens"} or
        {"error": (status, code, message)}."""
        return await self.coalescer(list(zip(prompts, negative_prompts, references, subject_scales)))

    async def _encode_many(self, requests: list[tuple]) -> list[dict]:
        return await asyncio.to_thread(self.encoding.encode_many, requests)

    async def identity_scores(self, images: list[bytes], references: list[list[bytes]]) -> dict:
        """→ {"scores": per image, per subject: dlib cosine similarity of the subject's reference to its face
        (None: no face)}, or {"error_id": ...} when scoring failed (logged here under that id).

        Reference descriptors are cached by the sha256 of the subject's photos, like the CLIP embeddings."""
        fault, self._test_fault = self._test_fault, None
        try:
            if fault is not None:
                raise fault
            return {"scores": await asyncio.to_thread(self.identity.scores, images, references)}
        except Exception as exc:
            return {"error_id": internal_error("identity scoring", exc).error_id}

    def inject_test_fault(self, error: str, message: str) -> None:
        """TEST-ONLY (tests/test_serve.py): the next identity_scores call raises `error` ("RuntimeError" or
        "ValueError") with `message`. Reachable only through a Ray deployment handle, not over HTTP or config."""
        self._test_fault = {"RuntimeError": RuntimeError, "ValueError": ValueError}[error](message)

    def ready(self) -> dict:
        return {**self.encoding.stats(), "identity_cached": len(self.identity.cache),
                "calls": _histogram(self.coalescer.sizes)}

    def model(self) -> dict:
        """What this replica loaded ({"model", "hashes", "model_version"}); the ingress compares it with the sampler's."""
        return self.loaded_model

    def check_health(self) -> None:
        if self.encoding.pipe.subject_encoder is None:
            raise RuntimeError("subject encoder not loaded")


def _regions(group: list, counts: list[int], latent_size) -> SubjectRegions:
    """Each image of a boxed batch: its request's subject tokens and boxes."""
    tokens = [job.embeds["subject_tokens"] for job, count in zip(group, counts) for _ in range(count)]
    boxes = [[tuple(b) for b in job.request["boxes"]] for job, count in zip(group, counts) for _ in range(count)]
    return SubjectRegions(tokens=tokens, boxes=boxes, latent_size=tuple(latent_size))


def _histogram(sizes: Counter) -> dict[str, int]:
    return {str(size): count for size, count in sorted(sizes.items())}


@dataclass
class _Job:
    """One request inside a batch; `key` groups requests that can share one snf_denoise call."""

    request: dict
    embeds: dict
    arrived: float
    key: tuple = ()
    iterations: int = 0
    boundaries: tuple[int, int] = (0, 0)


@serve.deployment(name="Sampler")
class SamplerDeployment:
    """Both UNets, the VAE and the scheduler config; one snf_denoise call per group of compatible requests."""

    def __init__(self, config: dict):
        cfg = ServeConfig.from_dict(config)
        self.pipe, self.identity = _load(cfg, drop=())
        self.pipe.text_encoder = self.pipe.subject_encoder = None  # the encoder deployment owns those
        self.versions = package_versions()
        self.consecutive_failures = 0
        self.default_size = self.pipe.sdm_unet.config.sample_size * self.pipe.vae_scale_factor
        logging.getLogger("ray.serve").addFilter(_no_concurrent_batches_warning)
        # One snf_denoise call at a time; each takes up to max_batch_size waiting requests that share a key.
        self.coalescer = _Coalescer(self._run_group, limit=cfg.max_batch_size, key=lambda job: job.key)
        self.configure_batching(cfg.max_batch_size, cfg.batch_wait_timeout_s)
        self.batches_served = 0
        self._test_fault: Exception | None = None

    def inject_test_fault(self, error: str, message: str) -> None:
        """TEST-ONLY (tests/test_serve.py): the next snf_denoise call raises `error` ("RuntimeError" or
        "ValueError") with `message`. Reachable only through a Ray deployment handle, not over HTTP or config."""
        self._test_fault = {"RuntimeError": RuntimeError, "ValueError": ValueError}[error](message)

    def ready(self) -> dict:
        return {**self.identity, "default_size": self.default_size, "batches_served": self.batches_served}

    def stats(self) -> dict:
        """Batches this replica formed so far: `formed_batches` maps requests per snf_denoise call → calls."""
        formed = self.coalescer.sizes
        calls = sum(formed.values())
        requests = sum(size * count for size, count in formed.items())
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "batches_served": self.batches_served, "requests_served": requests, "formed_batches": _histogram(formed),
            "mean_batch_requests": round(requests / calls, 3) if calls else None,
            "max_batch_size": self.max_batch_size, "batch_wait_timeout_s": self.batch_wait_timeout_s,
            "consecutive_failures": self.consecutive_failures,
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

    def _plan(self, job: _Job) -> None:
        r = job.request
        scheduler = make_scheduler(r["scheduler"], self.pipe.scheduler.config)
        scheduler.set_timesteps(r["steps"])
        job.iterations = len(scheduler.timesteps)
        job.boundaries = boundaries_from_fractions(r["alpha"], r["beta"], job.iterations)
        size = (r["height"] or self.default_size, r["width"] or self.default_size)
        # boxed requests run the SDM's attention with a bias: they batch only with other boxed ones
        job.key = (r["scheduler"], r["steps"], size, float(r["guidance_scale"]), job.boundaries, r["boxes"] is not None)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.05, max_concurrent_batches=1024)
    async def generate(self, jobs: list[_Job]) -> list[dict]:
        """Requests that arrived within batch_wait_timeout_s of each other; the coalescer runs them (see _Coalescer)."""
        return await self.coalescer(jobs)

    async def _run_group(self, group: list[_Job]) -> list[dict]:
        try:
            outputs = await asyncio.to_thread(self._denoise_group, group)
            self.consecutive_failures = 0
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            outputs = [{"error": (503, "unavailable", "out of GPU memory; retry shortly or ask for fewer/smaller images")}] * len(group)
        except Exception as exc:  # a fault on our side, ValueError included (requests were checked before): answer
            self.consecutive_failures += 1  # 500 for this batch only, details in the log; health decides the rest
            outputs = [{"error": internal_error("sampling", exc).as_tuple()}] * len(group)
        self.batches_served += 1
        return outputs

    async def submit(self, request: dict, embeds: dict) -> dict:
        job = _Job(request=request, embeds=embeds, arrived=time.perf_counter())
        try:
            self._plan(job)
        except ValueError as exc:
            return {"error": (422, "invalid_request", str(exc))}
        return await self.generate(job)

    @torch.no_grad()
    def _denoise_group(self, group: list[_Job]) -> list[dict]:
        fault, self._test_fault = self._test_fault, None
        if fault is not None:
            raise fault
        pipe, first = self.pipe, group[0]
        scheduler_kind, steps, (height, width), guidance, (s, f), boxed = first.key
        scheduler = make_scheduler(scheduler_kind, pipe.scheduler.config)  # fresh: solvers keep per-call state
        dtype, device = pipe.sdm_unet.dtype, pipe.sdm_unet.device
        shape = (4, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)

        seeds, generators, counts = [], [], []
        for job in group:
            count = job.request["num_images"]
            base = job.request["seed"]
            job_seeds = [base + k for k in range(count)]  # image k of a request always uses seed + k
            seeds.append(job_seeds)
            generators += [torch.Generator().manual_seed(seed) for seed in job_seeds]
            counts.append(count)
        # Each image's initial noise comes from its own generator, which then feeds any stochastic scheduler:
        # the same as FaceDiffuserPipeline._initial_latents, independent of who else is in the batch.
        latents = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
        latents = (latents * scheduler.init_noise_sigma).to(device, dtype)

        def stacked(name):
            return torch.cat([job.embeds[name].repeat(count, 1, 1) for job, count in zip(group, counts)]).to(device, dtype)

        want_masks = any(job.request["return_masks"] for job in group)
        denoise_started = time.perf_counter()
        result = snf_denoise(
            pipe.tdm_unet, pipe.sdm_unet, scheduler, latents, stacked("null"), stacked("text"), stacked("augmented"),
            num_inference_steps=steps, guidance_scale=guidance, start_merge_step=s, final_step=f,
            return_masks=want_masks, generator=generators, regions=_regions(group, counts, shape[1:]) if boxed else None,
        )
        decode_started = time.perf_counter()
        images = tensor_to_pil(pipe.decode_latents(result.latents))
        masks = torch.stack(result.masks)[:, :, 0].float().cpu() if want_masks and result.masks else None
        decode_s = time.perf_counter() - decode_started
        denoise_s = decode_started - denoise_started

        outputs, offset = [], 0
        for job, job_seeds, count in zip(group, seeds, counts):
            rows = slice(offset, offset + count)
            offset += count
            output = {
                "images": [_png(image) for image in images[rows]],
                "seeds": job_seeds,
                "batch_size": len(images),
                "batch_requests": len(group),
                "timings": {"queue_s": denoise_started - job.arrived, "denoise_s": denoise_s, "decode_s": decode_s},
                "manifest": {
                    "scheduler": scheduler_name(scheduler), "steps": steps, "iterations": job.iterations,
                    "guidance_scale": guidance, "size": [width, height], "boxes": job.request["boxes"],
                    "subject_scales": job.request["subject_scales"],
                    "boundaries": {"start_merge_step": s, "final_step": f, "alpha": job.request["alpha"],
                                   "beta": job.request["beta"], "fusion_steps": result.fusion_steps},
                    **self.identity, "versions": self.versions,
                },
            }
            if job.request["return_masks"]:
                job_masks = masks[:, rows] if masks is not None else torch.zeros(0, count, *shape[1:])
                output["fusion_masks"] = _png(mask_grid(job_masks))
                if job_masks.shape[0]:
                    mean = job_masks.mean(dim=0)
                    output["overlays"] = [_png(mask_overlay(image, mean[k], boxes=job.request["boxes"]))
                                          for k, image in enumerate(images[rows])]
            outputs.append(output)
        return outputs


# -------------------------------------------------------------------------------------------------- ingress
api = FastAPI(
    title="Face-diffuser",
    version="1.0",
    description="Subject-to-image generation of given people: a prompt with a `<|image|>` marker after each "
    "subject noun, and one reference photo per marker. Errors are JSON: {\"error\": code, \"message\": text}.",
)
bearer = HTTPBearer(auto_error=False, description=f"required when the server sets ${TOKEN_ENV}")
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 413, 422, 500, 503)}
UNAUTHORIZED = "a valid 'Authorization: Bearer <token>' header is required"


def _error(status: int, code: str, message: str, error_id: str | None = None) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    body = {"error": code, "message": message, **({"error_id": error_id} if error_id else {})}
    return JSONResponse(body, status_code=status, headers=headers)


def token_matches(given: bytes, token: str) -> bool:
    """Timing-safe: compares fixed-length digests, so neither the token's bytes nor its length leak."""
    return hmac.compare_digest(hashlib.sha256(given).digest(), hashlib.sha256(token.encode()).digest())


@api.exception_handler(RequestError)
async def _request_error(request: Request, exc: RequestError):
    return _error(exc.status, exc.code, exc.message, exc.error_id)


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception):
    error = internal_error(f"{request.method} {request.url.path}", exc)
    return _error(error.status, error.code, error.message, error.error_id)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    return _error(*validation_message(exc.errors()))


class _Gate:
    """Pure ASGI middleware in front of every route: authorise, then read the body within max_payload_bytes.

    1. With a token set, every path but PUBLIC_PATHS needs it: 401 before a byte of the body is read or parsed.
    2. A declared Content-Length over the limit: 413 at once. Otherwise the body is read chunk by chunk with a
       running count, and 413 as soon as it passes the limit (a chunked upload is never buffered beyond it).
    3. The body read so far is handed to the route as one message.
    Settings come from the app's state (`token`, `limits`), set by the ingress replica.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope["app"].state
        token: str | None = getattr(state, "token", None)
        limits: Limits | None = getattr(state, "limits", None)
        headers = dict(scope.get("headers") or [])
        if token is not None and _route_path(scope) not in PUBLIC_PATHS:
            scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not token_matches(given.strip(), token):
                return await _error(401, "unauthorized", UNAUTHORIZED)(scope, receive, send)
        if limits is None:
            return await self.app(scope, receive, send)
        limit = limits.max_payload_bytes
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return await _error(413, "payload_too_large", f"the body is {int(declared)} bytes; the limit is {limit}"
                                )(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nobody to answer
                return None
            size += len(message.get("body", b""))
            if size > limit:
                return await _error(413, "payload_too_large", f"the body is larger than the limit of {limit} bytes"
                                    )(scope, receive, send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body, handed = b"".join(chunks), False
        del chunks

        async def replay():
            nonlocal handed
            if not handed:
                handed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        return await self.app(scope, replay, send)


def _route_path(scope) -> str:
    """The request's path inside the app (without the Serve route prefix, which arrives as root_path)."""
    path, root = scope.get("path", "/"), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path or "/"


api.add_middleware(_Gate)


def _unavailable(exc: BaseException) -> bool:
    """Errors that mean "try again shortly": a replica died or is restarting, or a queue is full."""
    import ray.exceptions as rex

    return isinstance(exc, (BackPressureError, rex.RayActorError, rex.ActorUnavailableError)) or (
        type(exc).__name__ in ("DeploymentUnavailableError", "ActorDiedError")
    )


@serve.deployment(name="Ingress")
@serve.ingress(api)
class FaceDiffuserAPI:
    """Validation, auth and limits; then encoder → sampler. Heavy work never runs here."""

    def __init__(self, encoder, sampler, config: dict):
        cfg = ServeConfig.from_dict(config)
        self.encoder, self.sampler = encoder, sampler
        self.limits = Limits(**cfg.limits)
        self.token = cfg.api_token
        self.config = cfg
        self.default_size: int | None = None  # the model's image side, asked from the sampler on first use
        api.state.limits, api.state.token = self.limits, self.token  # read by _Gate
        exposed = not self.token and not is_loopback(cfg.host)
        (log.warning if exposed else log.info)("%s (app %s)", auth_mode(cfg), cfg.app_name)

    def _authorize(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        """The routes' own check (the gate middleware has already checked, before reading the body)."""
        if self.token is None:
            return
        given = credentials.credentials.encode() if credentials is not None else b""
        if not token_matches(given, self.token):
            raise RequestError(401, "unauthorized", UNAUTHORIZED)

    async def _call(self, method, *args):
        try:
            return await method.remote(*args)
        except Exception as exc:
            if _unavailable(exc):
                raise RequestError(503, "unavailable", f"the service is busy or restarting ({type(exc).__name__}); retry shortly") from None
            raise

    @api.get("/", include_in_schema=False)
    async def page(self):
        """The web page for trying the API in a browser (one static file, no build step)."""
        return HTMLResponse(STATIC_PAGE.read_text(encoding="utf-8"))

    @api.get("/healthz", responses={503: {"model": ErrorResponse}})
    async def healthz(self):
        """Ready only when the encoder's and the sampler's models are loaded and answering."""
        try:
            encoder, sampler, encoder_model = await asyncio.wait_for(asyncio.gather(
                self.encoder.ready.remote(), self.sampler.ready.remote(), self.encoder.model.remote()), timeout=5)
        except Exception as exc:
            return _error(503, "not_ready", f"models are not ready ({type(exc).__name__})")
        mismatch = version_mismatch({"encoder": encoder_model, "sampler": sampler})
        if mismatch:
            return _error(503, "model_mismatch", mismatch)
        return {"status": "ready", "encoder_cache": encoder, "batches_served": sampler["batches_served"]}

    @api.get("/v1/info", responses=ERRORS)
    async def info(self, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
        """Models, limits, schedulers, batching and package versions."""
        self._authorize(credentials)
        sampler, encoder_model = await asyncio.gather(self._call(self.sampler.ready), self._call(self.encoder.model))
        mismatch = version_mismatch({"encoder": encoder_model, "sampler": sampler})
        if mismatch:
            raise RequestError(503, "model_mismatch", mismatch)
        return {
            "model": sampler["model"], "hashes": sampler["hashes"], "default_size": sampler["default_size"],
            "model_version": sampler["model_version"],  # the same in both deployments (checked above)
            "model_versions": {"encoder": encoder_model["model_version"], "sampler": sampler["model_version"]},
            "limits": self.limits.as_dict(), "schedulers": sorted(SCHEDULERS),
            "face_detector": self.config.face_detector,
            "batching": {"max_batch_size": self.config.max_batch_size, "batch_wait_timeout_s": self.config.batch_wait_timeout_s},
            "ingress": dict(zip(("max_ongoing_requests", "max_queued_requests"), ingress_capacity(self.config)),
                            memory_mb=self.config.ingress_memory_mb),
            "auth": "bearer" if self.token else "none",
            "versions": package_versions(),
        }

    @api.get("/v1/stats", responses=ERRORS)
    async def stats(self, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
        """Batches formed so far by the sampler replica that answers (one per call; all of them with one replica):
        `formed_batches` maps requests per snf_denoise call to the number of such calls."""
        self._authorize(credentials)
        sampler, encoder = await asyncio.gather(self._call(self.sampler.stats), self._call(self.encoder.ready))
        return {"sampler": sampler, "encoder_cache": encoder}

    @api.post("/v1/generate", response_model=GenerateResponse, responses=ERRORS)
    async def generate(self, body: GenerateRequest, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
        """Generate `num_images` images of the referenced people; image k uses seed + k."""
        started = time.perf_counter()
        self._authorize(credentials)
        if self.default_size is None:
            self.default_size = (await self._call(self.sampler.ready))["default_size"]
        checked = check_request(body, self.limits, self.default_size)
        if body.seed is None:
            body.seed = int.from_bytes(os.urandom(4), "little") >> 1
        encode_started = time.perf_counter()
        embeds = await self._call(self.encoder.encode, body.prompt, body.negative_prompt, checked.references,
                                  body.subject_scales)
        encode_s = time.perf_counter() - encode_started
        if "error" in embeds:
            raise RequestError(*embeds["error"])
        request = body.model_dump(exclude={"references"})  # the photos went to the encoder; no extra copy
        output = await self._call(self.sampler.submit, request, embeds)
        if "error" in output:
            raise RequestError(*output["error"])
        identity_scores, warnings = None, []
        if body.identity_scores:  # the images exist: a failure here costs the scores, never the answer
            identity_started = time.perf_counter()
            try:
                scored = await self._call(self.encoder.identity_scores, output["images"], checked.references)
            except Exception as exc:
                scored = {"error_id": internal_error("identity scoring", exc).error_id}
            identity_scores = scored.get("scores")
            if identity_scores is None:
                warnings.append(f"identity scoring failed (error id {scored['error_id']}); the images are returned "
                                "without identity_scores")
            output["timings"]["identity_s"] = time.perf_counter() - identity_started
        total_s = time.perf_counter() - started
        timings = {"encode_s": encode_s, **output["timings"], "total_s": total_s}
        manifest = {
            "prompt": body.prompt, "plain_prompt": strip_markers(body.prompt), "negative_prompt": body.negative_prompt,
            "references": embeds["reference_sha256"], "seeds": output["seeds"], **output["manifest"],
            "identity_scores": identity_scores, "identity_metric": "dlib cosine" if identity_scores is not None else None,
            "seconds": round(total_s, 3),
        }
        b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
        return GenerateResponse(
            images=[b64(png) for png in output["images"]], seeds=output["seeds"],
            fusion_masks=b64(output["fusion_masks"]) if "fusion_masks" in output else None,
            overlays=[b64(png) for png in output["overlays"]] if "overlays" in output else None,
            batch_size=output["batch_size"], batch_requests=output["batch_requests"],
            timings={k: round(v, 4) for k, v in timings.items()}, manifest=manifest, identity_scores=identity_scores,
            warnings=warnings,
        )


# ------------------------------------------------------------------------------------------ building and CLI
def build_app(config: ServeConfig, upstream_app: str | None = None):
    """The bound application: ingress → (encoder, sampler), with resources, scaling and queue limits.

    With `upstream_app`, only an ingress is deployed, in front of that running app's encoder and sampler
    (e.g. a second route with its own token or limits, sharing the loaded models).
    """
    values = asdict(config)
    ongoing, queued = ingress_capacity(config)
    ingress = FaceDiffuserAPI.options(
        ray_actor_options={"num_cpus": config.ingress_num_cpus},
        max_ongoing_requests=ongoing, max_queued_requests=queued,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=RETRY_AFTER_S),
    )
    if upstream_app:
        encoder = serve.get_deployment_handle("SubjectEncoder", app_name=upstream_app)
        sampler = serve.get_deployment_handle("Sampler", app_name=upstream_app)
        return ingress.bind(encoder, sampler, values)
    scaling = {
        "min_replicas": config.min_replicas, "max_replicas": config.max_replicas,
        "target_ongoing_requests": config.target_ongoing_requests,
    }
    encoder = SubjectEncoderDeployment.options(
        ray_actor_options={"num_cpus": config.encoder_num_cpus, "num_gpus": config.encoder_num_gpus},
        autoscaling_config=scaling, max_ongoing_requests=config.max_ongoing_requests,
        max_queued_requests=config.max_queued_requests, health_check_period_s=config.health_check_period_s,
    ).bind(values)
    sampler = SamplerDeployment.options(
        ray_actor_options={"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
        autoscaling_config=scaling, max_ongoing_requests=config.max_ongoing_requests,
        max_queued_requests=config.max_queued_requests, health_check_period_s=config.health_check_period_s,
    ).bind(values)
    return ingress.bind(encoder, sampler, values)


def app_builder(args: dict):
    """`serve deploy` entry (import_path: serving.app:app_builder); `args` are ServeConfig fields.

    Refuses (ValueError) an unauthenticated app on a non-loopback address: `args.host`, and the address the
    running Serve's proxies listen on (http_options.host) when it can be read."""
    config = ServeConfig.from_dict(dict(args or {}))
    running = _running_http_host()
    if running:
        refuse_anonymous(running, config.api_token, config.allow_anonymous)
    return build_app(config)


def start(config: ServeConfig, upstream_app: str | None = None, verbose: bool = False) -> str:
    """Deploy on the current (or a new local) Ray and wait until ready; → base URL of the app."""
    from pipelines.ray_runtime import init_ray  # the one way every command starts Ray (quiet console)

    init_ray(verbose, num_gpus=None if config.num_gpus or config.encoder_num_gpus else 0)
    serve.start(http_options={"host": config.host, "port": config.port})
    # A Serve that was already running keeps its own address: check that one too.
    refuse_anonymous(_running_http_host() or config.host, config.api_token, config.allow_anonymous)
    serve.run(build_app(config, upstream_app), name=config.app_name, route_prefix=config.route_prefix)
    return f"http://{config.host}:{config.port}{config.route_prefix.rstrip('/')}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model directory (FaceDiffuserPipeline, or one holding sdm/ and tdm/), or a "
                                        "training run's directory (runs/NAME: its final/ is used)")
    source.add_argument("--tiny", action="store_true", help="small random models, for trying the service on a CPU")
    defaults = ServeConfig(tiny=True)
    parser.add_argument("--host", default=defaults.host, help="address to listen on; any but loopback needs "
                        f"${TOKEN_ENV} (or --allow-anonymous)")
    parser.add_argument("--allow-anonymous", action="store_true",
                        help=f"serve without ${TOKEN_ENV} on a non-loopback --host (anyone who reaches it can use the GPUs)")
    parser.add_argument("--port", type=int, default=defaults.port)
    parser.add_argument("--num-gpus", type=float, default=defaults.num_gpus, help="GPUs per sampler replica")
    parser.add_argument("--encoder-num-gpus", type=float, default=defaults.encoder_num_gpus)
    parser.add_argument("--num-cpus", type=float, default=defaults.num_cpus, help="CPUs per sampler replica")
    parser.add_argument("--dtype", default=defaults.dtype, choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--min-replicas", type=int, default=defaults.min_replicas)
    parser.add_argument("--max-replicas", type=int, default=defaults.max_replicas)
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size, help="1 turns batching off")
    parser.add_argument("--batch-wait-timeout-s", type=float, default=defaults.batch_wait_timeout_s)
    parser.add_argument("--max-ongoing-requests", type=int, default=defaults.max_ongoing_requests)
    parser.add_argument("--max-queued-requests", type=int, default=defaults.max_queued_requests)
    parser.add_argument("--face-detector", default=defaults.face_detector, choices=("mediapipe", "mtcnn", "none"))
    parser.add_argument("--max-steps", type=int, default=Limits.max_steps)
    parser.add_argument("--max-side", type=int, default=Limits.max_side)
    parser.add_argument("--compute-budget", type=int, default=Limits.compute_budget,
                        help="per request: width x height x num_images x steps (default: 4 images of 512^2 at 50 steps)")
    parser.add_argument("--verbose", action="store_true", help="show Ray's and Serve's own log lines")


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    return ServeConfig(
        model=args.model, tiny=args.tiny, host=args.host, port=args.port, allow_anonymous=args.allow_anonymous,
        num_gpus=args.num_gpus,
        encoder_num_gpus=args.encoder_num_gpus, num_cpus=args.num_cpus, dtype=args.dtype,
        min_replicas=args.min_replicas, max_replicas=args.max_replicas, max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_timeout_s, max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests,
        face_detector=None if args.face_detector == "none" else args.face_detector,
        limits={"max_steps": args.max_steps, "max_side": args.max_side, "compute_budget": args.compute_budget},
    )


def run(args: argparse.Namespace) -> int:
    import ray

    config = config_from_args(args)  # validates before Ray starts
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        url = start(config, verbose=args.verbose)
        print(f"serving on {url}: POST /v1/generate, GET /healthz, /v1/info, /docs. Ctrl-C stops.", flush=True)
        print(auth_mode(config, _running_http_host()), flush=True)
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    from facediffuser.cli import module_main

    module_main("serve")
