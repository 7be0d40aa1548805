"""`facediffuser serve` on a running multi-node cluster (tests/cluster_fixtures.py: a head and two nodes with one
logical GPU each, CPU kernels under them), as a user runs it: a subprocess with RAY_ADDRESS set.

It joins the cluster without resource arguments, beside another Serve application it must leave alone; its
sampler replicas (one GPU each) autoscale from 1 to 2 on the two GPU nodes and back, and from 0 to 1 and back;
no request gets a 5xx meanwhile; SIGTERM and SIGINT stop it the same way (exit 0, our application gone, the other
one still answering). Replica counts are checked within generous limits: liveness, not speed (the speed is
benchmarks/autoscale.py's)."""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import free_port

from benchmarks.loadtest import generate_payload, run_profile

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
REFERENCE = base64.b64encode((ROOT / "facediffuser/assets/astronaut.jpg").read_bytes()).decode()
GPU_NODES = {"gpu_node_a", "gpu_node_b"}

OTHER_APP = """
import sys
from ray import serve

@serve.deployment(ray_actor_options={"num_cpus": 0})
class Other:
    async def __call__(self, request):
        return "other app"

serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[1])})
serve.run(Other.bind(), name="other", route_prefix="/other")
print("deployed", flush=True)
"""

# Small, fast-reacting autoscaling; the sampler asks for one (logical) GPU, so two replicas need both GPU nodes.
# Its CPU share is small so that it still fits a GPU node (1 CPU) that already holds an encoder (0.5) and the
# ingress (0.1).
SCALING = [
    "--tiny",
    "--num-gpus",
    "1",
    "--num-cpus",
    "0.25",
    "--target-ongoing-requests",
    "1",
    "--upscale-delay-s",
    "1",
    "--downscale-delay-s",
    "5",
    "--max-batch-size",
    "2",
    "--max-steps",
    "4",
    "--max-side",
    "64",
]


class ServeCommand:
    """`facediffuser serve ...` as a subprocess joined to the cluster, in its own process group (ended by us)."""

    def __init__(self, cluster, log: Path, *flags: str, background: bool = False):
        self.log = log
        # background: started as `cmd &` starts it, with SIGINT ignored (the command must set its own handler)
        ignore_sigint = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if background else None
        with open(log, "w") as handle:
            self.process = subprocess.Popen(
                [str(BIN / "facediffuser"), "serve", *flags],
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                env=cluster.env,
                start_new_session=True,
                preexec_fn=ignore_sigint,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_serving(self, timeout: float = 360) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"serving on (\S+) ", self.output())
            if found:
                return found.group(1)
            assert self.process.poll() is None, f"serve exited {self.process.returncode}: {self.output()[-3000:]}"
            time.sleep(1)
        raise AssertionError(f"serve did not come up in {timeout:.0f} s: {self.output()[-3000:]}")

    def stop(self, sig: int) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout=180)

    def __enter__(self) -> "ServeCommand":
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=60)
        left = [p for p in psutil.process_iter() if _pgid(p.pid) == self.process.pid]
        assert not left, f"processes of `facediffuser serve` left: {left}"


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def replicas(client: httpx.Client) -> dict:
    response = client.get("/v1/replicas")
    assert response.status_code == 200, response.text
    return response.json()


def wait_for(client: httpx.Client, ready, what: str, timeout: float) -> tuple[dict, float]:
    """Poll /v1/replicas until `ready(view)`; → (that view, seconds waited)."""
    started = time.monotonic()
    view = replicas(client)
    while not ready(view["deployments"]):
        assert time.monotonic() - started < timeout, f"{what} not reached in {timeout:.0f} s: {view}"
        time.sleep(1)
        view = replicas(client)
    return view, time.monotonic() - started


def no_server_errors(answers) -> None:
    bad = [(round(a.done, 1), a.status) for a in answers if a.status >= 500 or a.status < 0]
    assert not bad, f"requests answered 5xx / no answer during scaling: {bad}"


def test_serve_joins_the_cluster_autoscales_across_gpu_nodes_and_leaves_other_apps(gpu_cluster, tmp_path):
    port = free_port()
    deployed = subprocess.run(
        [sys.executable, "-c", OTHER_APP, str(port)],
        capture_output=True,
        text=True,
        env=gpu_cluster.env,
        timeout=600,
        cwd=tmp_path,
    )
    assert deployed.returncode == 0 and "deployed" in deployed.stdout, deployed.stderr[-3000:]
    other = f"http://127.0.0.1:{port}/other"
    assert httpx.get(other, timeout=30).text == "other app"

    # An application of our name already there is refused, not replaced (and nothing else is touched).
    clash = subprocess.run(
        [str(BIN / "facediffuser"), "serve", "--tiny", "--app-name", "other", "--route-prefix", "/x"],
        capture_output=True,
        text=True,
        env=gpu_cluster.env,
        timeout=600,
        cwd=ROOT,
    )
    assert clash.returncode == 2 and "an application named 'other' already runs" in clash.stderr, clash.stderr[-2000:]
    assert httpx.get(other, timeout=30).text == "other app"

    with ServeCommand(
        gpu_cluster,
        tmp_path / "serve.log",
        *SCALING,
        "--port",
        str(free_port()),
        "--min-replicas",
        "1",
        "--max-replicas",
        "2",
    ) as server:
        url = server.wait_serving()
        assert url == f"http://127.0.0.1:{port}", url  # the running Serve's address, not our --port
        assert f"(application facediffuser on cluster {gpu_cluster.address})" in server.output(), server.output()
        client = httpx.Client(base_url=url, timeout=120)
        view, _ = wait_for(client, lambda d: d["Sampler"]["running"] == 1, "one sampler replica", 120)
        sampler = view["deployments"]["Sampler"]
        assert set(sampler["nodes"]) <= GPU_NODES and sampler["autoscaling"]["min_replicas"] == 1
        assert sampler["autoscaling"]["upscale_delay_s"] == 1 and sampler["autoscaling"]["downscale_delay_s"] == 5
        assert client.get("/healthz").json()["status"] == "ready"

        # Load at concurrency 8 (target 1 request per replica): a second replica, on the other GPU node.
        stop = threading.Event()
        result: dict = {}
        load = threading.Thread(
            target=lambda: result.update(
                answers=run_profile(
                    f"{url}/v1/generate",
                    generate_payload(REFERENCE, steps=2, width=64, height=64, identity_scores=False),
                    [(900, 8)],
                    stop=stop.is_set,
                )
            )
        )
        load.start()
        try:
            view, up_s = wait_for(client, lambda d: d["Sampler"]["running"] == 2, "two sampler replicas", 300)
            assert set(view["deployments"]["Sampler"]["nodes"]) == GPU_NODES, view
            time.sleep(5)  # both replicas serve for a while
        finally:
            stop.set()
            load.join(timeout=300)
        answers = result["answers"]
        assert sum(a.status == 200 for a in answers) >= 8
        view, down_s = wait_for(client, lambda d: d["Sampler"]["running"] == 1, "back to one sampler replica", 300)
        no_server_errors(answers)
        assert generate_ok(client)  # still serving after the change
        print(f"1 -> 2 replicas after {up_s:.0f} s of load; back to 1 {down_s:.0f} s after it ended")

        assert server.stop(signal.SIGTERM) == 0, server.output()[-3000:]
        assert "stopped" in server.output()
    assert httpx.get(other, timeout=30).text == "other app"  # the other application still answers
    assert httpx.get(f"{url}/healthz", timeout=30).status_code == 404  # ours is gone


def generate_ok(client: httpx.Client) -> bool:
    body = {
        "prompt": "a man <|image|> on a beach",
        "references": [REFERENCE],
        "steps": 2,
        "width": 64,
        "height": 64,
        "seed": 1,
        "identity_scores": False,
    }
    response = client.post("/v1/generate", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return True


def test_scale_to_zero_cold_start_and_back_stopped_by_sigint(gpu_cluster, tmp_path):
    """Started like a background job (SIGINT ignored), stopped by SIGINT all the same."""
    with ServeCommand(
        gpu_cluster,
        tmp_path / "serve.log",
        *SCALING,
        "--port",
        str(free_port()),
        "--min-replicas",
        "0",
        "--max-replicas",
        "1",
        background=True,
    ) as server:
        url = server.wait_serving()
        client = httpx.Client(base_url=url, timeout=120)
        view, _ = wait_for(client, lambda d: all(x["running"] == 0 for x in d.values()), "zero replicas", 120)
        assert view["deployments"]["Sampler"]["autoscaling"]["min_replicas"] == 0
        health = client.get("/healthz")  # answered by the controller: it must not wake the deployments
        assert health.status_code == 200 and health.json()["status"] == "scaled_to_zero", health.text
        time.sleep(3)
        assert replicas(client)["deployments"]["Sampler"]["target"] == 0

        started = time.monotonic()
        assert generate_ok(client)  # the first request waits for a cold start (encoder, then sampler) and succeeds
        cold_s = time.monotonic() - started
        view = replicas(client)["deployments"]
        assert view["Sampler"]["running"] == 1 and set(view["Sampler"]["nodes"]) <= GPU_NODES, view
        assert client.get("/healthz").json()["status"] == "ready"

        _, idle_s = wait_for(client, lambda d: all(x["running"] == 0 for x in d.values()), "back to zero", 300)
        print(f"cold start {cold_s:.1f} s; back to zero {idle_s:.0f} s after the request")
        assert server.stop(signal.SIGINT) == 0, server.output()[-3000:]
        assert "stopped" in server.output()
