"""The job routes of the ingress (POST/GET/DELETE /v1/jobs, the event stream); the jobs' state is in the
JobStore deployment (serving/jobs.py), so any ingress replica answers for any job. A mixin of FaceDiffuserAPI:
it uses the ingress's `store`, `_authorize`, `_call`, `_checked` and `_generate`."""

# No `from __future__ import annotations`: FastAPI must see real types in the route signatures.

import asyncio
import time

from fastapi import Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials

from serving.api import ErrorResponse, GenerateRequest, RequestError, internal_error, log
from serving.drain import GATE
from serving.http_app import ERRORS, api, bearer
from serving.jobs import HEARTBEAT_S, TERMINAL, owner_of, sse

JOB_WAIT_S = 600.0  # a job waits this long for room in a full (or restarting) sampler before it fails


def _owner(credentials: HTTPAuthorizationCredentials | None) -> str:
    """Jobs belong to the token that made them (the gate has checked it)."""
    return owner_of(credentials.credentials if credentials is not None else None)


def _found(job: dict | None, job_id: str) -> dict:
    if job is None:  # unknown, expired, or another token's: the same answer, so ids cannot be probed
        raise RequestError(404, "job_not_found", f"no job {job_id} for this token (finished jobs are kept job_ttl_s)")
    return job


def _job_outcome(work: asyncio.Task) -> tuple[str, dict]:
    """(terminal event, its body) of a finished job task: the /v1/generate body, or the error body."""
    exc = work.exception()
    if exc is None:
        return "succeeded", work.result().model_dump()
    error = exc if isinstance(exc, RequestError) else internal_error("job", exc)
    return "failed", {
        "error": error.code,
        "message": error.message,
        **({"error_id": error.error_id} if error.error_id else {}),
    }


class JobRoutes:
    """POST /v1/jobs, GET /v1/jobs/ID, DELETE /v1/jobs/ID, GET /v1/jobs/ID/events."""

    @api.post("/v1/jobs", status_code=202, responses=ERRORS)
    async def submit_job(
        self,
        body: GenerateRequest,
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
    ):
        """The body of /v1/generate, run in the background: 202 with the job's `id` (and `Location`). Poll
        GET /v1/jobs/ID, stream GET /v1/jobs/ID/events, cancel with DELETE /v1/jobs/ID."""
        started = time.perf_counter()
        self._authorize(credentials)
        checked = await self._checked(body, credentials)  # a bad request is a 4xx now, not a failed job later
        job = await self._call(self.store.create, _owner(credentials))
        task = asyncio.create_task(self._run_job(job["id"], body, checked, started))
        self.job_tasks.add(task)
        task.add_done_callback(self.job_tasks.discard)
        location = f"{request.scope.get('root_path', '')}/v1/jobs/{job['id']}"
        return JSONResponse(
            {**job, "links": {"self": location, "events": f"{location}/events"}},
            status_code=202,
            headers={"Location": location},
        )

    async def _run_job(self, job_id: str, body: GenerateRequest, checked, started: float) -> None:
        """Runs one job to its end and records it; a cancel (any ingress, through the store) cancels the work."""
        GATE.in_flight += 1  # a stop drains running jobs like requests in flight
        self.in_flight += 1
        cancelled = self.store.wait_cancel.remote(job_id)
        work = asyncio.create_task(self._generate_waiting(body, started, checked, job_id))
        watch = asyncio.ensure_future(cancelled)
        try:
            while not work.done():
                waiting = {work} if watch.done() else {work, watch}  # a store that failed: the job still runs
                done, _ = await asyncio.wait(waiting, timeout=HEARTBEAT_S, return_when=asyncio.FIRST_COMPLETED)
                if watch in done and watch.exception() is None and watch.result():
                    work.cancel()  # cancelled: the store already says so; this stops the encoder/sampler call
                    await asyncio.gather(work, return_exceptions=True)
                    return
                if not done:
                    await self.store.touch.remote(job_id)
            event, data = _job_outcome(work)
            await self.store.record.remote(job_id, event, data)
        except Exception as exc:
            log.error("job %s could not be recorded: %s", job_id, exc)
        finally:
            watch.cancel()
            cancelled.cancel()
            GATE.in_flight -= 1
            self.in_flight -= 1

    async def _generate_waiting(self, body: GenerateRequest, started: float, checked, job_id: str):
        """_generate for a job: while the model tiers are full or restarting (503 unavailable), the job stays
        queued and tries again, instead of failing the way a synchronous request must; up to JOB_WAIT_S."""
        delay, deadline = 0.5, time.monotonic() + JOB_WAIT_S
        while True:
            try:
                return await self._generate(body, started, checked, job_id)
            except RequestError as error:
                if error.code != "unavailable" or time.monotonic() + delay > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(2 * delay, 5.0)

    @api.get("/v1/jobs/{job_id}", responses=ERRORS)
    async def job(self, job_id: str, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
        """The job's state: queued (with its position), running (step, steps, stage), succeeded (with the
        /v1/generate body as `result`), failed (with the error body as `error`) or cancelled."""
        self._authorize(credentials)
        return _found(await self._call(self.store.get, job_id, _owner(credentials)), job_id)

    @api.delete("/v1/jobs/{job_id}", responses={**ERRORS, 409: {"model": ErrorResponse}})
    async def cancel_job(self, job_id: str, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
        """Cancels a queued or running job: it leaves the queue, or stops within one denoising step."""
        self._authorize(credentials)
        job = _found(await self._call(self.store.cancel, job_id, _owner(credentials)), job_id)
        if job["state"] != "cancelled":
            raise RequestError(409, "job_finished", f"job {job_id} already {job['state']}")
        return job

    @api.get("/v1/jobs/{job_id}/events", responses=ERRORS)
    async def job_events(
        self, job_id: str, request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
    ):
        """Server-Sent Events: `queued` (position), `started`, `step` (step, steps, stage), `preview` (every
        preview_every steps: images from the latents by a fixed linear map, and the fusion mask so far), then one
        of `succeeded` (the result), `failed` (the error) or `cancelled`. Resumes after `Last-Event-ID`."""
        self._authorize(credentials)
        owner = _owner(credentials)
        after = int(request.headers.get("last-event-id") or 0)
        first = _found(await self._call(self.store.wait_events, job_id, owner, after, 0.0), job_id)

        async def stream():
            events, seen = first, after
            while True:
                for event in events:
                    seen = event["seq"]
                    yield sse(event)
                    if event["event"] in TERMINAL:
                        return
                events = await self._call(self.store.wait_events, job_id, owner, seen, 15.0)
                if events is None:  # expired while streaming
                    return
                if not events:
                    yield ": keep-alive\n\n"

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
