"""Multi-node Ray clusters on this machine (cluster/local.py), started the way users start one.

`gpu_cluster`: a head with 2 CPUs and no GPU, and two worker nodes with 1 CPU and 1 logical GPU each (custom
resources `gpu_node_a` / `gpu_node_b`), every node started with FACEDIFFUSER_CPU_UNDER_GPU=1 so CPU kernels run
under the logical GPUs. The test session's own `ray_session` is a separate local Ray: clients of this cluster
connect explicitly (`ray job submit --address cluster.dashboard_url`, subprocesses with `env=cluster.env`).
"""

from __future__ import annotations

import atexit
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cluster.local import LocalCluster, NodeSpec

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GPU_WORKERS = (
    NodeSpec("gpu_node_a", num_cpus=1, num_gpus=1, resources={"gpu_node_a": 1}),
    NodeSpec("gpu_node_b", num_cpus=1, num_gpus=1, resources={"gpu_node_b": 1}),
)


_shared: dict = {}  # the running gpu_cluster ("cluster"), and whether it was stopped ("stopped")


@pytest.fixture(scope="session")
def gpu_cluster():
    """Shared by tests/test_gpu_cluster.py and tests/test_gpu_cluster_serve.py, which run one after the other:
    started once (a 3-node start costs ~25 s here) and stopped as soon as the next test does not use it
    (pytest_runtest_teardown below), so it never runs beside the rest of the suite."""
    cluster = LocalCluster(head_cpus=2, workers=list(GPU_WORKERS), env={"FACEDIFFUSER_CPU_UNDER_GPU": "1"})
    cluster.start()
    _shared["cluster"] = cluster
    yield cluster
    _stop_gpu_cluster()


def _stop_gpu_cluster() -> None:
    cluster = _shared.pop("cluster", None)
    if cluster is not None:
        _shared["stopped"] = True
        cluster.stop()
        assert not cluster.processes(), "processes of the cluster left after stop"


def pytest_runtest_setup(item):
    if "gpu_cluster" in item.fixturenames and _shared.get("stopped"):
        raise RuntimeError("gpu_cluster was already stopped: keep the tests that use it next to each other")


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    if "cluster" in _shared and (nextitem is None or "gpu_cluster" not in nextitem.fixturenames):
        _stop_gpu_cluster()


def code_snapshot() -> Path:
    """A copy of the code a job needs (facediffuser/, cluster/, pipelines/, serving/), made once: the job's working
    directory.
    Shipping the live checkout races with edits made meanwhile (its package hash changes between Ray's hashing and
    its upload, and the job then finds no package in the GCS)."""
    if "snapshot" not in _state:
        scratch = tempfile.mkdtemp(prefix="fd-code-")
        atexit.register(shutil.rmtree, scratch, True)
        target = Path(scratch) / "code"
        target.mkdir()
        for name in ("facediffuser", "cluster", "pipelines", "serving"):
            shutil.copytree(ROOT / name, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        _state["snapshot"] = target
    return _state["snapshot"]


_state: dict = {}


def submit(
    cluster: LocalCluster, *command: str, env_vars: dict | None = None, timeout: float = 1200, retry_for: float = 360
) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir CODE` of `command` to the cluster, waiting for it; the head's job agent can
    come up minutes after the dashboard on a busy 2-core machine, so "No available agent" is retried."""
    runtime_env = json.dumps({"env_vars": env_vars or {}})
    deadline = time.time() + retry_for
    while True:
        done = subprocess.run(
            [
                str(BIN / "ray"),
                "job",
                "submit",
                "--address",
                cluster.dashboard_url,
                "--working-dir",
                str(code_snapshot()),
                "--runtime-env-json",
                runtime_env,
                "--",
                *command,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
            env=cluster.env,
        )
        if "No available agent" not in done.stderr or time.time() > deadline:
            return done
        time.sleep(5)
