"""The Serve app under test, started once per test session and shared by tests/test_serve.py and tests/test_web.py.

conftest.py registers this module as a plugin, so any test may ask for `service`; serve.run costs ~24 s here, so
every module uses the same running app (tiny models, real HTTP on 127.0.0.1, the session's real local Ray).
"""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from conftest import free_port
from PIL import Image

MAIN_APP = "facediffuser-test"
STEPS = 4


def png_b64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decode_png(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


def generate(client: httpx.Client, reference: str, **fields) -> httpx.Response:
    body = {"prompt": "a man <|image|> on a beach", "references": [reference], "steps": STEPS, "seed": 7, **fields}
    return client.post("/v1/generate", json=body)


@pytest.fixture(scope="session")
def service(ray_session, astronaut):
    from ray import serve

    from serving.app import start
    from serving.settings import ServeConfig

    config = ServeConfig(
        tiny=True,
        port=free_port(),
        app_name=MAIN_APP,
        torch_threads=1,
        # No CPU reservations: the app stays up for the whole session, and the training tests that run while
        # it is idle need the session's 2 CPUs for their workers and Ray Data (which waits for a free CPU).
        num_cpus=0,
        encoder_num_cpus=0,
        ingress_num_cpus=0,
        min_replicas=1,
        max_replicas=1,
        max_batch_size=4,
        batch_wait_timeout_s=0.25,
        max_ongoing_requests=8,
        max_queued_requests=4,
        health_check_period_s=2.0,
        limits={"max_steps": 8, "max_side": 128, "max_payload_bytes": 3_000_000, "max_reference_pixels": 1024 * 1024},
    )
    url = start(config)
    client = httpx.Client(base_url=url, timeout=120)
    yield {"url": url, "config": config, "client": client, "reference": png_b64(astronaut)}
    client.close()
    serve.delete(MAIN_APP)
