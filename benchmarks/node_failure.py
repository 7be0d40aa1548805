"""A node dies under load: what the clients of `facediffuser serve` see, and how long until it has recovered.

    .venv/bin/python benchmarks/node_failure.py            # tiny models, logical GPUs (~3 min on 2 cores)

What it runs: a local cluster (cluster/local.py: a head without GPUs and three worker nodes with one
logical GPU each, CPU kernels under them: FACEDIFFUSER_CPU_UNDER_GPU=1), and on it `facediffuser serve --tiny
--num-gpus 1 --min-replicas 2 --max-replicas 2` joined with RAY_ADDRESS: two sampler replicas on two of the three
GPU nodes, the third one spare. A steady load (--concurrency requests back to back) runs until --after-s seconds after
the recovery; --kill-after-s seconds into it the node of one sampler replica (one that holds neither the ingress nor
the encoder,
when there is such a node) is killed: its raylet gets SIGKILL, which is what a node failure looks like to Ray.

Figures: the answers by status (the requests that were in flight on the dead replica get 503 `unavailable` with
Retry-After; none may get a 500 or no answer), the failed-request count (every answer but a 200), the recovery time
(from the kill until Serve runs two sampler replicas again, the new one on the spare node), and p50/p99 latency of
the 200s before the kill, during recovery and after it.

`node_failure(cluster, ...)` is the same scenario on a cluster the caller started (tests/test_node_failure.py).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.loadtest import generate_payload, run_profile, window_summary  # noqa: E402
from benchmarks.serve_process import Server  # noqa: E402
from cluster.local import LocalCluster, NodeSpec, free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "facediffuser" / "assets" / "astronaut.jpg"
GPU_NODES = ("gpu_node_a", "gpu_node_b", "gpu_node_c")


# Serve starts an HTTP proxy on every node; on one machine they would all bind the same port (SO_REUSEPORT) and
# the kernel would hand some connections to a worker node's proxy, which dies with the node and drops them. On a
# real cluster the nodes have their own addresses and clients come through the head's (or a load balancer's):
# the worker nodes' proxies get a port of their own here, so clients reach the head's proxy only.
def cluster_env() -> dict:
    return {"FACEDIFFUSER_CPU_UNDER_GPU": "1", "RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(free_port())}


SERVE_FLAGS = [
    "--tiny",
    "--num-gpus",
    "1",
    "--num-cpus",
    "0.25",
    "--min-replicas",
    "2",
    "--max-replicas",
    "2",
    "--max-batch-size",
    "2",
    "--max-steps",
    "4",
    "--max-side",
    "64",
]


def serve_actor_nodes(cluster: LocalCluster, app: str = "facediffuser") -> dict[str, set[str]]:
    """{deployment: names of the nodes holding its live replicas}, from Ray's state API (the ingress too, which
    /v1/replicas leaves out)."""
    names = {node_id: name for name, node_id in cluster.node_ids().items()}
    done = cluster._ray(
        "list",
        "actors",
        "--address",
        cluster.dashboard_url,
        "--format",
        "json",
        "--detail",
        "--filter",
        "state=ALIVE",
        "--limit",
        "1000",
    )
    found: dict[str, set[str]] = {}
    for actor in json.loads(done.stdout or "[]"):
        kind = actor.get("class_name") or ""
        prefix = f"ServeReplica:{app}:"
        if kind.startswith(prefix):
            found.setdefault(kind[len(prefix) :], set()).add(names.get(actor.get("node_id"), actor.get("node_id")))
    return found


def pick_victim(nodes: dict[str, set[str]]) -> str:
    """A node with a sampler replica: one without the ingress and the encoder if there is one (the scenario is a
    sampler's node dying; an ingress's node takes the HTTP path of its requests along, which is another test)."""
    samplers = sorted(nodes.get("Sampler", ()))
    others = nodes.get("Ingress", set()) | nodes.get("SubjectEncoder", set())
    clean = [n for n in samplers if n not in nodes.get("Ingress", set())]
    cleaner = [n for n in clean if n not in others]
    if not clean:
        raise RuntimeError(f"every sampler replica shares its node with the ingress: {nodes}")
    return (cleaner or clean)[0]


def sampler_view(url: str) -> dict:
    import httpx

    return httpx.get(f"{url}/v1/replicas", timeout=30).json()["deployments"]["Sampler"]


def wait_for_two_samplers(url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while sampler_view(url)["running"] < 2:
        if time.monotonic() > deadline:
            raise RuntimeError(f"two sampler replicas not running after {timeout:.0f} s: {sampler_view(url)}")
        time.sleep(1)


def wait_for_recovery(url: str, victim: str, since: float, limit_s: float) -> tuple[float | None, list | None]:
    """Poll until the sampler runs two replicas again, none on `victim` → (when, on perf_counter's clock; its nodes),
    or (None, None) after `limit_s` seconds from `since`."""
    while time.perf_counter() - since < limit_s:
        view = sampler_view(url)
        if view["running"] >= 2 and victim not in view["nodes"]:
            return time.perf_counter(), view["nodes"]
        time.sleep(1)
    return None, None


def answer_figures(answers: list, victim: str, killed_at: float, recovered_at: float | None) -> dict:
    """The load's answers → counts, failures and latency windows before, during and after the recovery."""
    end = max(a.done for a in answers)
    recovery_end = recovered_at if recovered_at is not None else end
    statuses = Counter(a.status for a in answers)
    failed = [a for a in answers if a.status != 200]
    return dict(
        victim=victim,
        killed_at_s=round(killed_at, 1),
        recovery_s=round(recovered_at - killed_at, 1) if recovered_at is not None else None,
        requests=len(answers),
        statuses=dict(sorted(statuses.items())),
        failed=len(failed),
        failed_codes=dict(Counter(f"{a.status} {a.error}" for a in failed)),
        failed_without_retry_after=sum(1 for a in failed if a.status == 503 and not a.retry_after),
        longest_s=round(max(a.latency for a in answers), 1),
        before=window_summary(answers, 0, killed_at),
        during=window_summary(answers, killed_at, recovery_end),
        after=window_summary(answers, recovery_end, end + 1),
        answers=answers,
    )


def node_failure(
    cluster: LocalCluster,
    workdir: Path,
    *,
    concurrency: int = 4,
    kill_after_s: float = 15,
    after_s: float = 10,
    request_timeout_s: float = 120,
    recovery_limit_s: float = 300,
    log=print,
) -> dict:
    """Serve under steady load; kill the node of one sampler replica; → the figures (see the module docstring).
    The server is stopped (SIGTERM) before returning; the cluster is left to the caller, one node fewer."""
    payload = generate_payload(
        base64.b64encode(REFERENCE.read_bytes()).decode(), steps=2, width=64, height=64, identity_scores=False
    )
    server = Server(cluster, [*SERVE_FLAGS, "--port", str(free_port())], workdir / "serve.log")
    figures: dict = {}
    load_s = kill_after_s + recovery_limit_s + after_s  # at most; it stops `after_s` after the recovery
    try:
        url = server.wait_url()
        wait_for_two_samplers(url)
        nodes = serve_actor_nodes(cluster)  # before the load: the state API takes seconds on a busy machine
        victim = pick_victim(nodes)
        answers: list = []
        origin, stop = time.perf_counter(), threading.Event()
        load = threading.Thread(
            target=run_profile,
            args=(f"{url}/v1/generate", payload, [(load_s, concurrency)]),
            kwargs={"timeout_s": request_timeout_s, "sink": answers, "origin": origin, "stop": stop.is_set},
        )
        load.start()
        time.sleep(kill_after_s)
        log(f"replicas by node before the kill: { {k: sorted(v) for k, v in nodes.items()} }; killing {victim}")
        killed_at = time.perf_counter() - origin
        cluster.kill_node(victim)
        recovered, nodes_after = wait_for_recovery(url, victim, origin + killed_at, recovery_limit_s)
        recovered_at = None if recovered is None else recovered - origin
        if recovered is not None:
            figures["sampler_nodes_after"] = nodes_after
        time.sleep(after_s)  # the load goes on a while on the recovered app, then ends
        stop.set()
        load.join(timeout=request_timeout_s + 60)
        if load.is_alive():
            raise RuntimeError("the load did not end: a request hung past its timeout")
        figures.update(answer_figures(answers, victim, killed_at, recovered_at))
        return figures
    finally:
        figures["serve_exit"] = server.stop()
        figures["serve_output"] = server.log.read_text(errors="replace")


def table(figures: dict) -> str:
    def ms(value):
        return "-" if value is None else f"{value:.2f}"

    rows = [
        f"killed {figures['victim']} at {figures['killed_at_s']} s of load; sampler back to 2 replicas "
        f"{figures['recovery_s']} s later on {figures.get('sampler_nodes_after')}",
        f"requests {figures['requests']}: statuses {figures['statuses']}; failed {figures['failed']} "
        f"({figures['failed_codes']}); 503 without Retry-After: {figures['failed_without_retry_after']}; "
        f"longest request {figures['longest_s']} s",
        "| window | answers | p50 s | p99 s |",
        "|---|---|---|---|",
    ]
    for window in ("before", "during", "after"):
        w = figures[window]
        rows.append(f"| {window} | {w['statuses']} | {ms(w['p50_s'])} | {ms(w['p99_s'])} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--after-s", type=float, default=20, help="load on the recovered app before it ends")
    parser.add_argument("--kill-after-s", type=float, default=15)
    args = parser.parse_args(argv)
    workers = [NodeSpec(name, num_cpus=1, num_gpus=1, resources={name: 1}) for name in GPU_NODES]
    with (
        tempfile.TemporaryDirectory(prefix="fd-node-failure-") as scratch,
        LocalCluster(head_cpus=2, workers=workers, env=cluster_env()) as cluster,
    ):
        figures = node_failure(
            cluster, Path(scratch), concurrency=args.concurrency, after_s=args.after_s, kill_after_s=args.kill_after_s
        )
        figures.pop("answers"), figures.pop("serve_output")
        print(table(figures))
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
