"""The Serve app's client-facing errors: `RequestError` (a 4xx or 5xx answer with a code) and `internal_error` (a
server fault → a 500 naming only an error id, the details in the replica's log)."""

from __future__ import annotations

import logging
import uuid

log = logging.getLogger("ray.serve")  # in a Serve replica: the replica's log file (and its stderr)


class RequestError(Exception):
    """A problem with the client's request: becomes `status` with body {"error": code, "message": message}
    (plus "error_id" for a server fault, see `internal_error`).

    Raised in any deployment; its args survive pickling, so the ingress can re-raise it as an HTTP answer.
    """

    def __init__(self, status: int, code: str, message: str, error_id: str | None = None):
        super().__init__(status, code, message, error_id)
        self.status, self.code, self.message, self.error_id = status, code, message, error_id

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def as_tuple(self) -> tuple:
        """Plain data that crosses processes; `RequestError(*t)` rebuilds it."""
        return (self.status, self.code, self.message, self.error_id)


def internal_error(where: str, exc: BaseException) -> RequestError:
    """A fault on the server's side → a 500 that names only an error id; the details go to the server log.

    The answer never holds the exception's text or type (paths, model internals); operators find the traceback
    by searching the replica logs for the id.
    """
    error_id = uuid.uuid4().hex[:16]
    log.error(
        "internal error %s during %s: %s: %s",
        error_id,
        where,
        type(exc).__name__,
        exc,
        exc_info=(type(exc), exc, exc.__traceback__),
    )
    return RequestError(
        500,
        "internal",
        f"internal server error during {where} (error id {error_id}; the details are in the server log)",
        error_id,
    )
