"""Ray Serve app: HTTP ingress → subject encoder → SNF sampler (both UNets and the VAE on one replica).

    facediffuser serve --tiny --port 8000          # local Ray, blocks until Ctrl-C
    serve deploy serving/config/serve.yaml         # the same app on a running cluster (import path: app_builder)

This module builds and starts the app; its parts live in:
    settings.py   ServeConfig (CLI flags and serve.yaml args), auth rules, ingress queue sizing
    ingress.py    the FastAPI routes (gate.py: token and body-size checks before a route reads the body)
    encoder.py    SubjectEncoder deployment: prompts + reference photos → embeddings; identity scores
    sampler.py    Sampler deployment: compatible requests denoised in one snf_denoise call (coalescer.py)
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from dataclasses import asdict

from ray import serve
from ray.serve.config import BackpressureConfig

from facediffuser.config import add_arguments as add_config_arguments
from facediffuser.config import from_args
from serving import drain
from serving.api import Limits
from serving.encoder import SubjectEncoderDeployment
from serving.gate import RETRY_AFTER_S
from serving.ingress import FaceDiffuserAPI
from serving.jobs import JOB_LOST_AFTER_S, JobStore
from serving.sampler import SamplerDeployment
from serving.settings import (
    CLI_LIMITS,
    ServeConfig,
    auth_mode,
    ingress_capacity,
    refuse_anonymous,
    running_http_host,
    running_http_options,
)
from serving.subject_store import store_access


def build_app(config: ServeConfig, upstream_app: str | None = None):
    """The bound application: ingress → (encoder, sampler), with resources, scaling and queue limits.

    With `upstream_app`, only an ingress is deployed, in front of that running app's encoder and sampler
    (e.g. a second route with its own token or limits, sharing the loaded models).
    """
    values = asdict(config)
    ongoing, queued = ingress_capacity(config)
    # The gate admits `ongoing` and answers the rest with our JSON 503 `busy` without reading their bodies, so
    # Serve hands the replica `queued` more than that; Serve's queue (plain-text 503 when full) only absorbs
    # bursts of new connections while they are handed over, so it is sized well above any burst the gate refuses.
    ingress = FaceDiffuserAPI.options(
        num_replicas=config.ingress_replicas,
        ray_actor_options={"num_cpus": config.ingress_num_cpus, **store_access(config.subject_store)},
        max_ongoing_requests=ongoing + queued,
        max_queued_requests=4 * (ongoing + queued),
        graceful_shutdown_timeout_s=config.drain_timeout_s,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=RETRY_AFTER_S),
    )
    if upstream_app:
        encoder = serve.get_deployment_handle("SubjectEncoder", app_name=upstream_app)
        sampler = serve.get_deployment_handle("Sampler", app_name=upstream_app)
        store = serve.get_deployment_handle("JobStore", app_name=upstream_app)  # one job book for both routes
        return ingress.bind(encoder, sampler, store, values)
    queues = {
        "max_ongoing_requests": config.max_ongoing_requests,
        "max_queued_requests": config.max_queued_requests,
        "health_check_period_s": config.health_check_period_s,
        # a replica Serve stops (rolling update, downscale, node drain) finishes its requests first
        "graceful_shutdown_timeout_s": config.drain_timeout_s,
        "autoscaling_config": config.autoscaling_config(),
    }
    encoder = SubjectEncoderDeployment.options(
        ray_actor_options={"num_cpus": config.encoder_num_cpus, "num_gpus": config.encoder_num_gpus},
        **queues,
    ).bind(values)
    store = JobStore.bind(config.job_ttl_s, JOB_LOST_AFTER_S)
    sampler = SamplerDeployment.options(
        ray_actor_options={"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
        **queues,
    ).bind(values, store)
    return ingress.bind(encoder, sampler, store, values)


def app_builder(args: dict):
    """`serve deploy` entry (import_path: serving.app:app_builder); `args` are ServeConfig fields.

    Refuses (ValueError) an unauthenticated app on a non-loopback address: `args.host`, and the address the
    running Serve's proxies listen on (http_options.host) when it can be read."""
    config = ServeConfig.from_dict(dict(args or {}))
    running = running_http_host()
    if running:
        refuse_anonymous(running, config.api_token, config.allow_anonymous)
    return build_app(config)


def attach_address() -> str | None:
    """The running cluster a plain `ray.init()` joins (RAY_ADDRESS, else the latest `ray start` on this machine),
    or None when it would start a Ray of its own."""
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address:
        return None if address == "local" else address
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(None)
    except Exception:  # a Ray that moved the helper, or an address it cannot parse: ray.init will say
        return address or None


class ServeSession:
    """One start of the app and, at `stop()`, the undoing of exactly what that start did: our application is
    deleted (`serve.delete`) only if this session deployed it; Serve is shut down only if this session started
    it and no other application runs on it; Ray is shut down (a started local Ray) or left (a joined cluster
    is only disconnected from) only if this session initialised it. Other applications on the cluster keep
    running whatever happens here."""

    def __init__(
        self, config: ServeConfig, upstream_app: str | None = None, verbose: bool = False, replace_existing: bool = True
    ):
        self.config, self.upstream_app, self.verbose = config, upstream_app, verbose
        self.replace_existing = replace_existing  # False: refuse when an application of our name runs already
        self.url: str | None = None
        self.cluster: str | None = None  # the address joined; None: a local Ray (ours, or the caller's)
        self.own_ray = self.own_serve = self.deployed = False

    def start(self, after_ray_init=None) -> str:
        """Deploy on the current Ray, a running cluster (RAY_ADDRESS), or a new local Ray, and wait until ready;
        → the app's base URL. `after_ray_init` runs once Ray is up (ray.init replaces the SIGTERM handler)."""
        import ray

        from cluster.runtime import init_ray  # the one way every command starts Ray (quiet console)

        config = self.config
        config.validate()  # a config changed after it was built is checked again before anything starts
        if not ray.is_initialized():
            self.cluster = attach_address()
            if self.cluster:  # its nodes declare CPUs and GPUs; ray.init refuses resource arguments there
                init_ray(self.verbose)
            else:
                init_ray(self.verbose, num_gpus=None if config.num_gpus or config.encoder_num_gpus else 0)
            self.own_ray = True
        if after_ray_init:
            after_ray_init()
        self.own_serve = running_http_options() is None
        serve.start(http_options={"host": config.host, "port": config.port})
        # A Serve that was already running keeps its own address and port: check that one, and answer with it.
        host, port = running_http_options() or (config.host, config.port)
        refuse_anonymous(host, config.api_token, config.allow_anonymous)
        existing = serve.status().applications
        if config.app_name in existing and not self.replace_existing:
            raise ValueError(
                f"an application named {config.app_name!r} already runs on this Ray "
                f"(status {existing[config.app_name].status}); stop it first, or give this one "
                "another --app-name (and --route-prefix)"
            )
        self.deployed = config.app_name not in existing  # ours to delete at stop (also when deploying fails)
        drain.clear(config.app_name)  # a drain flag left by an earlier app of this name must not close this one
        serve.run(build_app(config, self.upstream_app), name=config.app_name, route_prefix=config.route_prefix)
        self.url = f"http://{host}:{port}{config.route_prefix.rstrip('/')}"
        return self.url

    def drain(self, timeout_s: float) -> int:
        """New requests to our application get 503 (Retry-After); wait up to `timeout_s` for those in flight
        (serving/drain.py). Only an application this session deployed is drained. → requests still in flight."""
        import ray

        if not (self.deployed and self.url and ray.is_initialized()):
            return 0
        return drain.wait_until_idle(self.config.app_name, timeout_s)

    def stop(self, cut_off: bool = False) -> None:
        """Undo what `start` did (see the class); safe to call after a failed or partial start. `cut_off`: the drain
        ran out of time; a Ray of our own then goes down at once instead of giving the requests still running the
        replicas' graceful shutdown (the drain period) a second time."""
        import ray

        from cluster.stopping import shutdown_ray

        try:
            if ray.is_initialized() and not (cut_off and self.own_ray):
                if self.deployed:
                    try:
                        serve.delete(self.config.app_name)  # waits until its replicas are gone
                        drain.clear(self.config.app_name)
                    except Exception as exc:
                        print(f"could not delete application {self.config.app_name}: {exc}", file=sys.stderr)
                if self.own_serve and running_http_options() is not None and not serve.status().applications:
                    serve.shutdown()
        finally:
            if self.own_ray:  # a local Ray ends, with every process of its session; a joined cluster is only
                shutdown_ray()  # disconnected from


def start(config: ServeConfig, upstream_app: str | None = None, verbose: bool = False) -> str:
    """Deploy on the current (or a new local) Ray and wait until ready; → base URL of the app. An application of
    the same name is updated in place (ServeSession(replace_existing=False) refuses instead)."""
    return ServeSession(config, upstream_app, verbose).start()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`facediffuser serve` flags: ServeConfig's CLI fields and the Limits in CLI_LIMITS (--verbose:
    facediffuser/cli.py)."""
    add_config_arguments(parser, ServeConfig, required_groups=("source",))  # one of --model / --tiny
    for name, help_text in CLI_LIMITS.items():
        default = getattr(Limits, name)
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            default=default,
            help=f"{help_text} (default: {default})" if "default" not in help_text else help_text,
        )


def config_from_cli(args: argparse.Namespace) -> ServeConfig:
    """The ServeConfig of parsed `facediffuser serve` arguments (validated: raises before Ray starts)."""
    return from_args(ServeConfig, args, limits={name: getattr(args, name) for name in CLI_LIMITS})


def run(args: argparse.Namespace) -> int:
    """`facediffuser serve`: start (or join a running cluster: RAY_ADDRESS), serve until SIGINT or SIGTERM, then
    stop: new requests get 503 with Retry-After, those in flight finish (up to --drain-timeout-s), our application
    is deleted, Serve and Ray shut down only if this command started them. Exit status 0.

    Both signals take cluster/stopping.py's one path (also a SIGINT ignored since the start, as in `serve ... &`
    from a script); a signal during the start abandons it, and later signals do not interrupt the clean-up."""
    from cluster.stopping import Stopped, requested, stoppable

    config = config_from_cli(args)  # validates before Ray starts
    session = ServeSession(config, verbose=args.verbose, replace_existing=False)
    left = 0  # requests still in flight when the drain ran out of time
    try:
        with stoppable("stopped"):
            try:
                url = session.start()
                where = f"cluster {session.cluster}" if session.cluster else "a local Ray"
                print(
                    f"serving on {url} (application {config.app_name} on {where}): POST /v1/generate, GET /healthz, "
                    "/v1/info, /docs. Ctrl-C stops.",
                    flush=True,
                )
                print(auth_mode(config, running_http_host()), flush=True)
                threading.Event().wait()  # until SIGTERM or SIGINT raises Stopped here
            except BaseException:
                if requested() and session.url:
                    print(
                        f"stopping: new requests get 503; waiting up to {config.drain_timeout_s:g} s for those in "
                        "flight",
                        flush=True,
                    )
                    left = session.drain(config.drain_timeout_s)
                    if left:
                        print(f"drain timeout: {left} request(s) still in flight are cut off", flush=True)
                raise
            finally:
                session.stop(cut_off=bool(left))
    except Stopped:
        pass
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    from facediffuser.cli import module_main

    module_main("serve")
