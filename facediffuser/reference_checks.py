"""Reference photos checked at the door: the one function (`check_references`) that the pipeline, the CLI, the HTTP
service, the web page (through the service) and evaluation all use, so a photo is accepted or refused the same way
everywhere.

A photo that cannot serve is refused (`ReferenceRefused`, a ValueError naming the photo and the reason; 422 over
HTTP, exit 2 in the CLI). A usable but weak one passes with a warning, which the caller reports in its response
and manifest. The checks, each threshold in `ReferenceThresholds`:
  faces      exactly one face. With several, the largest is used only when it clearly is the subject (at least
             `dominance` times the area of the next); otherwise the photo is refused, naming the count.
  size       the face's short side at least `min_face_px` pixels of the photo (warning below `weak_face_px`).
  sharpness  the focus measure preprocessing filters training photos with (facediffuser/data/filters.py
             `face_focus`: the variance of the Laplacian of the face at FOCUS_SIDE pixels, whatever the photo's
             resolution), at least `min_sharpness` (warning below `weak_sharpness`). References are allowed softer
             faces than training photos (whose filter refuses under 100): a reference only has to hold the identity.
  one person per subject: a photo whose identity descriptor (dlib) is at least `same_person` cosine-similar to a
             photo of another subject in the same request is refused; that is the user mixing people up.

Faces are found by the reference modes' detector (facediffuser/reference.py: mediapipe by default), the face the
`face` and `person` modes crop around. The identity descriptor is the one identity scores use
(facediffuser/metrics/identity.py `DlibEmbedder`), computed on a copy no larger than DESCRIPTOR_MAX_SIDE.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np
from PIL import Image

from facediffuser.data.faces import iou
from facediffuser.data.filters import face_focus
from facediffuser.images import ImageDecodeError, load_image
from facediffuser.reference import DEFAULT_DETECTOR, detect_faces

DESCRIPTOR_MAX_SIDE = 1024  # identity descriptors are computed on a copy no larger than this per side


@dataclass(frozen=True)
class ReferenceThresholds:
    """What a reference photo must clear. Defaults measured on the astronaut photo (a 104 px face, sharpness 687)
    and Grace Hopper's (matplotlib's sample; a different person, dlib similarity 0.88 to the astronaut); the same
    person re-encoded, resized, cropped or mirrored scores at least 0.97. See docs/serving.md."""

    min_face_px: int = 64  # refuse: fewer pixels than this across the face hold too little identity
    weak_face_px: int = 96  # warn: below this the encoder's 224 px view of the photo holds a small face
    min_sharpness: float = 30.0  # refuse: a Gaussian blur of sigma 3 on the astronaut's face measures 22
    weak_sharpness: float = 100.0  # warn: sigma 2 measures 56, sigma 1.5 106 (preprocessing's own line is 100)
    dominance: float = 2.0  # several faces: the largest must have this many times the next one's area
    same_person: float = 0.93  # dlib cosine similarity at or above which two photos show one person

    def __post_init__(self):
        for name, value in asdict(self).items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"reference check {name} must be a non-negative number, got {value!r}")
        if self.weak_face_px < self.min_face_px or self.weak_sharpness < self.min_sharpness:
            raise ValueError("reference checks: a warning threshold must not be below its refusal threshold")

    def as_dict(self) -> dict:
        return asdict(self)

    def with_minimums(self, min_face_px: int, min_sharpness: float) -> ReferenceThresholds:
        """These thresholds with other refusal lines (what the CLI and the service configure); a warning line below
        its new refusal line moves up to it."""
        return replace(
            self,
            min_face_px=min_face_px,
            weak_face_px=max(self.weak_face_px, min_face_px),
            min_sharpness=min_sharpness,
            weak_sharpness=max(self.weak_sharpness, min_sharpness),
        )


DEFAULT_THRESHOLDS = ReferenceThresholds()


class ReferenceRefused(ValueError):
    """A reference photo that cannot serve; `code` names the check (a stable string for HTTP clients)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


@dataclass
class PhotoCheck:
    """What the checks found in one photo."""

    name: str
    faces: int
    face_box: list[float]  # the face used, [x1, y1, x2, y2] pixels of the photo
    face_px: float  # the face box's short side
    sharpness: float
    descriptor: np.ndarray | None = None  # dlib, unit length; None when dlib finds no face to describe
    notes: list[str] = field(default_factory=list)  # what is weak about it, without the photo's name

    @property
    def warnings(self) -> list[str]:
        return [f"{self.name}: {note}" for note in self.notes]


def _area(box) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def _subject_face(faces: list, name: str, thresholds: ReferenceThresholds) -> tuple[object, list[str]]:
    """The face that is the subject, and a warning when others were ignored; or ReferenceRefused."""
    if not faces:
        raise ReferenceRefused(f"{name}: no face found; a reference must show the person's face", "no_face_found")
    if len(faces) == 1:
        return faces[0], []
    ranked = sorted(faces, key=lambda f: _area(f.box), reverse=True)
    ratio = _area(ranked[0].box) / max(_area(ranked[1].box), 1e-9)
    if ratio < thresholds.dominance:
        raise ReferenceRefused(
            f"{name}: {len(faces)} faces of similar size (the largest is {ratio:.1f}x the next, under "
            f"{thresholds.dominance:g}x); use a photo of this person alone, or crop it to them",
            "several_faces",
        )
    return ranked[0], [f"{len(faces)} faces; the largest ({ratio:.1f}x the next) is taken as the person"]


def _measure(image: Image.Image, face, name: str, thresholds: ReferenceThresholds) -> tuple[float, float, list]:
    """(face side, sharpness, notes) of the subject's face; ReferenceRefused when either is too low."""
    side = min(face.box[2] - face.box[0], face.box[3] - face.box[1])
    if side < thresholds.min_face_px:
        raise ReferenceRefused(
            f"{name}: the face is {side:.0f} px across, under the {thresholds.min_face_px} px minimum; "
            "use a larger or closer photo",
            "face_too_small",
        )
    sharpness = face_focus(np.asarray(image), face.box)
    if sharpness < thresholds.min_sharpness:
        raise ReferenceRefused(
            f"{name}: the face is blurred (sharpness {sharpness:.1f}, under {thresholds.min_sharpness:g}); "
            "use a photo in focus",
            "face_blurred",
        )
    notes = []
    if side < thresholds.weak_face_px:
        notes.append(f"small face ({side:.0f} px across, under {thresholds.weak_face_px}); weak likeness")
    if sharpness < thresholds.weak_sharpness:
        notes.append(f"soft face (sharpness {sharpness:.1f}, under {thresholds.weak_sharpness:g})")
    return side, sharpness, notes


def _descriptor(image: Image.Image, box, embedder) -> np.ndarray | None:
    """The dlib descriptor of the face at `box` (the dlib face overlapping it most), from a bounded copy."""
    copy = image.copy()
    copy.thumbnail((DESCRIPTOR_MAX_SIDE, DESCRIPTOR_MAX_SIDE), Image.Resampling.LANCZOS)
    scale = copy.width / image.width
    faces = embedder.embed_faces_with_boxes(copy)
    if not faces:
        return None
    target = [v * scale for v in box]
    best = max(faces, key=lambda pair: iou(list(pair[0]), target))
    return best[1] if iou(list(best[0]), target) > 0 else None


def check_photo(
    photo, name: str, thresholds: ReferenceThresholds = DEFAULT_THRESHOLDS, *, detector=DEFAULT_DETECTOR, embedder=None
) -> PhotoCheck:
    """One photo (path, bytes, PIL image, array) → PhotoCheck, or ReferenceRefused naming `name`. `embedder`
    (a DlibEmbedder) adds the identity descriptor; None skips it."""
    try:
        image = load_image(photo)
    except ImageDecodeError as exc:
        raise ReferenceRefused(f"{name}: {exc}", "invalid_image") from None
    faces = detect_faces(np.asarray(image), detector)
    face, notes = _subject_face(faces, name, thresholds)
    side, sharpness, weak = _measure(image, face, name, thresholds)
    check = PhotoCheck(name, len(faces), [float(v) for v in face.box], side, sharpness, notes=notes + weak)
    if embedder is not None:
        check.descriptor = _descriptor(image, face.box, embedder)
        if check.descriptor is None:
            check.notes.append("no frontal face for the identity descriptor; identity scores may be null")
    return check


def photo_names(subjects: list[list]) -> list[list[str]]:
    """How errors name each photo: "reference 2", or "reference 2 photo 1" when a subject has several."""
    return [
        [f"reference {i} photo {k}" if len(photos) > 1 else f"reference {i}" for k in range(1, len(photos) + 1)]
        for i, photos in enumerate(subjects, start=1)
    ]


def check_same_person(checks: list[list[PhotoCheck]], thresholds: ReferenceThresholds = DEFAULT_THRESHOLDS) -> None:
    """ReferenceRefused when a photo of one subject shows the same person as a photo of another subject."""
    for i, first in enumerate(checks):
        for second in checks[i + 1 :]:
            for a in first:
                for b in second:
                    if a.descriptor is None or b.descriptor is None:
                        continue
                    similarity = float(a.descriptor @ b.descriptor)
                    if similarity >= thresholds.same_person:
                        raise ReferenceRefused(
                            f"{b.name} shows the same person as {a.name} (identity similarity {similarity:.2f}, at "
                            f"least {thresholds.same_person:g}); each <|image|> needs a photo of a different person",
                            "same_person",
                        )


def check_references(
    subjects: list,
    thresholds: ReferenceThresholds = DEFAULT_THRESHOLDS,
    *,
    detector=DEFAULT_DETECTOR,
    embedder=None,
    names: list[list[str]] | None = None,
) -> list[list[PhotoCheck]]:
    """Every photo of every subject (a subject: one photo or a list of photos of one person) → its PhotoCheck;
    ReferenceRefused at the first photo that cannot serve, or when two subjects show one person. `embedder`
    (default: a shared DlibEmbedder) gives the descriptors of the one-person-per-subject check."""
    subjects = [list(s) if isinstance(s, (list, tuple)) else [s] for s in subjects]
    names = names or photo_names(subjects)
    embedder = embedder if embedder is not None else shared_embedder()
    checks = [
        [check_photo(photo, name, thresholds, detector=detector, embedder=embedder) for photo, name in zip(s, n)]
        for s, n in zip(subjects, names)
    ]
    check_same_person(checks, thresholds)
    return checks


def reference_warnings(subjects: list, check: bool | ReferenceThresholds = True) -> list[str]:
    """A pipeline call's check: the warnings of `check_references` with `check`'s thresholds (True: the defaults);
    [] without checking when `check` is False. ReferenceRefused when a photo cannot serve."""
    if check is False:
        return []
    return warnings_of(
        check_references(subjects, check if isinstance(check, ReferenceThresholds) else DEFAULT_THRESHOLDS)
    )


def warnings_of(checks: list[list[PhotoCheck]]) -> list[str]:
    return [w for subject in checks for check in subject for w in check.warnings]


def shared_embedder():
    """The process's one dlib embedder (the identity scorer's): its models load in about a second."""
    from facediffuser.metrics.identity import shared_dlib_scorer

    return shared_dlib_scorer().embedder
