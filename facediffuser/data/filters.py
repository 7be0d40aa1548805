"""The quality filters of preprocessing (the ones large face datasets such as FaceID-6M apply), as measures on one
image and the reject reasons they give. No Ray here; `stages.py` runs them, the near-duplicate filter is `dedup.py`.

Each filter rejects at the stage where its measure is first known, with a reason that states the measured value and
the threshold; `reason_code` maps a reason back to its filter, for the manifest's counts per filter:

| code | stage | measure |
|---|---|---|
| low_resolution | decode | short side of the photo as given (before resizing) |
| no_face, too_many_faces | detect | faces found |
| small_face | detect | each face box's share of the image area (the smallest counts) |
| blurry | blur | variance of the Laplacian of each face at FOCUS_SIDE × FOCUS_SIDE pixels (the least sharp counts) |
| near_duplicate | dedup | perceptual hash within --duplicate-distance bits of an earlier kept photo's (`dedup.py`) |

The defaults (and why) are in docs/preprocessing.md, "Filters".
"""

from __future__ import annotations

import re

import numpy as np
from PIL import Image

DEFAULT_MIN_SIDE = 256  # half the 512 training size: a smaller photo would be upscaled over 2× in training
DEFAULT_MIN_FACE_PERCENT = 1.0  # FaceID-6M's 4% would drop every 2- and 3-person photo (2.1%, 1.4% a face)
DEFAULT_MIN_FACE_FOCUS = 100.0  # a sharp face scores ~700, σ=1 px blur ~230, σ=2 px ~55 (astronaut, measured)
FOCUS_SIDE = 64  # faces are compared at one size, so the measure does not depend on the photo's resolution

# (stage, code, how its reason starts): the reasons below, and the two older detect reasons
REASON_CODES = (
    ("decode", "low_resolution", re.compile(r"short side \d+ px, under ")),
    ("detect", "no_face", re.compile(r"no face found")),
    ("detect", "too_many_faces", re.compile(r"\d+ faces, more than ")),
    ("detect", "small_face", re.compile(r"face \d+ at \[.*\] is [\d.]+% of the image, under ")),
    ("blur", "blurry", re.compile(r"face \d+ at \[.*\] focus [\d.]+ ")),
    ("dedup", "near_duplicate", re.compile(r"near duplicate of ")),
)
FILTER_SETTINGS = {  # code → the setting that decides it (shown beside the counts)
    "low_resolution": "min_side",
    "no_face": None,
    "too_many_faces": "max_subjects",
    "small_face": "min_face_percent",
    "blurry": "min_face_focus",
    "near_duplicate": "duplicate_distance",
}


def low_resolution(width: int, height: int, min_side: int) -> str | None:
    """The reject reason of a photo whose short side is under `min_side` pixels, else None."""
    short = min(width, height)
    if short >= min_side:
        return None
    return f"short side {short} px, under --min-side {min_side} px ({width}×{height})"


def _box_text(box) -> str:
    return str([round(float(v)) for v in box])


def face_percent(box, width: int, height: int) -> float:
    """The face box's area as a percentage of the image's."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return 100.0 * max(0.0, x2 - x1) * max(0.0, y2 - y1) / max(1, width * height)


def small_face(boxes: list, width: int, height: int, min_percent: float) -> str | None:
    """The reject reason naming the smallest face when it is under `min_percent` of the image, else None."""
    if not boxes or min_percent <= 0:
        return None
    shares = [face_percent(box, width, height) for box in boxes]
    index = int(np.argmin(shares))
    if shares[index] >= min_percent:
        return None
    return (
        f"face {index} at {_box_text(boxes[index])} is {shares[index]:.2f}% of the image, "
        f"under --min-face-percent {min_percent:g}%"
    )


def face_focus(image: np.ndarray, box) -> float:
    """Sharpness of one face: the variance of the 4-neighbour Laplacian of its grey pixels, resized to
    FOCUS_SIDE × FOCUS_SIDE (so a face of any size in a photo of any resolution is measured alike). 0 for a box
    under 2 pixels wide or high."""
    height, width = image.shape[:2]
    x1, y1 = max(0, int(round(float(box[0])))), max(0, int(round(float(box[1]))))
    x2, y2 = min(width, int(round(float(box[2])))), min(height, int(round(float(box[3]))))
    if x2 - x1 < 2 or y2 - y1 < 2:
        return 0.0
    face = Image.fromarray(np.ascontiguousarray(image[y1:y2, x1:x2])).convert("L")
    grey = np.asarray(face.resize((FOCUS_SIDE, FOCUS_SIDE), Image.Resampling.BILINEAR), np.float64)
    laplacian = grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:] - 4 * grey[1:-1, 1:-1]
    return float(laplacian.var())


def blurry_face(image: np.ndarray, boxes: list, min_focus: float) -> str | None:
    """The reject reason naming the least sharp face when its focus is under `min_focus`, else None."""
    if not boxes or min_focus <= 0:
        return None
    focus = [face_focus(image, box) for box in boxes]
    index = int(np.argmin(focus))
    if focus[index] >= min_focus:
        return None
    return (
        f"face {index} at {_box_text(boxes[index])} focus {focus[index]:.1f} (Laplacian variance at "
        f"{FOCUS_SIDE} px), under --min-face-focus {min_focus:g}"
    )


def reason_code(stage: str, reason: str) -> str:
    """The filter a reject reason comes from (REASON_CODES), or "other" (a decode error, a model's output, ...)."""
    for code_stage, code, pattern in REASON_CODES:
        if stage == code_stage and pattern.match(reason or ""):
            return code
    return "other"


def reason_counts(rejects: list[dict]) -> dict[str, dict[str, int]]:
    """{stage: {reason code: rejects}} over reject rows (dicts with stage and reason), sorted by name."""
    counts: dict[str, dict[str, int]] = {}
    for row in rejects:
        per_stage = counts.setdefault(row["stage"], {})
        code = reason_code(row["stage"], row["reason"])
        per_stage[code] = per_stage.get(code, 0) + 1
    return {stage: dict(sorted(codes.items())) for stage, codes in sorted(counts.items())}


def filter_counts(rejects: list[dict], settings: dict) -> dict[str, dict]:
    """Per filter (every one, also those that rejected nothing): its stage, the setting that decides it (name and
    value from `settings`, a PreprocessConfig's dict) and how many inputs it rejected — the manifest's "filters"."""
    by_reason = reason_counts(rejects)
    summary = {}
    for stage, code, _ in REASON_CODES:
        setting = FILTER_SETTINGS[code]
        summary[code] = {
            "stage": stage,
            "setting": None if setting is None else {f"--{setting.replace('_', '-')}": settings.get(setting)},
            "rejected": by_reason.get(stage, {}).get(code, 0),
        }
    return summary
