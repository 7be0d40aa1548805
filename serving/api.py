"""HTTP API of the Serve app: request/response models, limits, and the checks that turn bad input into 4xx.

Everything here is plain pydantic/FastAPI (no Ray), so the rules are easy to read in one place. Static bounds
live in the models (they appear in /openapi.json); the deployment's configurable, tighter limits (`Limits`)
are checked by `check_request` and reported by `GET /v1/info`.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import uuid
from dataclasses import asdict, dataclass
from typing import Literal, Union

from pydantic import BaseModel, Field

from facediffuser.layout import check_boxes, check_scales
from facediffuser.prompts import DEFAULT_MAX_SUBJECTS, IMAGE_TOKEN, count_markers
from facediffuser.reference import REFERENCE_MODES
from facediffuser.schedulers import SCHEDULERS

SchedulerName = Literal[tuple(SCHEDULERS)]  # type: ignore[valid-type]
ReferenceMode = Literal[tuple(REFERENCE_MODES)]  # type: ignore[valid-type]

# Hard bounds of the schema; a deployment may only tighten them (Limits).
HARD_MAX_STEPS = 200
HARD_MAX_SIDE = 2048
MAX_PROMPT_CHARS = 2000
DEFAULT_STEPS = 50
# Compute budget default: pixels x images x steps of the largest documented request, 4 images of SD1.5's
# 512x512 at the default 50 steps (= 1 image of 1024x1024 at 50 steps). See docs/serving.md.
DEFAULT_COMPUTE_BUDGET = 512 * 512 * 4 * DEFAULT_STEPS

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


@dataclass(frozen=True)
class Limits:
    """What one deployment accepts (tighter than the schema's hard bounds; see /v1/info)."""

    max_payload_bytes: int = 20 * 1024 * 1024
    max_steps: int = 100
    max_side: int = 1024  # width and height, pixels
    max_subjects: int = DEFAULT_MAX_SUBJECTS
    max_photos_per_subject: int = 4
    max_reference_pixels: int = 4096 * 4096
    max_num_images: int = 4
    # width x height x num_images x steps of one request; each limit above alone would let one request ask for
    # 4 x 1024^2 x 100 steps, 8x this
    compute_budget: int = DEFAULT_COMPUTE_BUDGET

    def __post_init__(self):
        for name, value in asdict(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"limits.{name} must be a positive integer, got {value!r}")

    def as_dict(self) -> dict:
        return asdict(self)


Base64Image = str  # standard base64 of the image file's bytes; a "data:image/...;base64," prefix is accepted


class GenerateRequest(BaseModel):
    """One prompt with a `<|image|>` marker after each subject noun, and one reference per marker, in order."""

    model_config = {"extra": "forbid"}

    prompt: str = Field(
        ..., min_length=1, max_length=MAX_PROMPT_CHARS, examples=["a man <|image|> riding a horse on the moon"]
    )
    references: list[Union[Base64Image, list[Base64Image]]] = Field(
        ...,
        min_length=1,
        max_length=DEFAULT_MAX_SUBJECTS,
        description="base64 images, one per marker in order; an entry may be a list of several photos of that person",
    )
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    num_images: int = Field(1, ge=1, le=4)
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="image k uses seed + k; random when omitted")
    steps: int | None = Field(
        None, ge=1, le=HARD_MAX_STEPS, description="default: 50, or the server's max_steps if lower"
    )
    guidance_scale: float = Field(5.0, ge=0.0, le=30.0)
    alpha: float = Field(0.3, ge=0.0, le=1.0, description="fraction of the schedule before fusion starts")
    beta: float = Field(0.6, ge=0.0, le=1.0, description="fraction of the schedule before SDM-only sampling")
    width: int | None = Field(None, ge=64, le=HARD_MAX_SIDE, multiple_of=8, description="default: the model's size")
    height: int | None = Field(None, ge=64, le=HARD_MAX_SIDE, multiple_of=8)
    scheduler: SchedulerName = "ddim"
    return_masks: bool = False
    boxes: list[list[float]] | None = Field(
        None,
        description="layout: [x0, y0, x1, y1] fractions of the image, one per marker in order; the SDM may win "
        "fusion pixels only inside them and each subject's attention stays in its own box",
        examples=[[[0.05, 0.1, 0.5, 0.9]]],
    )
    subject_scales: list[float] | None = Field(
        None, description="per marker: how strongly the subject's photo counts (1 = full, 0 = the noun alone)"
    )
    identity_scores: bool = Field(True, description="score each image's faces against the references (dlib)")
    reference_mode: ReferenceMode | None = Field(
        None,
        description="what the subject encoder sees of each photo: whole (the photo padded square), face (the "
        "largest face with a margin) or person (the segmented person); default: the server's (GET /v1/info)",
    )


class StageTimings(BaseModel):
    encode_s: float
    queue_s: float
    denoise_s: float
    decode_s: float
    identity_s: float | None = None
    total_s: float


class GenerateResponse(BaseModel):
    images: list[str] = Field(description="base64 PNG images")
    seeds: list[int]
    fusion_masks: str | None = Field(None, description="base64 PNG: a row per image, a column per fusion step")
    overlays: list[str] | None = Field(None, description="base64 PNG: each image tinted where the SDM dominated")
    batch_size: int = Field(description="images denoised together in this request's snf_denoise call")
    batch_requests: int = Field(description="requests served by that call")
    timings: StageTimings
    manifest: dict
    identity_scores: list[list[float | None]] | None = Field(
        None,
        description="per image, per subject: dlib cosine similarity to the reference, in [-1, 1]; null: no "
        "face. The whole field is null when not asked for, or when scoring failed (see warnings)",
    )
    warnings: list[str] = Field(
        default_factory=list,
        description="what went wrong without failing the request, "
        "e.g. identity scoring (the images are still returned)",
    )


class ErrorResponse(BaseModel):
    error: str
    message: str
    error_id: str | None = Field(
        None, description="server faults (500) only: quote it; the details are in the server log"
    )


@dataclass
class CheckedRequest:
    """A validated request, references decoded from base64 to bytes (one list of photos per subject)."""

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
    return CheckedRequest(request=request, references=_decoded_references(request, limits))


def _check_subjects(request: GenerateRequest, limits: Limits) -> None:
    """Markers vs references, and the layout options (boxes, subject_scales) per subject."""
    markers = count_markers(request.prompt)
    if markers == 0:
        raise RequestError(
            422, "no_subjects", f"the prompt has no {IMAGE_TOKEN} marker; put one after each subject noun"
        )
    if markers > limits.max_subjects:
        raise RequestError(
            422, "too_many_subjects", f"the prompt has {markers} subjects; at most {limits.max_subjects} are allowed"
        )
    if markers != len(request.references):
        raise RequestError(
            422,
            "reference_count_mismatch",
            f"the prompt has {markers} {IMAGE_TOKEN} marker(s) but {len(request.references)} reference(s) were given",
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
    width, height = request.width or default_size, request.height or default_size
    compute = width * height * request.num_images * request.steps
    if compute > limits.compute_budget:
        raise RequestError(
            422,
            "over_compute_budget",
            f"{width}x{height} pixels x {request.num_images} image(s) x {request.steps} steps = {compute} exceeds this "
            f"server's compute budget of {limits.compute_budget} per request; ask for fewer images, fewer steps or a "
            "smaller size",
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
