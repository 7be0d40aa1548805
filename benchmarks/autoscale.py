"""Autoscaling on a multi-node cluster: replicas, queue and latency over a load profile; scale-up, scale-down and
cold-start times.

    .venv/bin/python benchmarks/autoscale.py                        # tiny models, logical GPUs (~6 min on 2 cores)
    .venv/bin/python benchmarks/autoscale.py --idle-s 10 --ramp-s 10 --hold-s 40 --end-idle-s 60   # shorter

What it runs: a local cluster (cluster/local.py: a head without GPUs and two worker nodes with one logical
GPU each, CPU kernels under them: FACEDIFFUSER_CPU_UNDER_GPU=1), and on it `facediffuser serve --tiny --num-gpus 1
--min-replicas 1 --max-replicas 2` joined with RAY_ADDRESS, as a user runs it. Load from benchmarks/loadtest.py
(`run_profile`): idle, a ramp to concurrency --concurrency in four steps, hold, idle. Every --interval seconds a table
row: the sampler's running replicas and the autoscaler's target (GET /v1/replicas, read from the Serve controller),
the requests the ingress holds (queued or running: the queue), p50/p99 latency and status counts of the answers in
that interval. The same timeline is drawn as a PNG (replicas and latency over time).

Then the app is started again with --min-replicas 0 for the cold start: once both deployments are at zero, one
request (it waits for the encoder's and the sampler's replicas to start), then a warm one; and the time until
idle brings both back to zero.

Figures: time from load start until the second sampler replica runs (it takes requests from then on; polled every
second); time from load end (the last answer) until the sampler is back to one replica; the cold-start latency from
zero and a warm request's latency; the count of 5xx answers (must be 0). The table of settings it ran with is
printed too: they are the ones to carry to serving/config/serve.yaml if the figures suit.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.loadtest import generate_payload, run_profile, window_summary  # noqa: E402
from benchmarks.serve_process import Server, replicas, wait_until  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "facediffuser" / "assets" / "astronaut.jpg"


def draw(rows: list[dict], marks: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
    top.step(t, [r["replicas"] for r in rows], where="post", label="sampler replicas (running)")
    top.step(t, [r["target"] for r in rows], where="post", linestyle="--", label="autoscaler target")
    top.step(t, [r["concurrency"] for r in rows], where="post", alpha=0.5, label="client concurrency")
    top.step(t, [r["queue"] for r in rows], where="post", alpha=0.5, label="requests in the app (queue)")
    top.set_ylabel("count")
    top.legend(loc="upper right", fontsize=8)
    bottom.plot(t, [r["p50_s"] for r in rows], marker="o", label="p50 latency")
    bottom.plot(t, [r["p99_s"] for r in rows], marker="x", label="p99 latency")
    bottom.set_ylabel("seconds")
    bottom.set_xlabel("seconds since start of profile")
    bottom.legend(loc="upper right", fontsize=8)
    for name, x in marks.items():
        if x is not None:
            for axis in (top, bottom):
                axis.axvline(x, color="grey", linewidth=0.8, linestyle=":")
            top.annotate(name, (x, top.get_ylim()[1]), fontsize=7, rotation=90, va="top")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle-s", type=float, default=15)
    parser.add_argument("--ramp-s", type=float, default=20)
    parser.add_argument("--hold-s", type=float, default=60)
    parser.add_argument("--end-idle-s", type=float, default=90)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--interval", type=float, default=5, help="seconds per table row")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--target-ongoing-requests", type=float, default=2)
    parser.add_argument("--upscale-delay-s", type=float, default=5)
    parser.add_argument("--downscale-delay-s", type=float, default=30)
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--no-cold-start", action="store_true", help="skip the scale-to-zero part")
    parser.add_argument("--png", default="autoscale.png")
    return parser.parse_args(argv)


def load_stages(args) -> list[tuple[float, int]]:
    """The load profile as (seconds, concurrency) stages: idle, a ramp in four steps, hold, idle."""
    quarter = args.ramp_s / 4
    return [
        (args.idle_s, 0),
        *[(quarter, round(args.concurrency * k / 4)) for k in range(1, 5)],
        (args.hold_s, args.concurrency),
        (args.end_idle_s, 0),
    ]


def concurrency_at(stages: list[tuple[float, int]], t: float) -> int:
    end = 0.0
    for seconds, concurrency in stages:
        end += seconds
        if t < end:
            return concurrency
    return 0


def start_polling(client, origin: float) -> tuple[list[tuple[float, dict]], threading.Event, threading.Thread]:
    """Read the replicas every second in a thread until the event is set → (the readings, the event, the thread)."""
    polled: list[tuple[float, dict]] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            try:
                polled.append((time.perf_counter() - origin, replicas(client)))
            except Exception:
                pass
            done.wait(1.0)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    return polled, done, poller


def print_table(args, stages, answers: list, polled: list, origin: float, load: threading.Thread) -> list[dict]:
    """One row every --interval seconds while the load runs (and until the profile's end) → the rows."""
    total = sum(seconds for seconds, _ in stages)
    rows: list[dict] = []
    print(
        f"{'t (s)':>6} {'conc':>4} {'replicas':>8} {'target':>6} {'queue':>5} {'p50 (s)':>8} {'p99 (s)':>8}  statuses",
        flush=True,
    )
    tick = 0
    while load.is_alive() or tick * args.interval <= total:
        tick += 1
        time.sleep(max(0.0, origin + tick * args.interval - time.perf_counter()))
        t = tick * args.interval
        window = window_summary(list(answers), t - args.interval, t)
        last = polled[-1][1] if polled else {"Sampler": (0, 0), "ongoing": 0}
        row = {
            "t": t,
            "concurrency": concurrency_at(stages, t - 1e-6),
            "replicas": last["Sampler"][0],
            "target": last["Sampler"][1],
            "queue": last["ongoing"],
            **window,
        }
        rows.append(row)
        fmt = lambda x: f"{x:8.2f}" if x is not None else f"{'-':>8}"  # noqa: E731
        print(
            f"{t:6.0f} {row['concurrency']:4d} {row['replicas']:8d} {row['target']:6d} {row['queue']:5d} "
            f"{fmt(row['p50_s'])} {fmt(row['p99_s'])}  {row['statuses']}",
            flush=True,
        )
        if not load.is_alive() and t >= total:
            break
    return rows


def scaling_figures(polled: list, answers: list, load_start: float) -> tuple[dict, dict]:
    """Scale-up and scale-down times and the answers' statuses → (figures, the timeline's marks)."""
    two, two_nodes = next(
        ((t, v["sampler_nodes"]) for t, v in polled if t >= load_start and v["Sampler"][0] >= 2), (None, None)
    )
    last_answer = max((a.done for a in answers), default=None)
    back = next((t for t, v in polled if last_answer and t >= last_answer and v["Sampler"][0] == 1), None)
    statuses: dict = {}
    for a in answers:
        statuses[a.status] = statuses.get(a.status, 0) + 1
    figures = {
        "second_replica_after_load_start_s": round(two - load_start, 1) if two is not None else None,
        "scale_down_after_load_end_s": round(back - last_answer, 1) if back is not None else None,
        "requests": len(answers),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "server_errors_5xx": sum(v for k, v in statuses.items() if k >= 500 or k < 0),
        "sampler_nodes_at_two_replicas": two_nodes,
    }
    return figures, {"load start": load_start, "2nd replica": two, "load end": last_answer, "back to 1": back}


def profile_phase(cluster, args, common: list[str], payload, stages, logs: Path) -> dict:
    """The app with --min-replicas 1 under the load profile: the table, the timeline PNG → the scaling figures."""
    import httpx

    server = Server(cluster, [*common, "--min-replicas", "1", "--max-replicas", "2"], logs / "serve-1.log")
    try:
        url = server.wait_url()
        client = httpx.Client(base_url=url, timeout=120)
        wait_until(client, lambda v: v["Sampler"][0] == 1, 300)
        answers: list = []
        origin = time.perf_counter()
        polled, done, poller = start_polling(client, origin)
        load = threading.Thread(
            target=run_profile, args=(f"{url}/v1/generate", payload, stages), kwargs={"sink": answers, "origin": origin}
        )
        load.start()
        rows = print_table(args, stages, answers, polled, origin, load)
        load.join()
        done.set()
        poller.join(timeout=10)
        figures, marks = scaling_figures(polled, answers, load_start=args.idle_s)
        draw(rows, marks, Path(args.png))
        client.close()
        return figures
    finally:
        print(f"serve (min 1) stopped, exit {server.stop()}", flush=True)


def cold_start_phase(cluster, common: list[str], payload, logs: Path) -> dict:
    """The app with --min-replicas 0: a request from zero, a warm one, the time back to zero → their figures."""
    import httpx

    server = Server(cluster, [*common, "--min-replicas", "0", "--max-replicas", "1"], logs / "serve-0.log")
    try:
        url = server.wait_url()
        client = httpx.Client(base_url=url, timeout=600)
        wait_until(client, lambda v: v["Sampler"][0] == 0 and v["SubjectEncoder"][0] == 0, 300)
        timed = []
        for seed in (1, 2):
            sent = time.perf_counter()
            response = client.post("/v1/generate", json=payload(seed))
            timed.append((response.status_code, time.perf_counter() - sent))
        idle_s = wait_until(client, lambda v: v["Sampler"][0] == 0 and v["SubjectEncoder"][0] == 0, 900)
        client.close()
        return {
            "cold_start_request_s": round(timed[0][1], 2),
            "warm_request_s": round(timed[1][1], 2),
            "cold_start_statuses": [timed[0][0], timed[1][0]],
            "back_to_zero_after_last_request_s": round(idle_s, 1),
        }
    finally:
        print(f"serve (min 0) stopped, exit {server.stop()}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cluster.local import LocalCluster, NodeSpec

    load_before = os.getloadavg()[0]
    scaling = [
        "--target-ongoing-requests",
        str(args.target_ongoing_requests),
        "--upscale-delay-s",
        str(args.upscale_delay_s),
        "--downscale-delay-s",
        str(args.downscale_delay_s),
    ]
    # sampler: 1 logical GPU, a quarter CPU (a GPU node has 1 CPU and may hold an encoder (0.5) and the ingress)
    common = [
        "--tiny",
        "--num-gpus",
        "1",
        "--num-cpus",
        "0.25",
        "--max-batch-size",
        str(args.max_batch_size),
        "--max-steps",
        str(args.steps),
        "--max-side",
        str(args.size),
        *scaling,
    ]
    workers = [NodeSpec(name, num_cpus=1, num_gpus=1, resources={name: 1}) for name in ("gpu_node_a", "gpu_node_b")]
    reference = base64.b64encode(REFERENCE.read_bytes()).decode()
    payload = generate_payload(reference, steps=args.steps, width=args.size, height=args.size, identity_scores=False)
    logs = Path(tempfile.mkdtemp(prefix="autoscale-"))
    figures: dict = {"load_avg_1min_before": round(load_before, 2), "settings": dict(zip(scaling[::2], scaling[1::2]))}

    print(f"load average before: {load_before:.2f}; starting a cluster (head + gpu_node_a + gpu_node_b)", flush=True)
    with LocalCluster(head_cpus=2, workers=workers, env={"FACEDIFFUSER_CPU_UNDER_GPU": "1"}) as cluster:
        figures.update(profile_phase(cluster, args, common, payload, load_stages(args), logs))
        if not args.no_cold_start:
            figures.update(cold_start_phase(cluster, common, payload, logs))
    figures["load_avg_1min_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(figures, indent=2))
    print(f"timeline: {args.png}; serve logs: {logs}")
    return 0 if figures["server_errors_5xx"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
