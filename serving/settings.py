"""The app's settings (`ServeConfig`: the CLI flags and serve.yaml's `args`), and the rules on them: who may call
the API (a token, or a loopback address) and how many requests the ingress may hold in memory."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from facediffuser.config import arg, from_dict
from facediffuser.data.faces import DETECTORS
from facediffuser.reference import DEFAULT_REFERENCE_MODE, REFERENCE_MODES, check_mode
from facediffuser.reference_checks import DEFAULT_THRESHOLDS, ReferenceThresholds
from serving.api import Limits

TOKEN_ENV = "FACEDIFFUSER_API_TOKEN"
# Copies of a request body the ingress holds while the request is in flight: the raw body, the parsed JSON, the
# validated model's strings, the decoded photos (3/4). Used to size its queue (ingress_capacity, docs/serving.md).
PAYLOAD_COPIES = 4
DTYPES = ("float32", "float16", "bfloat16")
# Limits fields the command line sets (`--max-steps` ...); serve.yaml's `limits:` may set any Limits field.
CLI_LIMITS = {
    "max_steps": "most denoising steps per request",
    "max_side": "largest width or height, pixels",
    "compute_budget": "per request: width x height x num_images x steps (default: 4 images of 512^2 at 50 steps)",
}


@dataclass
class ServeConfig:
    """Everything the app needs; built from CLI flags (`run`) or the YAML's `args` (`app_builder`)."""

    model: str | None = arg(
        None,
        "model directory (FaceDiffuserPipeline, or one holding sdm/ and tdm/), or a "
        "training run's directory (runs/NAME: its final/ is used)",
        group="source",
    )
    tiny: bool = arg(False, "small random models, for trying the service on a CPU", group="source")
    # Where Serve's HTTP proxies listen: `facediffuser serve` starts them there; for `serve deploy` keep it equal to
    # http_options.host (app_builder also checks the running proxies' address).
    host: str = arg("127.0.0.1", f"address to listen on; any but loopback needs ${TOKEN_ENV} (or --allow-anonymous)")
    port: int = arg(8000, "HTTP port")
    app_name: str = arg(
        "facediffuser",
        "Serve application name: on a shared cluster each application needs its "
        "own (an existing one of this name is not replaced)",
    )
    route_prefix: str = arg("/", "URL path the application answers under (one application per prefix)")
    api_token: str | None = arg(None, cli=False)  # default: $FACEDIFFUSER_API_TOKEN (never a flag: ps shows those)
    allow_anonymous: bool = arg(
        False, f"serve without ${TOKEN_ENV} on a non-loopback --host (anyone who reaches it can use the GPUs)"
    )
    dtype: str = arg("float32", "model weights' dtype", choices=DTYPES)
    reference_mode: str = arg(
        DEFAULT_REFERENCE_MODE,
        "what the subject encoder sees of a reference photo when a "
        "request does not say: whole (the photo padded square), face "
        "or person",
        choices=REFERENCE_MODES,
    )
    face_detector: str = arg(
        "mediapipe", "finds the face in reference photos (reference modes face and person)", choices=DETECTORS
    )
    cache_size: int = arg(256, cli=False)  # reference photos' embeddings and identity descriptors kept
    # Reference photos checked at the door (facediffuser/reference_checks.py; every threshold in GET /v1/info)
    min_face_px: int = arg(DEFAULT_THRESHOLDS.min_face_px, "reference photos: the smallest face, pixels across")
    min_sharpness: float = arg(DEFAULT_THRESHOLDS.min_sharpness, "reference photos: the lowest face sharpness")
    # resources and scaling (sampler = both UNets + VAE; encoder = text + CLIP vision)
    num_gpus: float = arg(0.0, "GPUs per sampler replica")
    num_cpus: float = arg(1.0, "CPUs per sampler replica")
    encoder_num_gpus: float = arg(0.0, "GPUs per encoder replica")
    encoder_num_cpus: float = arg(0.5, cli=False)
    ingress_num_cpus: float = arg(0.1, cli=False)
    ingress_replicas: int = arg(1, cli=False)  # each answers for every job (the job book is its own deployment)
    torch_threads: int = arg(0, cli=False)  # 0: torch's default
    # Autoscaling (Ray Serve's autoscaling_config), the same for the encoder and the sampler: with min_replicas 0
    # both go to zero when idle, so an idle app holds no GPU (the encoder has a GPU share in serve.yaml too).
    min_replicas: int = arg(
        1,
        "replicas of the encoder and of the sampler, at least (0: scale to zero when idle; "
        "the first request after that waits for a cold start)",
    )
    max_replicas: int = arg(2, "replicas of the encoder and of the sampler, at most")
    target_ongoing_requests: float = arg(
        4.0,
        "requests in flight per replica that the autoscaler aims at: more "
        "than this on average adds replicas, fewer removes them",
    )
    upscale_delay_s: float = arg(10.0, "seconds the load must stay above target before a replica is added")
    downscale_delay_s: float = arg(60.0, "seconds the load must stay below target before a replica is removed")
    downscale_to_zero_delay_s: float | None = arg(
        None, "seconds idle before the last replica goes (min-replicas 0); default: --downscale-delay-s"
    )
    look_back_period_s: float = arg(
        15.0, cli=False
    )  # window the autoscaler averages the load over (> 10 s, Ray's metrics interval)
    max_ongoing_requests: int = arg(8, "requests a replica works on at once")
    max_queued_requests: int = arg(32, "requests waiting per deployment before 503")
    max_batch_size: int = arg(4, "requests per snf_denoise call; 1 turns batching off")
    batch_wait_timeout_s: float = arg(0.05, "how long a batch waits for more requests")
    health_check_period_s: float = arg(10.0, cli=False)
    # Stopping: `facediffuser serve` on SIGTERM/SIGINT refuses new requests (503 + Retry-After) and waits this long
    # for those in flight; every replica Serve stops (update, downscale, node drain) gets as long for its requests.
    drain_timeout_s: float = arg(
        30.0,
        "on SIGTERM/SIGINT: seconds the requests in flight get to finish (new ones get "
        "503 with Retry-After) before Serve and Ray stop",
    )
    # Memory request bodies may take on the ingress's node; bounds the ingress's ongoing and queued requests
    # (ingress_capacity; arithmetic in docs/serving.md).
    ingress_memory_mb: int = arg(4096, cli=False)
    limits: dict = arg({}, cli=False)  # Limits fields
    # Jobs (POST /v1/jobs): results kept this long after they finish; a preview every this many steps (0: none)
    job_ttl_s: float = arg(3600.0, "seconds a finished job's result is kept (GET /v1/jobs/ID), then deleted")
    preview_every: int = arg(5, "a job's event stream carries a cheap preview every this many steps (0: none)")
    # Saved subjects (POST /v1/subjects): one store every ingress replica reads (s3:// for more than one machine)
    subject_store: str | None = arg(
        None,
        "where saved subjects are kept: a directory or s3://bucket/prefix (default: subjects/ under the cache root, "
        "$FACEDIFFUSER_CACHE or ~/.cache/facediffuser, of the machine the ingress runs on)",
    )
    max_subjects_per_token: int = arg(100, "saved subjects one token may keep")

    def __post_init__(self):
        if self.api_token is None:
            self.api_token = os.environ.get(TOKEN_ENV) or None
        self.validate()  # every way of building one (CLI, serve.yaml, deployments, tests) is checked

    def validate(self) -> None:
        """ValueError (one line) for settings the app cannot run with, before any deployment starts."""
        refuse_anonymous(self.host, self.api_token, self.allow_anonymous)
        if not self.tiny and not self.model:
            raise ValueError("give a model directory (--model DIR) or --tiny")
        check_mode(self.reference_mode)
        if self.face_detector not in DETECTORS:  # "none" was the whole photo: reference_mode whole now
            raise ValueError(
                f"face_detector must be one of {', '.join(DETECTORS)}, got {self.face_detector!r} "
                "(for the whole photo, set reference_mode: whole)"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if not self.route_prefix.startswith("/") or not self.app_name.strip():
            raise ValueError(
                f"route_prefix must start with / and app_name must not be empty, got "
                f"{self.route_prefix!r}, {self.app_name!r}"
            )
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.reference_thresholds()  # a threshold out of range fails at startup, naming it
        if self.subject_store and "://" in self.subject_store and not self.subject_store.startswith("s3://"):
            raise ValueError(f"subject_store must be a directory or s3://bucket/prefix, got {self.subject_store!r}")
        if self.max_subjects_per_token < 1:
            raise ValueError(f"max_subjects_per_token must be >= 1, got {self.max_subjects_per_token}")
        if self.job_ttl_s <= 0 or self.preview_every < 0:
            raise ValueError(f"need job_ttl_s > 0 and preview_every >= 0, got {self.job_ttl_s}, {self.preview_every}")
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(
                f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got {self.min_replicas}, "
                f"{self.max_replicas}"
            )
        if self.target_ongoing_requests <= 0 or self.look_back_period_s <= 0:
            raise ValueError("target_ongoing_requests and look_back_period_s must be > 0")
        delays = {
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "downscale_to_zero_delay_s": self.downscale_to_zero_delay_s,
        }
        negative = [name for name, value in delays.items() if value is not None and value < 0]
        if negative:
            raise ValueError(f"{', '.join(negative)} must be >= 0")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError("max_ongoing_requests must be >= max_batch_size (a batch needs that many in flight)")
        Limits(**self.limits)  # unknown keys and bad values fail here
        ingress_capacity(self)  # the ingress memory must hold at least one request and one queued

    def reference_thresholds(self) -> ReferenceThresholds:
        return DEFAULT_THRESHOLDS.with_minimums(self.min_face_px, self.min_sharpness)

    def autoscaling_config(self) -> dict:
        """Ray Serve's autoscaling_config of the encoder and the sampler."""
        scaling = {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "look_back_period_s": self.look_back_period_s,
        }
        if self.downscale_to_zero_delay_s is not None:
            scaling["downscale_to_zero_delay_s"] = self.downscale_to_zero_delay_s
        return scaling

    @classmethod
    def from_dict(cls, values: dict) -> "ServeConfig":
        """From serve.yaml's `args` (or a deployment's copy of them): unknown keys are an error naming them."""
        return from_dict(cls, dict(values), "serve.yaml args")


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


def auth_mode(config: ServeConfig, host: str | None = None) -> str:
    """One line saying who may call the API (printed by `facediffuser serve`, logged by the ingress)."""
    host = host or config.host
    if config.api_token:
        return "authentication: bearer token required on /v1/*"
    if is_loopback(host):
        return f"authentication: off (no ${TOKEN_ENV}); listening on {host}, reachable from this machine only"
    return (
        f"authentication: OFF on {host} (allow_anonymous): anyone who can reach this address can use the API "
        f"and its GPUs; set ${TOKEN_ENV} to require a token"
    )


def ingress_capacity(config: ServeConfig) -> tuple[int, int]:
    """(max_ongoing_requests, max_queued_requests) of the ingress: as many as the encoder and sampler can hold
    (4 x theirs x max_replicas), but no more than fit `ingress_memory_mb`: an ongoing request holds about
    PAYLOAD_COPIES x max_payload_bytes in the ingress replica, a queued one its body (1x) in Serve's HTTP proxy."""
    payload = Limits(**config.limits).max_payload_bytes
    memory = config.ingress_memory_mb * 2**20
    if memory < (PAYLOAD_COPIES + 1) * payload:
        raise ValueError(
            f"ingress_memory_mb={config.ingress_memory_mb} cannot hold one request and one queued: "
            f"needs {PAYLOAD_COPIES + 1} x max_payload_bytes = {(PAYLOAD_COPIES + 1) * payload / 2**20:.0f} MiB"
        )
    ongoing = min(
        4 * config.max_ongoing_requests * config.max_replicas, (memory - payload) // (PAYLOAD_COPIES * payload)
    )
    left = (memory - ongoing * PAYLOAD_COPIES * payload) // payload
    wanted = left if config.max_queued_requests < 0 else 4 * config.max_queued_requests * config.max_replicas
    return ongoing, max(1, min(wanted, left))


def running_http_options() -> tuple[str, int] | None:
    """(host, port) the running Serve's HTTP proxies listen on, when this process is in a Ray session that has a
    Serve controller (best effort: None otherwise). Never starts Ray or Serve."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
        return (client.http_config.host, int(client.http_config.port)) if client is not None else None
    except Exception:
        return None


def running_http_host() -> str | None:
    """The address the running Serve's HTTP proxies listen on (running_http_options), or None."""
    options = running_http_options()
    return options[0] if options else None
