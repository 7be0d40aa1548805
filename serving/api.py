"""HTTP API of the Serve app: the checks that turn bad input into 4xx, in front of its models and limits.

Everything here is plain pydantic/FastAPI (no Ray), so the rules are easy to read in one place. The models, the
schema's hard bounds and a deployment's `Limits` live in `serving.schema`, the errors in `serving.errors`; both are
re-exported here, the one place routes and deployments import the API from. `check_request` checks what a schema
cannot express.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from facediffuser.layout import check_boxes, check_scales
from facediffuser.prompts import IMAGE_TOKEN, count_markers
from serving.errors import RequestError, internal_error, log
from serving.schema import (
    DEFAULT_COMPUTE_BUDGET,
    DEFAULT_STEPS,
    HARD_MAX_SIDE,
    HARD_MAX_STEPS,
    MAX_PROMPT_CHARS,
    Base64Image,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    Limits,
    ReferenceMode,
    SchedulerName,
    StageTimings,
)

__all__ = [
    "DEFAULT_COMPUTE_BUDGET",
    "DEFAULT_STEPS",
    "HARD_MAX_SIDE",
    "HARD_MAX_STEPS",
    "MAX_PROMPT_CHARS",
    "Base64Image",
    "CheckedRequest",
    "ErrorResponse",
    "GenerateRequest",
    "GenerateResponse",
    "Limits",
    "ReferenceMode",
    "RequestError",
    "SchedulerName",
    "StageTimings",
    "check_request",
    "decode_base64",
    "internal_error",
    "log",
    "validation_message",
]


@dataclass
class CheckedRequest:
    """A validated request, references decoded from base64 to bytes (one list of photos per subject), or for
    `subjects` the saved subjects (serving.subjects.SavedSubject) the ingress read."""

    request: GenerateRequest
    references: list[list[bytes]]


_DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,", re.IGNORECASE)


def decode_base64(text: str, where: str) -> bytes:
    body = _DATA_URL.sub("", text.strip())
    try:
        data = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "invalid_base64", f"{where} is not valid base64") from None
    if not data:
        raise RequestError(400, "invalid_base64", f"{where} is empty")
    return data


def check_request(request: GenerateRequest, limits: Limits, default_size: int = 512) -> CheckedRequest:
    """The checks a schema cannot express: markers vs references, and this deployment's limits.

    `default_size` is the model's image side, used for a width or height the request leaves out (the ingress
    passes the served model's; 512 is SD1.5's).
    """
    _check_subjects(request, limits)
    _check_work(request, limits, default_size)
    # saved subjects (`subjects`) are read from the store by the ingress (serving/subject_routes.py)
    references = [] if request.references is None else _decoded_references(request, limits)
    return CheckedRequest(request=request, references=references)


def _given_subjects(request: GenerateRequest) -> tuple[int, str]:
    """(how many subjects, what they are called): exactly one of `references` and `subjects` gives them."""
    if (request.references is None) == (request.subjects is None):
        raise RequestError(
            422,
            "references_or_subjects",
            "give either `references` (base64 photos) or `subjects` (ids of saved subjects), one per "
            f"{IMAGE_TOKEN} marker; " + ("not both" if request.references is not None else "neither was given"),
        )
    if request.references is not None:
        return len(request.references), "reference(s)"
    return len(request.subjects), "subject(s)"


def _check_subjects(request: GenerateRequest, limits: Limits) -> None:
    """Markers vs references, and the layout options (boxes, subject_scales) per subject."""
    given, what = _given_subjects(request)
    markers = count_markers(request.prompt)
    if markers == 0:
        raise RequestError(
            422, "no_subjects", f"the prompt has no {IMAGE_TOKEN} marker; put one after each subject noun"
        )
    if markers > limits.max_subjects:
        raise RequestError(
            422, "too_many_subjects", f"the prompt has {markers} subjects; at most {limits.max_subjects} are allowed"
        )
    if markers != given:
        raise RequestError(
            422,
            "reference_count_mismatch",
            f"the prompt has {markers} {IMAGE_TOKEN} marker(s) but {given} {what} were given",
        )
    try:  # layout options: the library's own checks, worded for the client
        check_boxes(request.boxes, markers)
    except ValueError as exc:
        raise RequestError(422, "invalid_boxes", str(exc)) from None
    try:
        check_scales(request.subject_scales, markers)
    except ValueError as exc:
        raise RequestError(422, "invalid_subject_scales", str(exc)) from None


def _check_work(request: GenerateRequest, limits: Limits, default_size: int) -> None:
    """Steps (filled in when left out), images, boundaries, size and the compute budget they add up to."""
    if request.steps is None:
        request.steps = min(DEFAULT_STEPS, limits.max_steps)
    if request.steps > limits.max_steps:
        raise RequestError(
            422, "steps_out_of_range", f"steps={request.steps} exceeds this server's limit of {limits.max_steps}"
        )
    if request.num_images > limits.max_num_images:
        raise RequestError(422, "too_many_images", f"num_images={request.num_images} exceeds {limits.max_num_images}")
    if request.alpha > request.beta:
        raise RequestError(
            422, "boundaries_out_of_range", f"need alpha <= beta, got alpha={request.alpha}, beta={request.beta}"
        )
    for name in ("width", "height"):
        value = getattr(request, name)
        if value is not None and value > limits.max_side:
            raise RequestError(
                422, "dimensions_over_limit", f"{name}={value} exceeds this server's limit of {limits.max_side}"
            )
    if request.best_of > limits.max_best_of:
        raise RequestError(422, "best_of_out_of_range", f"best_of={request.best_of} exceeds {limits.max_best_of}")
    width, height = request.width or default_size, request.height or default_size
    # every candidate counts: best_of per image, in each round that min_identity may take
    rounds = 1 + request.max_retries if request.min_identity is not None else 1
    images = request.num_images * request.best_of * rounds
    compute = width * height * images * request.steps
    if compute > limits.compute_budget:
        raise RequestError(
            422,
            "over_compute_budget",
            f"{width}x{height} pixels x {images} image(s) (num_images x best_of x rounds) x {request.steps} steps = "
            f"{compute} exceeds this server's compute budget of {limits.compute_budget} per request; ask for fewer "
            "images or candidates, fewer steps or a smaller size",
        )


def _decoded_references(request: GenerateRequest, limits: Limits) -> list[list[bytes]]:
    """Each subject's photos, decoded from base64 (a single photo is a list of one)."""
    references = []
    for index, entry in enumerate(request.references, start=1):
        photos = entry if isinstance(entry, list) else [entry]
        if not photos:
            raise RequestError(422, "empty_reference", f"reference {index} is an empty list of photos")
        if len(photos) > limits.max_photos_per_subject:
            raise RequestError(
                422,
                "too_many_photos",
                f"reference {index} has {len(photos)} photos; at most {limits.max_photos_per_subject}",
            )
        references.append(
            [
                decode_base64(photo, f"reference {index}" if len(photos) == 1 else f"reference {index} photo {k}")
                for k, photo in enumerate(photos, start=1)
            ]
        )
    return references


def validation_message(errors: list[dict]) -> tuple[int, str, str]:
    """FastAPI's validation errors → (status, code, one readable line naming the field)."""
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        return (
            400,
            "invalid_json",
            f"the request body is not valid JSON ({detail.get('ctx', {}).get('error', 'parse error')})",
        )
    parts = []
    for error in errors[:5]:
        location = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"{location}: {error.get('msg', 'invalid')}")
    first = errors[0] if errors else {}
    field = first.get("loc", ())[-1:]
    code = {("scheduler",): "unknown_scheduler", ("reference_mode",): "unknown_reference_mode"}.get(
        field, "invalid_request"
    )
    return 422, code, "; ".join(parts)
