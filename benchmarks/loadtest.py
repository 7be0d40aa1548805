"""Bounded load generator for the Serve app over loopback HTTP: a fixed number of requests at a fixed
concurrency, then a report (throughput, p50/p99 latency, status counts, batch sizes). It always ends.

    python -m benchmarks.loadtest --url http://127.0.0.1:8000 --reference face.jpg --concurrency 8 --requests 32

`run_profile` varies the concurrency over time (idle, ramp, hold, idle: benchmarks/autoscale.py and the
autoscaling tests). Used by the tests and by benchmarks/serve.py and benchmarks/autoscale.py.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx
import numpy as np


@dataclass
class LoadReport:
    concurrency: int
    requests: int
    seconds: float
    statuses: dict[int, int]
    latencies_s: list[float] = field(repr=False)
    batch_sizes: list[int] = field(repr=False)
    stage_timings: list[dict] = field(default_factory=list, repr=False)  # each 200 answer's "timings"

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def throughput(self) -> float:
        """Successful requests per second of wall time."""
        return self.ok / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q)) if self.latencies_s else float("nan")

    def summary(self) -> dict:
        return {
            "concurrency": self.concurrency,
            "requests": self.requests,
            "ok": self.ok,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "seconds": round(self.seconds, 3),
            "requests_per_s": round(self.throughput, 3),
            "p50_s": round(self.percentile(50), 4),
            "p99_s": round(self.percentile(99), 4),
            "mean_batch_size": round(float(np.mean(self.batch_sizes)), 2) if self.batch_sizes else None,
            "max_batch_size": max(self.batch_sizes) if self.batch_sizes else None,
            "mean_stage_s": {  # stages an answer leaves out or sets to null (identity_s when not asked) are skipped
                stage: round(float(np.mean(values)), 4)
                for stage in (self.stage_timings[0] if self.stage_timings else {})
                if (values := [t[stage] for t in self.stage_timings if t.get(stage) is not None])
            },
        }


def run_load(
    url: str,
    payload: Callable[[int], dict],
    *,
    concurrency: int,
    requests: int,
    headers: dict | None = None,
    timeout_s: float = 300.0,
) -> LoadReport:
    """POST `payload(i)` for i in range(requests) to `url` with `concurrency` requests in flight.

    Latencies are recorded for successful (200) answers only; every answer's status is counted.
    """
    if concurrency < 1 or requests < 1:
        raise ValueError("concurrency and requests must be >= 1")
    return asyncio.run(_load(url, payload, concurrency, requests, headers, timeout_s))


async def _load(
    url: str, payload: Callable[[int], dict], concurrency: int, requests: int, headers: dict | None, timeout_s: float
) -> LoadReport:
    """run_load's body: `concurrency` workers taking request numbers from one queue."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    batch_sizes: list[int] = []
    stage_timings: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits, headers=headers) as client:

        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                sent = time.perf_counter()
                try:
                    response = await client.post(url, json=payload(i))
                except httpx.HTTPError:
                    statuses[-1] += 1  # connection-level failure
                    continue
                statuses[response.status_code] += 1
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - sent)
                    body = response.json()
                    batch_sizes.append(int(body.get("batch_requests", 1)))
                    stage_timings.append(body.get("timings", {}))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return LoadReport(concurrency, requests, seconds, dict(statuses), latencies, batch_sizes, stage_timings)


@dataclass
class Answer:
    """One request of a profile: when it was sent and answered (seconds since the profile began), its status
    (-1: no HTTP answer) and, for a 200, its latency; a 503's Retry-After header and error code."""

    sent: float
    done: float
    status: int
    retry_after: str | None = None
    error: str | None = None  # the error code of a JSON error answer ({"error": code, ...})

    @property
    def latency(self) -> float:
        return self.done - self.sent


def run_profile(
    url: str,
    payload: Callable[[int], dict],
    stages: list[tuple[float, int]],
    *,
    headers: dict | None = None,
    timeout_s: float = 300.0,
    stop: Callable[[], bool] | None = None,
    sink: list | None = None,
    origin: float | None = None,
) -> list[Answer]:
    """A load that changes over time: `stages` = [(seconds, concurrency), ...] in order (concurrency 0 = idle);
    each of max(concurrency) workers sends back-to-back requests while its index is below the current stage's
    concurrency. Ends when the stages are over (or `stop()` says so) and every request sent has its answer; a
    request is never cut off by a stage's end. → every answer, in the order they came (also appended to `sink`
    as they come, for a live view). Times count from `origin` (a time.perf_counter() value; default: now)."""
    if not stages or any(seconds < 0 or concurrency < 0 for seconds, concurrency in stages):
        raise ValueError("stages must be (seconds >= 0, concurrency >= 0) pairs")
    ends, total = [], 0.0
    for seconds, _ in stages:
        total += seconds
        ends.append(total)
    width = max(concurrency for _, concurrency in stages)
    return asyncio.run(_profile(url, payload, stages, ends, width, headers, timeout_s, stop, sink, origin))


async def _profile(
    url: str,
    payload: Callable[[int], dict],
    stages: list[tuple[float, int]],
    ends: list[float],
    width: int,
    headers: dict | None,
    timeout_s: float,
    stop: Callable[[], bool] | None,
    sink: list | None,
    origin: float | None,
) -> list[Answer]:
    """run_profile's body: `width` workers, each sending while its index is below the stage's concurrency."""
    answers: list[Answer] = [] if sink is None else sink
    counter = iter(range(10**12))
    began = time.perf_counter() if origin is None else origin

    def now() -> float:
        return time.perf_counter() - began

    def concurrency_at(t: float) -> int | None:  # None: the profile is over
        if stop is not None and stop():
            return None
        return next((c for (_, c), end in zip(stages, ends) if t < end), None)

    limits = httpx.Limits(max_connections=max(width, 1), max_keepalive_connections=max(width, 1))
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits, headers=headers) as client:

        async def worker(index: int) -> None:
            while (active := concurrency_at(now())) is not None:
                if index >= active:
                    await asyncio.sleep(0.05)
                    continue
                sent = now()
                retry_after = error = None
                try:
                    response = await client.post(url, json=payload(next(counter)))
                    status, retry_after = response.status_code, response.headers.get("retry-after")
                    if status != 200:
                        try:
                            error = response.json().get("error")
                        except ValueError:
                            error = None
                except httpx.HTTPError:
                    status = -1
                answers.append(Answer(sent, now(), status, retry_after, error))

        await asyncio.gather(*(worker(i) for i in range(width)))
    return answers


def window_summary(answers: list[Answer], start: float, end: float) -> dict:
    """Answers that came in [start, end): their status counts and p50/p99 latency of the 200s."""
    inside = [a for a in answers if start <= a.done < end]
    latencies = [a.latency for a in inside if a.status == 200]
    return {
        "statuses": dict(sorted(Counter(a.status for a in inside).items())),
        "p50_s": float(np.percentile(latencies, 50)) if latencies else None,
        "p99_s": float(np.percentile(latencies, 99)) if latencies else None,
    }


def generate_payload(
    reference_b64: str, *, steps: int = 4, prompt: str = "a man <|image|> on a beach", seed_base: int = 0, **extra
) -> Callable[[int], dict]:
    """Request i asks for one image with seed `seed_base + i` (distinct work, same shape: batchable)."""

    def payload(i: int) -> dict:
        return {"prompt": prompt, "references": [reference_b64], "steps": steps, "seed": seed_base + i, **extra}

    return payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="base URL of the app, e.g. http://127.0.0.1:8000")
    parser.add_argument("--reference", required=True, help="a photo with a face")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--token", default=None, help="bearer token, if the server requires one")
    args = parser.parse_args(argv)
    reference = base64.b64encode(Path(args.reference).read_bytes()).decode()
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else None
    report = run_load(
        args.url.rstrip("/") + "/v1/generate",
        generate_payload(reference, steps=args.steps),
        concurrency=args.concurrency,
        requests=args.requests,
        headers=headers,
    )
    print(json.dumps(report.summary(), indent=2))
    return 0 if report.ok == report.requests else 1


if __name__ == "__main__":
    raise SystemExit(main())
