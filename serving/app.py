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
import signal
import threading
from dataclasses import asdict

from ray import serve
from ray.serve.config import BackpressureConfig

from facediffuser.config import add_arguments as add_config_arguments, from_args
from serving.api import Limits
from serving.encoder import SubjectEncoderDeployment
from serving.gate import RETRY_AFTER_S
from serving.ingress import FaceDiffuserAPI
from serving.sampler import SamplerDeployment
from serving.settings import (
    CLI_LIMITS,
    ServeConfig,
    auth_mode,
    ingress_capacity,
    refuse_anonymous,
    running_http_host,
)


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
    queues = {"max_ongoing_requests": config.max_ongoing_requests, "max_queued_requests": config.max_queued_requests,
              "health_check_period_s": config.health_check_period_s, "autoscaling_config": scaling}
    encoder = SubjectEncoderDeployment.options(
        ray_actor_options={"num_cpus": config.encoder_num_cpus, "num_gpus": config.encoder_num_gpus}, **queues,
    ).bind(values)
    sampler = SamplerDeployment.options(
        ray_actor_options={"num_cpus": config.num_cpus, "num_gpus": config.num_gpus}, **queues,
    ).bind(values)
    return ingress.bind(encoder, sampler, values)


def app_builder(args: dict):
    """`serve deploy` entry (import_path: serving.app:app_builder); `args` are ServeConfig fields.

    Refuses (ValueError) an unauthenticated app on a non-loopback address: `args.host`, and the address the
    running Serve's proxies listen on (http_options.host) when it can be read."""
    config = ServeConfig.from_dict(dict(args or {}))
    running = running_http_host()
    if running:
        refuse_anonymous(running, config.api_token, config.allow_anonymous)
    return build_app(config)


def start(config: ServeConfig, upstream_app: str | None = None, verbose: bool = False) -> str:
    """Deploy on the current (or a new local) Ray and wait until ready; → base URL of the app."""
    from pipelines.ray_runtime import init_ray  # the one way every command starts Ray (quiet console)

    config.validate()  # a config changed after it was built is checked again before anything starts
    init_ray(verbose, num_gpus=None if config.num_gpus or config.encoder_num_gpus else 0)
    serve.start(http_options={"host": config.host, "port": config.port})
    # A Serve that was already running keeps its own address: check that one too.
    refuse_anonymous(running_http_host() or config.host, config.api_token, config.allow_anonymous)
    serve.run(build_app(config, upstream_app), name=config.app_name, route_prefix=config.route_prefix)
    return f"http://{config.host}:{config.port}{config.route_prefix.rstrip('/')}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`facediffuser serve` flags: ServeConfig's CLI fields, the Limits in CLI_LIMITS, and --verbose."""
    add_config_arguments(parser, ServeConfig, required_groups=("source",))  # one of --model / --tiny
    for name, help_text in CLI_LIMITS.items():
        default = getattr(Limits, name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default,
                            help=f"{help_text} (default: {default})" if "default" not in help_text else help_text)
    parser.add_argument("--verbose", action="store_true", help="show Ray's and Serve's own log lines")


def config_from_cli(args: argparse.Namespace) -> ServeConfig:
    """The ServeConfig of parsed `facediffuser serve` arguments (validated: raises before Ray starts)."""
    return from_args(ServeConfig, args, limits={name: getattr(args, name) for name in CLI_LIMITS})


def run(args: argparse.Namespace) -> int:
    import ray

    config = config_from_cli(args)  # validates before Ray starts
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        url = start(config, verbose=args.verbose)
        print(f"serving on {url}: POST /v1/generate, GET /healthz, /v1/info, /docs. Ctrl-C stops.", flush=True)
        print(auth_mode(config, running_http_host()), flush=True)
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
