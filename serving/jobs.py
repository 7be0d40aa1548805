"""Asynchronous jobs: their state lives in one JobStore deployment, so any ingress replica answers for any job.

    POST /v1/jobs ─▶ ingress: create() ─▶ runs encoder → sampler in a task; the sampler reports each step
    GET /v1/jobs/ID ─▶ any ingress: get()    (queued + position | running + step | succeeded | failed | cancelled)
    GET /v1/jobs/ID/events ─▶ any ingress: wait_events() long-polls, streamed as Server-Sent Events
    DELETE /v1/jobs/ID ─▶ any ingress: cancel(); the ingress running it sees wait_cancel() return and cancels
                          its sampler call, which drops the job's rows from its batch at the next step

A job belongs to its owner (a digest of the bearer token that made it): another owner gets None, i.e. 404.
Finished jobs are kept `ttl_s`, then deleted; a job whose runner stopped reporting for `lost_after_s` (its
ingress replica died) fails as `lost`. `JobBook` is the plain-Python logic; `JobStore` is its Serve deployment.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field

from ray import serve

from serving.metrics import job_metrics

TERMINAL = ("succeeded", "failed", "cancelled")
HEARTBEAT_S = 30.0  # a job's runner (its ingress replica) says it is alive at least this often
JOB_LOST_AFTER_S = 4 * HEARTBEAT_S  # silent this long: the runner is gone, the job fails as `lost`
ANONYMOUS = "anonymous"


def owner_of(token: str | None) -> str:
    """The owner key of a caller: a digest of its bearer token (never the token itself), or `anonymous`."""
    return hashlib.sha256(token.encode()).hexdigest()[:32] if token else ANONYMOUS


@dataclass
class Job:
    id: str
    owner: str
    created: float
    state: str = "queued"
    updated: float = 0.0
    finished: float | None = None
    progress: dict | None = None  # {"step", "steps", "stage"} while running
    result: dict | None = None  # the /v1/generate body (succeeded)
    error: dict | None = None  # the error body (failed)
    events: list[dict] = field(default_factory=list)  # {"seq", "event", "data"}; earlier previews lose their pictures

    def view(self, position: int | None) -> dict:
        """What GET /v1/jobs/ID answers."""
        body = {"id": self.id, "state": self.state, "created": self.created, "updated": self.updated}
        if self.state == "queued":
            body["position"] = position
        if self.progress is not None and self.state == "running":
            body["progress"] = self.progress
        if self.result is not None:
            body["result"] = self.result
        if self.error is not None:
            body["error"] = self.error
        return body


def sse(event: dict) -> str:
    """One Server-Sent Event: `id` is the sequence number (a client resumes with Last-Event-ID), data is JSON."""
    return f"id: {event['seq']}\nevent: {event['event']}\ndata: {json.dumps(event['data'], separators=(',', ':'))}\n\n"


class JobBook:
    """Jobs by id: creation, events in order (with a sequence number for resuming a stream), cancellation, expiry."""

    def __init__(self, ttl_s: float = 3600.0, lost_after_s: float = JOB_LOST_AFTER_S, clock=time.time, on_change=None):
        self.ttl_s, self.lost_after_s, self.clock = ttl_s, lost_after_s, clock
        self.on_change = on_change  # called with each event appended (the store's metrics)
        self.jobs: dict[str, Job] = {}
        self.changed = asyncio.Event()  # set (and replaced) on every change: wakes long polls
        self.cancelled: dict[str, asyncio.Event] = {}

    def _touch(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def _find(self, job_id: str, owner: str | None) -> Job | None:
        job = self.jobs.get(job_id)
        return job if job is not None and (owner is None or job.owner == owner) else None

    def position(self, job: Job) -> int | None:
        """1 + the queued jobs created before this one (across every ingress), while it is queued."""
        if job.state != "queued":
            return None
        return 1 + sum(1 for other in self.jobs.values() if other.state == "queued" and other.created < job.created)

    def create(self, owner: str) -> dict:
        now = self.clock()
        job = Job(id=uuid.uuid4().hex, owner=owner, created=now, updated=now)
        self.jobs[job.id] = job
        self.cancelled[job.id] = asyncio.Event()
        self._append(job, "queued", {"position": self.position(job)})
        return job.view(self.position(job))

    def get(self, job_id: str, owner: str) -> dict | None:
        self.sweep()
        job = self._find(job_id, owner)
        return None if job is None else job.view(self.position(job))

    def record(self, job_id: str, event: str, data: dict) -> bool:
        """An event from the job's runner: `step` ({"step", "steps", "stage"}), `preview`, or a terminal state with
        its body. → False when the job is gone or already finished (the runner may stop)."""
        job = self._find(job_id, None)
        if job is None or job.state in TERMINAL:
            return False
        if event == "started":  # the sampler took it into a batch
            job.state = "running"
        elif event == "step":
            job.state, job.progress = "running", data
        elif event in TERMINAL:
            job.state, job.finished, job.progress = event, self.clock(), None
            if event == "succeeded":
                job.result = data
            elif event == "failed":
                job.error = data
        elif event == "preview":
            for old in job.events:  # keep the newest preview's pictures only: a stream resumed later skips stale ones
                if old["event"] == "preview":
                    old["data"] = {"step": old["data"].get("step"), "superseded": True}
        else:
            raise ValueError(f"unknown job event {event!r}")
        self._append(job, event, data)
        return True

    def _append(self, job: Job, event: str, data: dict) -> None:
        job.updated = self.clock()
        job.events.append({"seq": len(job.events) + 1, "event": event, "data": data})
        self._touch()
        if self.on_change is not None and event not in ("step", "preview"):  # states change; steps do not
            self.on_change(event)

    def touch(self, job_id: str) -> None:
        """The runner's heartbeat while nothing else happens (a long queue): the job is not lost."""
        job = self._find(job_id, None)
        if job is not None and job.state not in TERMINAL:
            job.updated = self.clock()

    def cancel(self, job_id: str, owner: str) -> dict | None:
        """Cancels a queued or running job (its runner is told through wait_cancel). → its view, None if unknown."""
        job = self._find(job_id, owner)
        if job is None:
            return None
        if job.state not in TERMINAL:
            self.record(job_id, "cancelled", {})
            self.cancelled[job_id].set()
        return job.view(None)

    async def wait_cancel(self, job_id: str) -> bool:
        """Returns True when the job is cancelled (False at once when it is unknown)."""
        event = self.cancelled.get(job_id)
        if event is None:
            return False
        await event.wait()
        return True

    async def wait_events(self, job_id: str, owner: str, after: int, timeout_s: float) -> list[dict] | None:
        """Events with seq > `after`, waiting up to `timeout_s` for one; [] on timeout, None if unknown."""
        deadline = self.clock() + timeout_s
        while True:
            job = self._find(job_id, owner)
            if job is None:
                return None
            fresh = job.events[after:]
            if fresh or job.state in TERMINAL or self.clock() >= deadline:
                return fresh
            try:
                await asyncio.wait_for(self.changed.wait(), timeout=max(0.0, deadline - self.clock()))
            except asyncio.TimeoutError:
                pass

    def sweep(self) -> None:
        """Deletes finished jobs older than ttl_s; fails running/queued ones whose runner went quiet (lost_after_s)."""
        now, expired = self.clock(), 0
        for job in list(self.jobs.values()):
            if job.state in TERMINAL and job.finished is not None and now - job.finished > self.ttl_s:
                del self.jobs[job.id]
                self.cancelled.pop(job.id, None)
                expired += 1
            elif job.state not in TERMINAL and now - job.updated > self.lost_after_s:
                self.record(
                    job.id,
                    "failed",
                    {
                        "error": "lost",
                        "message": "the replica running this job stopped "
                        "reporting (it died or was restarted); submit it again",
                    },
                )
        if expired and self.on_change is not None:
            self.on_change("expired")

    def counts(self) -> dict[str, int]:
        counts = {state: 0 for state in ("queued", "running", *TERMINAL)}
        for job in self.jobs.values():
            counts[job.state] += 1
        return counts


@serve.deployment(name="JobStore", num_replicas=1, max_ongoing_requests=100_000, ray_actor_options={"num_cpus": 0})
class JobStore:
    """The JobBook of an application, in one replica; long polls wait here, so it takes many calls at once."""

    def __init__(self, ttl_s: float, lost_after_s: float):
        self.book = JobBook(ttl_s, lost_after_s, on_change=self._count)
        self.metrics = job_metrics()
        self._sweeper = asyncio.get_event_loop().create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(min(60.0, self.book.ttl_s / 4, self.book.lost_after_s / 4))
            self.book.sweep()

    def create(self, owner: str) -> dict:
        return self.book.create(owner)

    def get(self, job_id: str, owner: str) -> dict | None:
        return self.book.get(job_id, owner)

    def record(self, job_id: str, event: str, data: dict) -> bool:
        return self.book.record(job_id, event, data)

    def touch(self, job_id: str) -> None:
        self.book.touch(job_id)

    def record_many(self, events: list[tuple[str, str, dict]]) -> None:
        """(job id, event, data) of several jobs at once: the sampler reports a whole batch's step in one call."""
        for job_id, event, data in events:
            self.book.record(job_id, event, data)

    def cancel(self, job_id: str, owner: str) -> dict | None:
        return self.book.cancel(job_id, owner)

    async def wait_cancel(self, job_id: str) -> bool:
        return await self.book.wait_cancel(job_id)

    async def wait_events(self, job_id: str, owner: str, after: int, timeout_s: float) -> list[dict] | None:
        return await self.book.wait_events(job_id, owner, after, timeout_s)

    def counts(self) -> dict[str, int]:
        return self.book.counts()

    def _count(self, event: str) -> None:
        if event in TERMINAL:
            self.metrics["finished"].inc(tags={"state": event})
        for state, count in self.book.counts().items():
            self.metrics["jobs"].set(count, tags={"state": state})
