"""The HTTP API's schema: request/response models, the hard bounds of the schema, and a deployment's tighter
`Limits` (checked by `serving.api.check_request`, reported by `GET /v1/info`).

Static bounds live in the models, so they appear in /openapi.json.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Annotated, Literal, Union

from pydantic import BaseModel, Field

from facediffuser.best_of import MAX_BEST_OF, MAX_RETRIES
from facediffuser.prompts import DEFAULT_MAX_SUBJECTS
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
    max_best_of: int = 4  # candidates per requested image (best_of)
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
SubjectId = Annotated[str, Field(max_length=64)]  # a saved subject's id (POST /v1/subjects)


class GenerateRequest(BaseModel):
    """One prompt with a `<|image|>` marker after each subject noun, and one reference per marker, in order."""

    model_config = {"extra": "forbid"}

    prompt: str = Field(
        ..., min_length=1, max_length=MAX_PROMPT_CHARS, examples=["a man <|image|> riding a horse on the moon"]
    )
    references: list[Union[Base64Image, list[Base64Image]]] | None = Field(
        None,
        min_length=1,
        max_length=DEFAULT_MAX_SUBJECTS,
        description="base64 images, one per marker in order; an entry may be a list of several photos of that person. "
        "Give this or `subjects`",
    )
    subjects: list[SubjectId] | None = Field(
        None,
        min_length=1,
        max_length=DEFAULT_MAX_SUBJECTS,
        description="ids of saved subjects (POST /v1/subjects), one per marker in order, in place of `references`",
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
    best_of: int = Field(
        1,
        ge=1,
        le=MAX_BEST_OF,
        description="sample this many candidates per image and return the best, ranked by their weakest subject's "
        "identity similarity (a candidate with identity_warnings ranks last); every candidate's seed and scores "
        "are in the manifest",
    )
    min_identity: float | None = Field(
        None, ge=0.0, le=1.0, description="resample with new seeds until every image's weakest subject reaches this"
    )
    max_retries: int = Field(2, ge=0, le=MAX_RETRIES, description="rounds after the first, at most, for min_identity")
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
    identity_warnings: list[list[str]] | None = Field(
        None,
        description="per image, what the blend guard found: a copied face (two faces closest to one subject) or "
        "merged subjects (two subjects closest to one face); null when identities were not scored",
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
