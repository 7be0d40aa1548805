"""The Ingress deployment: the FastAPI routes (validation, auth, limits), then encoder → sampler. Heavy work never
runs here; the gate (serving/gate.py) has already checked the token and the body size."""

# No `from __future__ import annotations`: FastAPI must see real types in the route signatures.

import asyncio
import os
import time
from pathlib import Path

from fastapi import Depends
from fastapi.responses import HTMLResponse
from fastapi.security import HTTPAuthorizationCredentials
from ray import serve
from ray.serve.exceptions import BackPressureError

from facediffuser.manifest import package_versions
from facediffuser.model_dir import version_mismatch
from facediffuser.reference import REFERENCE_MODES
from facediffuser.schedulers import SCHEDULERS
from serving.api import (
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    Limits,
    RequestError,
    check_request,
    internal_error,
    log,
)
from serving.drain import DrainWatch
from serving.gate import UNAUTHORIZED, error_response, token_matches
from serving.http_app import ERRORS, api, bearer
from serving.job_routes import JobRoutes
from serving.metrics import ingress_metrics
from serving.responses import generate_response
from serving.scaling import replica_view
from serving.selection import sample_best, selection_of
from serving.settings import ServeConfig, auth_mode, ingress_capacity, is_loopback
from serving.subject_routes import SubjectRoutes

STATIC_PAGE = Path(__file__).parent / "static" / "index.html"


def _unavailable(exc: BaseException) -> bool:
    """Errors that mean "try again shortly": a replica died or is restarting, or a queue is full."""
    import ray.exceptions as rex

    return isinstance(exc, (BackPressureError, rex.RayActorError, rex.ActorUnavailableError)) or (
        type(exc).__name__ in ("DeploymentUnavailableError", "ActorDiedError")
    )


@serve.deployment(name="Ingress")
@serve.ingress(api)
class FaceDiffuserAPI(JobRoutes, SubjectRoutes):
    """Validation, auth and limits; then encoder → sampler. Heavy work never runs here."""

    def __init__(self, encoder, sampler, store, config: dict):
        cfg = ServeConfig.from_dict(config)
        self.encoder, self.sampler, self.store = encoder, sampler, store
        self.job_tasks: set[asyncio.Task] = set()  # jobs this replica runs (a reference keeps each task alive)
        self.limits = Limits(**cfg.limits)
        self.token = cfg.api_token
        self.config = cfg
        self.default_size: int | None = None  # the model's image side, asked from the sampler on first use
        self.in_flight = 0  # /v1/generate requests this ingress holds (encoding, queued or sampling)
        # the application whose encoder and sampler we call (another one's, behind a second ingress)
        self.models_app = getattr(sampler, "app_name", None) or cfg.app_name
        api.state.limits, api.state.token = self.limits, self.token  # read by Gate
        api.state.admit = ingress_capacity(cfg)[0]
        api.state.metrics = self.metrics = ingress_metrics()
        context = serve.get_replica_context()  # follow this app's drain flag (serving/drain.py) into the gate
        DrainWatch(context.app_name, context.replica_id.unique_id).start()
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
        response = method.remote(*args)
        try:
            return await response
        except asyncio.CancelledError:  # our caller went away (client disconnected, job cancelled): so does the call;
            response.cancel()  # the sampler drops the request's rows at its next step
            raise
        except Exception as exc:
            if _unavailable(exc):
                raise RequestError(
                    503, "unavailable", f"the service is busy or restarting ({type(exc).__name__}); retry shortly"
                ) from None
            raise

    @api.get("/", include_in_schema=False)
    async def page(self):
        """The web page for trying the API in a browser (one static file, no build step)."""
        return HTMLResponse(STATIC_PAGE.read_text(encoding="utf-8"))

    @api.get("/healthz", responses={503: {"model": ErrorResponse}})
    async def healthz(self):
        """Ready only when the encoder's and the sampler's models are loaded and answering. With min_replicas 0
        the answer comes from the Serve controller instead (a call to a replica would wake a deployment scaled to
        zero and keep it from scaling down): `ready`, or `scaled_to_zero` while no replica runs."""
        if self.config.min_replicas == 0:
            return await self._health_from_controller()
        try:
            encoder, sampler, encoder_model = await asyncio.wait_for(
                asyncio.gather(self.encoder.ready.remote(), self.sampler.ready.remote(), self.encoder.model.remote()),
                timeout=5,
            )
        except Exception as exc:
            return error_response(503, "not_ready", f"models are not ready ({type(exc).__name__})")
        mismatch = version_mismatch({"encoder": encoder_model, "sampler": sampler})
        if mismatch:
            return error_response(503, "model_mismatch", mismatch)
        return {"status": "ready", "encoder_cache": encoder, "batches_served": sampler["batches_served"]}

    async def _health_from_controller(self):
        try:
            view = await asyncio.wait_for(replica_view(self.models_app), timeout=5)
        except Exception as exc:
            return error_response(503, "not_ready", f"the Serve controller did not answer ({type(exc).__name__})")
        deployments = view["deployments"]
        broken = {name: d["status"] for name, d in deployments.items() if d["status"] in ("UNHEALTHY", "MISSING")}
        if broken:
            return error_response(503, "not_ready", f"deployments not healthy: {broken}")
        running = {name: d["running"] for name, d in deployments.items()}
        return {"status": "ready" if all(running.values()) else "scaled_to_zero", "replicas": running}

    @api.get("/v1/replicas", responses=ERRORS)
    async def replicas(self, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
        """Replicas of the encoder and the sampler as the Serve controller sees them (the autoscaler's target, those
        running and starting, running ones per node, the autoscaling settings), and the generate requests this
        ingress holds now. Never calls a replica, so it neither wakes a deployment scaled to zero nor counts as load."""
        self._authorize(credentials)
        view = await replica_view(self.models_app)
        return {**view, "ongoing_requests": self.in_flight}

    @api.get("/v1/info", responses=ERRORS)
    async def info(self, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
        """Models, limits, schedulers, batching and package versions."""
        self._authorize(credentials)
        sampler, encoder_model = await asyncio.gather(self._call(self.sampler.ready), self._call(self.encoder.model))
        mismatch = version_mismatch({"encoder": encoder_model, "sampler": sampler})
        if mismatch:
            raise RequestError(503, "model_mismatch", mismatch)
        return {
            "model": sampler["model"],
            "hashes": sampler["hashes"],
            "default_size": sampler["default_size"],
            "model_version": sampler["model_version"],  # the same in both deployments (checked above)
            "model_versions": {"encoder": encoder_model["model_version"], "sampler": sampler["model_version"]},
            "limits": self.limits.as_dict(),
            "schedulers": sorted(SCHEDULERS),
            "reference_modes": {"default": self.config.reference_mode, "choices": list(REFERENCE_MODES)},
            "face_detector": self.config.face_detector,
            "reference_checks": self.config.reference_thresholds().as_dict(),
            "batching": {
                "max_batch_size": self.config.max_batch_size,
                "batch_wait_timeout_s": self.config.batch_wait_timeout_s,
            },
            "ingress": dict(
                zip(("max_ongoing_requests", "max_queued_requests"), ingress_capacity(self.config)),
                memory_mb=self.config.ingress_memory_mb,
            ),
            "auth": "bearer" if self.token else "none",
            "subjects": self.subjects_info(),
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
        self.in_flight += 1
        try:
            return await self._generate(body, started, await self._checked(body, credentials))
        finally:
            self.in_flight -= 1

    async def _checked(self, body: GenerateRequest, credentials: HTTPAuthorizationCredentials | None = None):
        if self.default_size is None:
            self.default_size = (await self._call(self.sampler.ready))["default_size"]
        checked = check_request(body, self.limits, self.default_size)
        if body.subjects is not None:  # saved subjects in place of photos, read for the caller's token
            checked.references = await self._saved_subjects(body, credentials)
        return checked

    async def _generate(
        self, body: GenerateRequest, started: float, checked=None, job_id: str | None = None
    ) -> GenerateResponse:
        checked = checked or await self._checked(body)
        if body.seed is None:
            body.seed = int.from_bytes(os.urandom(4), "little") >> 1
        body.reference_mode = body.reference_mode or self.config.reference_mode  # the manifest says which was used
        encode_started = time.perf_counter()
        embeds = await self._call(
            self.encoder.encode,
            body.prompt,
            body.negative_prompt,
            checked.references,
            body.subject_scales,
            body.reference_mode,
        )
        encode_s = time.perf_counter() - encode_started
        if "error" in embeds:
            raise RequestError(*embeds["error"])
        request = body.model_dump(exclude={"references"})  # the photos went to the encoder; no extra copy
        if selection_of(request).active:  # best_of / min_identity: rounds of scored candidates (serving/selection.py)
            output, identity = await sample_best(
                self._call, self.sampler, self.encoder, request, embeds, checked.references, job_id
            )
        else:
            output = await self._call(self.sampler.submit, request, embeds, job_id)
            if "error" in output:
                raise RequestError(*output["error"])
            identity = await self._identity_scores(output, checked.references) if body.identity_scores else {}
        for score in (s for row in identity.get("scores") or [] for s in row):
            self.metrics["faces"].inc(tags={"outcome": "no_face" if score is None else "scored"})
            if score is not None:
                self.metrics["identity"].observe(score)
        thresholds = self.config.reference_thresholds()
        return generate_response(body, embeds, output, identity, thresholds, started, encode_s)

    async def _identity_scores(self, output: dict, references: list) -> dict:
        """{"scores", "warnings": per image} for the generated images, or {"warning"} when scoring failed: the images
        exist, so a failure here costs the scores, never the answer. Adds the time taken to output["timings"]."""
        started = time.perf_counter()
        try:
            scored = await self._call(self.encoder.identity_scores, output["images"], references)
        except Exception as exc:
            scored = {"error_id": internal_error("identity scoring", exc).error_id}
        output["timings"]["identity_s"] = time.perf_counter() - started
        if "scores" not in scored:
            return {
                "warning": f"identity scoring failed (error id {scored['error_id']}); the images are returned "
                "without identity_scores"
            }
        return scored
