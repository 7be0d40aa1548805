"""A multi-node Ray cluster on one machine, started the way users start one: `ray start --head --block` plus
`ray start --address=HEAD --block` per worker node, each node declaring its own CPUs, logical GPUs and custom
resources. Ray schedules on logical resources, so GPU stages, replicas and Train workers are placed on "GPU nodes"
without a physical GPU (run them with FACEDIFFUSER_CPU_UNDER_GPU=1, facediffuser/devices.py, for CPU kernels).

    with LocalCluster(head_cpus=2, workers=[NodeSpec("gpu_a", num_cpus=1, num_gpus=1)]) as cluster:
        subprocess.run(["ray", "job", "submit", "--address", cluster.dashboard_url, "--", ...], env=cluster.env)

`python -m cluster.local` starts one for benchmarks (a head and two one-GPU workers by default),
prints its addresses and the environment a client needs, and stops it cleanly on Ctrl-C or SIGTERM.

Several nodes on one host need distinct ports: `ray start` has fixed defaults (dashboard agent 52365, client
server 10001, ...) that a second node on the same host (or another cluster on it) collides with, and the raylet
then aborts when its agent cannot bind. Every port of every node is picked free (cluster/ray_start.py). Each node
is its own process group (`start_new_session=True`), so `stop()` ends exactly this cluster's processes (a `ray
stop` would end every Ray on the machine) and checks with psutil that none is left.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.node_processes import cluster_processes, raylets_in_group, signal_group, stop_groups
from cluster.ray_start import BIN, NodeSpec, free_port, start_command

ROOT = Path(__file__).resolve().parents[1]
OBJECT_STORE_BYTES = 200 * 1024 * 1024


@dataclass
class _Node:
    spec: NodeSpec
    process: subprocess.Popen
    log: Path


class LocalCluster:
    """A head (no GPUs unless `head_gpus`) plus worker nodes, all on 127.0.0.1. `.address` (GCS host:port:
    RAY_ADDRESS or
    `ray.init(address=...)`), `.dashboard_url` (for `ray job submit --address`), `.env` (what a client process
    needs: token auth on, this environment's interpreter first on PATH, RAY_ADDRESS, plus `env` given here)."""

    def __init__(
        self,
        head_cpus: float = 1,
        workers: list[NodeSpec] | tuple = (),
        env: dict | None = None,
        object_store_bytes: int = OBJECT_STORE_BYTES,
        head_name: str = "head",
        head_gpus: float = 0,
    ):
        self.head = NodeSpec(head_name, num_cpus=head_cpus, num_gpus=head_gpus)
        self.worker_specs = list(workers)
        self.object_store_bytes = object_store_bytes
        self.temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: unix socket paths must stay < 108 bytes
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        # Ray 2.60's `ray start` turns on token authentication (token in ~/.ray/auth_token); clients must opt in.
        # Jobs run `python -m ...` with the node's PATH: this environment's interpreter goes first.
        self.env = {
            **os.environ,
            **(env or {}),
            "RAY_AUTH_MODE": "token",
            "RAY_ADDRESS": self.address,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        }
        self.nodes: dict[str, _Node] = {}
        self.killed: set[str] = set()  # nodes ended by kill_node (their `ray start --block` exits: expected)
        self._pgids: set[int] = set()

    # ------------------------------------------------------------------------------------------ start

    def _launch(self, spec: NodeSpec, head: bool) -> _Node:
        if spec.name in self.nodes:
            raise ValueError(f"a node named {spec.name!r} is already in this cluster")
        command = start_command(
            spec, head, self.object_store_bytes, self.temp_dir, (self.gcs_port, self.dashboard_port), self.address
        )
        log = Path(self.temp_dir) / f"ray-start-{spec.name}.log"
        with open(log, "w") as handle:
            process = subprocess.Popen(
                command,
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=ROOT,
                env=self.env,
            )
        self._pgids.add(process.pid)  # start_new_session: the node's process group id is its pid
        node = self.nodes[spec.name] = _Node(spec, process, log)
        return node

    def start(self, timeout: float = 300) -> "LocalCluster":
        """Start the head, then the workers one at a time; return once every node is alive and the head's job
        agent answers. On failure everything started is stopped and the logs are kept (the error names them)."""
        try:
            self._start_node(self.head, head=True, timeout=timeout)
            for spec in self.worker_specs:
                self._start_node(spec, head=False, timeout=timeout)
            self._wait(self._jobs_answer, timeout, "the job agent (`ray job list`)")
        except BaseException:
            self.stop(keep_logs=True)
            raise
        return self

    def add_node(self, spec: NodeSpec, timeout: float = 300) -> str:
        """Start one more worker node; → its Ray node id once it is alive."""
        self.worker_specs.append(spec)
        self._start_node(spec, head=False, timeout=timeout)
        return self.node_ids()[spec.name]

    def _start_node(self, spec: NodeSpec, head: bool, timeout: float, attempts: int = 3) -> None:
        """Launch a node and wait until it is alive. `ray start` gives its raylet 30 s (fixed) to register with
        the GCS and exits otherwise; on a loaded 2-core machine that happens, so a worker node is tried again."""
        for attempt in range(1, attempts + 1):
            node = self._launch(spec, head)
            try:
                self._wait(lambda: spec.name in self._alive_names(), timeout, f"node {spec.name}")
                return
            except RuntimeError as exc:
                if head or attempt == attempts or node.process.poll() is None:
                    raise
                print(
                    f"local cluster: node {spec.name} failed to start (attempt {attempt}): {exc}; retrying",
                    file=sys.stderr,
                    flush=True,
                )
                signal_group(node.process.pid, signal.SIGKILL)
                node.process.wait(timeout=30)
                node.log.rename(node.log.with_suffix(f".attempt{attempt}.log"))
                del self.nodes[spec.name]

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for node in list(self.nodes.values()):
                if node.spec.name not in self.killed and node.process.poll() is not None:
                    raise RuntimeError(
                        f"local cluster: `ray start` of node {node.spec.name} exited with status "
                        f"{node.process.returncode}: {self._tail(node)}"
                    )
            if ready():
                return
            time.sleep(2)
        raise RuntimeError(f"local cluster: {what} not up after {timeout:.0f} s; logs in {self.temp_dir}")

    def _tail(self, node: _Node) -> str:
        text = node.log.read_text(errors="replace") if node.log.exists() else ""
        return " | ".join(text.strip().splitlines()[-5:])

    def _ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True, timeout=timeout, env=self.env)

    def _jobs_answer(self) -> bool:
        try:
            return self._ray("job", "list", "--address", self.dashboard_url).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    # ------------------------------------------------------------------------------------------ query

    def nodes_info(self) -> list[dict]:
        """Ray's state API view of the nodes (node_id, node_name, state, resources_total, ...), dead ones too."""
        try:
            done = self._ray("list", "nodes", "--address", self.dashboard_url, "--format", "json", "--detail")
        except subprocess.TimeoutExpired:
            return []
        if done.returncode != 0:
            return []
        try:
            return json.loads(done.stdout)
        except json.JSONDecodeError:
            return []

    def _alive_names(self) -> set[str]:
        return {n["node_name"] for n in self.nodes_info() if n.get("state") == "ALIVE"}

    def node_ids(self) -> dict[str, str]:
        """{node name: Ray node id (hex)} of the live nodes."""
        return {n["node_name"]: n["node_id"] for n in self.nodes_info() if n.get("state") == "ALIVE"}

    def processes(self) -> list:
        """Every live process of this cluster: by process group, and by the temp dir in its command line."""
        return cluster_processes(self._pgids, self.temp_dir)

    # ------------------------------------------------------------------------------------------ stop

    def kill_node(self, name: str) -> None:
        """SIGKILL the node's raylet: what a node failure looks like to the rest of the cluster. Its `ray start
        --block` then ends the node's other processes and exits; `add_node` can bring in another node (a new name)."""
        raylets = raylets_in_group(self.nodes[name].process.pid)
        if not raylets:
            raise RuntimeError(f"node {name}: no raylet process found")
        self.killed.add(name)
        for proc in raylets:
            proc.kill()

    def stop(self, grace: float = 8, keep_logs: bool = False) -> None:
        """SIGTERM each node's process group (workers first), give them `grace` seconds, SIGKILL what remains
        (the head's `ray start --block` otherwise spends half a minute shutting its GCS down politely); raise if
        any process of this cluster is still alive afterwards."""
        left = stop_groups([node.process for node in self.nodes.values()], self.processes, grace)
        if left:
            raise RuntimeError(
                "local cluster: processes left after stop: "
                + ", ".join(f"{p.pid} {' '.join(p.cmdline())[:80]}" for p in left)
            )
        if not keep_logs:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------------------- the script


def parse_node(text: str) -> NodeSpec:
    """NAME:CPUS:GPUS → a NodeSpec with the custom resource {NAME: 1} (to pin work to it)."""
    name, cpus, gpus = (text.split(":") + ["1", "0"])[:3]
    return NodeSpec(name, float(cpus), float(gpus), {name: 1})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.local", description=__doc__.splitlines()[0])
    parser.add_argument("--head-cpus", type=float, default=2)
    parser.add_argument(
        "--worker",
        action="append",
        type=parse_node,
        metavar="NAME:CPUS:GPUS",
        help="a worker node (repeat); default: gpu_node_a:1:1 and gpu_node_b:1:1",
    )
    parser.add_argument(
        "--cpu-under-gpu",
        action="store_true",
        help="set FACEDIFFUSER_CPU_UNDER_GPU=1 on every node (rehearsals: CPU kernels under "
        "logical GPUs; never in production)",
    )
    args = parser.parse_args(argv)
    workers = args.worker or [parse_node("gpu_node_a:1:1"), parse_node("gpu_node_b:1:1")]
    env = {"FACEDIFFUSER_CPU_UNDER_GPU": "1"} if args.cpu_under_gpu else {}
    cluster = LocalCluster(args.head_cpus, workers, env=env)
    stopping = {"now": False}

    def on_signal(signum, frame):
        stopping["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        cluster.start()
        print(f"cluster up: {json.dumps(cluster.node_ids())}", flush=True)
        print(
            f"export RAY_ADDRESS={cluster.dashboard_url} RAY_AUTH_MODE=token"
            + (" FACEDIFFUSER_CPU_UNDER_GPU=1" if env else "")
            + f"   # GCS: {cluster.address}",
            flush=True,
        )
        print("Ctrl-C stops it", flush=True)
        while not stopping["now"]:
            time.sleep(0.5)
    finally:
        print("stopping the cluster", flush=True)
        cluster.stop()
        print("stopped; no process left", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
