"""`facediffuser serve` as a user runs it against a cluster (`Server`: its own process group, joined with the
cluster's RAY_ADDRESS), and its replicas as GET /v1/replicas reports them (`replicas`, `wait_until`). Shared by
benchmarks/autoscale.py and benchmarks/node_failure.py."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


class Server:
    """`facediffuser serve ...` joined to the cluster, in its own process group."""

    def __init__(self, cluster, flags: list[str], log: Path):
        self.log = log
        with open(log, "w") as handle:
            self.process = subprocess.Popen(
                [str(BIN / "facediffuser"), "serve", *flags],
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                env=cluster.env,
                start_new_session=True,
            )

    def wait_url(self, timeout: float = 600) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"serving on (\S+) ", self.log.read_text(errors="replace"))
            if found:
                return found.group(1)
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited {self.process.returncode}: {self.log.read_text()[-3000:]}")
            time.sleep(1)
        raise RuntimeError(f"serve not up after {timeout:.0f} s")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=180)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.wait(timeout=60)


def replicas(client) -> dict:
    view = client.get("/v1/replicas").json()
    return {
        "t_wall": view["time"],
        "ongoing": view["ongoing_requests"],
        "sampler_nodes": view["deployments"]["Sampler"]["nodes"],
        **{name: (d["running"], d["target"]) for name, d in view["deployments"].items()},
    }


def wait_until(client, ready, timeout: float) -> float:
    started = time.monotonic()
    while not ready(replicas(client)):
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"condition not reached in {timeout:.0f} s: {replicas(client)}")
        time.sleep(1)
    return time.monotonic() - started
