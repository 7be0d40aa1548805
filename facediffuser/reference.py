"""A reference photo → what the subject encoder sees of it: the one place that decides, for every entry point
(the pipeline, `facediffuser generate`, evaluation, the HTTP service), so one photo gives one embedding.

Modes (REFERENCE_MODES; the library's default is `whole`):
  whole   the official inference transform (METHOD.md §1): the whole photo padded square with black, then a
          bilinear antialiased resize to `size`. Loads no detector.
  face    the largest detected face, its box grown by FACE_MARGIN of its size on every side (hair, chin), then as
          `whole`.
  person  training's object crop (facediffuser/training/data.py) without its random augmentation: the largest
          face's person mask (the preprocessing split rule, facediffuser/data/masks.py), pixels outside it filled
          with uniform noise drawn from a fixed seed (the encoder was trained on noise backgrounds), cut to the
          mask's box, then as `whole`.

`face` and `person` use the preprocessing face detector (facediffuser/data/faces.py) and `person` its person
segmenter too; each is built on first use and kept for the process. A photo without a face (or, in `person`
mode, without a person around its face) is a `SubjectNotFound` ValueError naming the photo.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from facediffuser.images import load_image, pad_to_square, pil_to_tensor

REFERENCE_MODES = ("whole", "face", "person")
DEFAULT_REFERENCE_MODE = "whole"
DEFAULT_DETECTOR = "mediapipe"
OBJECT_RESOLUTION = 224  # the CLIP vision encoder's input side
FACE_MARGIN = 0.6  # face mode: the face box grown by this fraction of its size on every side
PERSON_NOISE_SEED = 0  # person mode: the background noise is the same for every call

_shared: dict[str, object] = {}  # detectors by name, and the person segmenter: built once per process
_lock = threading.Lock()  # the mediapipe and MTCNN models are not thread-safe


class SubjectNotFound(ValueError):
    """No face (or no person around it) in a photo that the reference mode crops; `code` names which."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


def check_mode(mode: str) -> str:
    if mode not in REFERENCE_MODES:
        raise ValueError(f"unknown reference mode {mode!r}; choose one of {', '.join(REFERENCE_MODES)}")
    return mode


def reference_tensor(
    photo,
    mode: str = DEFAULT_REFERENCE_MODE,
    *,
    detector=DEFAULT_DETECTOR,
    size: int = OBJECT_RESOLUTION,
    name: str | None = None,
) -> torch.Tensor:
    """A photo (path, bytes, PIL image, HxWx3 uint8 array or [3, H, W] tensor) → [3, size, size] in [0, 1].

    `detector` is a face detector's name (facediffuser.data.faces.DETECTORS) or a detector itself; only the face
    and person modes use it. `name` names the photo in errors (default: its path, else "the photo")."""
    check_mode(mode)
    name = name or (str(photo) if isinstance(photo, (str, Path)) else "the photo")
    image = load_image(photo)
    pixels = pil_to_tensor(image)
    if mode == "face":
        pixels = _face_region(pixels, _largest_face(np.asarray(image), detector, name, mode)[0])
    elif mode == "person":
        pixels = _person_region(pixels, np.asarray(image), detector, name)
    square = pad_to_square(pixels)
    return torch.nn.functional.interpolate(
        square[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )[0]


@torch.no_grad()
def embed_photo(
    subject_encoder, photo, mode: str = DEFAULT_REFERENCE_MODE, *, detector=DEFAULT_DETECTOR, name: str | None = None
) -> torch.Tensor:
    """One photo → its subject embedding [D], float32 on the CPU. Always encoded alone (batch 1): the same photo
    gives the same bits whoever asks and whatever it is encoded with.

    Attention runs on the plain math kernel: the CPU flash-attention kernel splits its work by torch's thread
    count, so its last bits would differ between a CLI (all cores) and a Serve replica (its own thread count).
    For one 257-token image the math kernel costs nothing noticeable."""
    pixels = reference_tensor(photo, mode, detector=detector, name=name)[None]
    with sdpa_kernel(SDPBackend.MATH):
        return subject_encoder.embed_images(pixels)[0].float().cpu()


def embedding_sha256(embedding: torch.Tensor) -> str:
    """sha256 of an embedding's float32 bytes: manifests record it, so runs can be compared bit for bit."""
    return hashlib.sha256(embedding.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def person_cutout(
    image: torch.Tensor, mask: torch.Tensor, box, generator: torch.Generator | None = None
) -> torch.Tensor:
    """[3, H, W] image + [H, W] person mask → the person box's pixels, uniform noise outside the mask (training's
    object crop before its augmentation; `generator` None draws the noise from torch's global generator)."""
    mask = mask.float()[None]
    noise = torch.rand(image.shape, generator=generator, dtype=image.dtype)
    noisy = image * mask + noise * (1 - mask)
    _, height, width = image.shape
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    x1, y1 = min(max(x1, 0), width - 1), min(max(y1, 0), height - 1)
    x2, y2 = max(min(x2, width), x1 + 1), max(min(y2, height), y1 + 1)
    return noisy[:, y1:y2, x1:x2]


# ------------------------------------------------------------------------------------------ the crops


def _shared_model(key: str, build):
    with _lock:
        if key not in _shared:
            _shared[key] = build()
        return _shared[key]


def detect_faces(array: np.ndarray, detector=DEFAULT_DETECTOR) -> list:
    """Faces in an HxWx3 uint8 array by a detector's name (built once per process) or a detector itself."""
    if isinstance(detector, str):
        from facediffuser.data.faces import make_detector

        detector = _shared_model(f"detector:{detector}", lambda: make_detector(detector))
    with _lock:
        return detector(array)


def _largest_face(array: np.ndarray, detector, name: str, mode: str):
    """→ (the largest face, every face found), or SubjectNotFound."""
    faces = detect_faces(array, detector)
    if not faces:
        raise SubjectNotFound(
            f"{name}: no face found in the photo (reference mode {mode} crops around one; "
            "mode whole uses the whole photo)",
            "no_face_found",
        )
    return max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1])), faces


def _face_region(pixels: torch.Tensor, face) -> torch.Tensor:
    _, height, width = pixels.shape
    x1, y1, x2, y2 = face.box
    side = max(x2 - x1, y2 - y1) * (1 + 2 * FACE_MARGIN)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left, top = round(max(0, cx - side / 2)), round(max(0, cy - side / 2))
    right, bottom = round(min(width, cx + side / 2)), round(min(height, cy + side / 2))
    return pixels[:, top:bottom, left:right]


def _person_region(pixels: torch.Tensor, array: np.ndarray, detector, name: str) -> torch.Tensor:
    from facediffuser.data.masks import PersonSegmenter, mask_box

    largest, faces = _largest_face(array, detector, name, "person")
    segmenter = _shared_model("segmenter", PersonSegmenter)
    with _lock:  # every face, as preprocessing does: a neighbour's pixels go to the neighbour
        mask = segmenter(array, faces)[faces.index(largest)]
    if not mask.any():
        raise SubjectNotFound(
            f"{name}: no person found around the face (reference mode person; mode face or whole does without)",
            "no_person_found",
        )
    generator = torch.Generator().manual_seed(PERSON_NOISE_SEED)
    return person_cutout(pixels, torch.from_numpy(mask), mask_box(mask), generator)
