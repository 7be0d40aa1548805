"""The ingress's FastAPI application: its description, the bearer scheme, the error shapes and the gate. Routes are
methods of the Ingress deployment (serving/ingress.py) and of its job routes (serving/job_routes.py)."""

# No `from __future__ import annotations`: FastAPI must see real types.

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPBearer

from serving.api import ErrorResponse, RequestError, internal_error, validation_message
from serving.gate import Gate, error_response
from serving.settings import TOKEN_ENV

api = FastAPI(
    title="Face-diffuser",
    version="1.0",
    description="Subject-to-image generation of given people: a prompt with a `<|image|>` marker after each "
    'subject noun, and one reference photo per marker. Errors are JSON: {"error": code, "message": text}.',
)
bearer = HTTPBearer(auto_error=False, description=f"required when the server sets ${TOKEN_ENV}")
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 413, 422, 500, 503)}


@api.exception_handler(RequestError)
async def _request_error(request: Request, exc: RequestError):
    return error_response(exc.status, exc.code, exc.message, exc.error_id)


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception):
    error = internal_error(f"{request.method} {request.url.path}", exc)
    return error_response(error.status, error.code, error.message, error.error_id)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    return error_response(*validation_message(exc.errors()))


api.add_middleware(Gate)
