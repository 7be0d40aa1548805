"""The ingress's gate: bearer-token auth and the body-size limit, checked before a route reads the request."""

from __future__ import annotations

import hashlib
import hmac

from fastapi.responses import JSONResponse

from serving.api import Limits
from serving.drain import GATE

RETRY_AFTER_S = 2  # the Retry-After of every 503 (busy, restarting, not ready)
# Paths served without a token (probes, the page, the API docs); every other path needs it when one is set.
PUBLIC_PATHS = frozenset({"/", "/healthz", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"})
API_PATHS = frozenset({"/v1/generate", "/v1/jobs", "/v1/subjects", "/v1/info", "/v1/stats", "/v1/replicas"})  # metrics
UNAUTHORIZED = "a valid 'Authorization: Bearer <token>' header is required"
DRAINING = "the service is stopping: requests in flight finish, new ones are refused; retry shortly"
BUSY = "the service is at capacity ({admit} requests in progress on this ingress); retry shortly"


def error_response(status: int, code: str, message: str, error_id: str | None = None) -> JSONResponse:
    """The API's one error shape, {"error": code, "message": text[, "error_id"]}; a 503 says when to retry."""
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    body = {"error": code, "message": message, **({"error_id": error_id} if error_id else {})}
    return JSONResponse(body, status_code=status, headers=headers)


def token_matches(given: bytes, token: str) -> bool:
    """Timing-safe: compares fixed-length digests, so neither the token's bytes nor its length leak."""
    return hmac.compare_digest(hashlib.sha256(given).digest(), hashlib.sha256(token.encode()).digest())


class Gate:
    """Pure ASGI middleware in front of every route: authorise, then read the body within max_payload_bytes.

    0. While the app drains (serving/drain.py), every request is 503 `draining` with Retry-After; the others are
       counted while inside (GATE.in_flight), so the stop knows when they are done.
       With `admit` (the ingress's max_ongoing_requests) requests and jobs inside, a POST is 503 `busy` before
       its body is read. Serve's own refusal (its queue full) is plain text, so the gate refuses first: Serve hands
       this replica more requests than it admits (serving/app.py), and those extra slots only carry refusals.
    1. With a token set, every path but PUBLIC_PATHS needs it: 401 before a byte of the body is read or parsed.
    2. A declared Content-Length over the limit: 413 at once. Otherwise the body is read chunk by chunk with a
       running count, and 413 as soon as it passes the limit (a chunked upload is never buffered beyond it).
    3. The body read so far is handed to the route as one message.
    Settings come from the app's state (`token`, `limits`, `admit`), set by the ingress replica.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if GATE.draining:  # `facediffuser serve` is stopping (serving/drain.py): new requests go elsewhere or wait
            return await error_response(503, "draining", DRAINING)(scope, receive, _counted(scope, send))
        admit = getattr(scope["app"].state, "admit", None)
        # only POSTs carry a body and start work; reading a job, its events or cancelling it is cheap
        if admit is not None and GATE.in_flight >= admit and scope.get("method") == "POST":
            return await error_response(503, "busy", BUSY.format(admit=admit))(scope, receive, _counted(scope, send))
        GATE.in_flight += 1
        try:
            return await self._checked(scope, receive, _counted(scope, send))
        finally:
            GATE.in_flight -= 1

    async def _checked(self, scope, receive, send):
        state = scope["app"].state
        token: str | None = getattr(state, "token", None)
        limits: Limits | None = getattr(state, "limits", None)
        headers = dict(scope.get("headers") or [])
        if token is not None and _route_path(scope) not in PUBLIC_PATHS:
            scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not token_matches(given.strip(), token):
                return await error_response(401, "unauthorized", UNAUTHORIZED)(scope, receive, send)
        if limits is None:
            return await self.app(scope, receive, send)
        limit = limits.max_payload_bytes
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return await error_response(
                413, "payload_too_large", f"the body is {int(declared)} bytes; the limit is {limit}"
            )(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nobody to answer
                return None
            size += len(message.get("body", b""))
            if size > limit:
                return await error_response(
                    413, "payload_too_large", f"the body is larger than the limit of {limit} bytes"
                )(scope, receive, send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body, handed = b"".join(chunks), False
        del chunks

        async def replay():
            nonlocal handed
            if not handed:
                handed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        return await self.app(scope, replay, send)


def _counted(scope, send):
    """`send` that counts the answer's status per route in the app's `metrics` (set in a replica; tests without
    Ray have none)."""
    metrics = getattr(scope["app"].state, "metrics", None)
    if metrics is None:
        return send

    async def counting(message):
        if message["type"] == "http.response.start":
            metrics["requests"].inc(tags={"route": route_label(_route_path(scope)), "status": str(message["status"])})
        await send(message)

    return counting


def route_label(path: str) -> str:
    """A metric label for a path: job ids collapse into {id}, so the label has few values."""
    parts = path.rstrip("/").split("/")
    if parts[1:3] == ["v1", "jobs"] and len(parts) > 3:
        return "/v1/jobs/{id}" + ("/events" if parts[4:5] == ["events"] else "")
    if parts[1:3] == ["v1", "subjects"] and len(parts) > 3:
        return "/v1/subjects/{id}"
    return path if path in PUBLIC_PATHS or path in API_PATHS else "other"


def _route_path(scope) -> str:
    """The request's path inside the app (without the Serve route prefix, which arrives as root_path)."""
    path, root = scope.get("path", "/"), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path or "/"
