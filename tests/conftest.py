"""Shared fixtures: one local Ray per test session, a real S3 endpoint (moto) on 127.0.0.1, real face photos."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest

# Fixtures of their own modules: the session's Serve app (`service`) and the multi-node cluster (`gpu_cluster`)
pytest_plugins = ["serve_fixtures", "cluster_fixtures"]

# Ray workers use this environment as it is, also under `uv run pytest` (see facediffuser/cli.py).
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


METRICS_PORT = free_port()  # the session Ray's Prometheus export port (scrape_metrics)


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray cluster shared by every test that needs one (ray.init costs ~10 s here)."""
    import ray

    # address="local" always starts our own cluster, never attaching to one left by `ray start`.
    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=0,
        include_dashboard=False,
        object_store_memory=512 * 1024 * 1024,
        log_to_driver=False,
        _metrics_export_port=METRICS_PORT,
    )
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


def scrape_metrics(names: list[str], until=None, timeout_s: float = 90.0) -> dict[str, list[str]]:
    """The session Ray's Prometheus text, once every series in `names` (full names, e.g. ray_facediffuser_jobs) has
    a sample and `until(found)` holds (e.g. a given label has come out) → {name: its sample lines}. Ray exports
    what a process records every few seconds, so a scrape can see part of it: hence the wait for what is asked."""
    import time
    import urllib.request

    deadline, found = time.monotonic() + timeout_s, {}
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).read().decode()
        found = {
            name: [
                line
                for line in text.splitlines()
                if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " ")
            ]
            for name in names
        }
        missing = [name for name, lines in found.items() if not lines]
        if not missing and (until is None or until(found)):
            return found
        assert time.monotonic() < deadline, (
            f"after {timeout_s:g} s, no samples of {missing} at the metrics endpoint"
            if missing
            else f"after {timeout_s:g} s, the metrics endpoint still lacks what was asked: {found}"
        )
        time.sleep(2)


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 (real S3 HTTP), with the standard AWS variables pointing at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    """A real photo of a person (512×512 RGB, shipped with scikit-image)."""
    from skimage.data import astronaut as photo

    return photo()


def hopper_photo() -> np.ndarray:
    """A second real person: Grace Hopper (600x512 RGB, the sample photo shipped with matplotlib). Requests with two
    subjects need two people: the reference checks refuse one person given for two markers."""
    from matplotlib.cbook import get_sample_data
    from PIL import Image

    with Image.open(get_sample_data("grace_hopper.jpg")) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="session")
def hopper() -> np.ndarray:
    return hopper_photo()


@pytest.fixture(scope="module")
def mediapipe_models():
    """The preprocessing face detector and person segmenter (mediapipe, real bundled weights), closed after the
    module."""
    from facediffuser.data.faces import make_detector
    from facediffuser.data.masks import PersonSegmenter

    detector, segmenter = make_detector("mediapipe"), PersonSegmenter()
    yield detector, segmenter
    detector.close()
    segmenter.close()


@pytest.fixture(scope="session")
def tiny_pipe():
    from facediffuser.models.tiny import tiny_pipeline

    pipe = tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe
