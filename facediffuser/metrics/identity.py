"""Identity similarity between generated faces and reference faces (METHOD.md §6).

A `FaceEmbedder` turns an image into one L2-normalised embedding per detected face, most prominent face first.
Two are provided, each with injected weights:

- `FacenetEmbedder`: the FastComposer protocol — facenet-pytorch MTCNN (its bundled weights; 160 px crops,
  margin 0, min face 20, thresholds .6/.7/.7, factor .709, post_process, keep_all, largest first) and an
  InceptionResnetV1 whose weights come from a local file (e.g. the VGGFace2 model).
- `DlibEmbedder`: dlib's HOG detector, 5-point landmarks and ResNet face descriptor, with the CC0 models that
  ship in `face_recognition_models` — always available offline; reported under its own name.

Scoring: cosine similarity; a subject with no matching face scores 0; negatives are clamped to 0. With one
subject the first (largest) face is compared, as FastComposer does. With several subjects, faces and references
are matched greedily (highest similarity first) and the image scores the *minimum* over its subjects.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
from PIL import Image

from facediffuser.images import load_image
from facediffuser.metrics.blend import blend_warnings


class FaceEmbedder(Protocol):
    name: str

    def embed_faces(self, image: Image.Image) -> np.ndarray:
        """[faces, D] float32, rows L2-normalised, most prominent face first; [0, D] when no face is found."""


def _normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


class DlibEmbedder:
    """dlib face descriptors (128-d) with the models bundled in `face_recognition_models` (CC0)."""

    name = "dlib"
    dimension = 128

    def __init__(self, upsample: int = 1):
        import dlib  # imported here: only users of identity scores pay for it
        import face_recognition_models as models

        self.upsample = upsample
        self._lock = threading.Lock()
        self._detector = dlib.get_frontal_face_detector()
        self._landmarks = dlib.shape_predictor(models.pose_predictor_five_point_model_location())
        self._encoder = dlib.face_recognition_model_v1(models.face_recognition_model_location())

    def embed_faces(self, image: Image.Image) -> np.ndarray:
        pairs = self.embed_faces_with_boxes(image)
        if not pairs:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return np.stack([descriptor for _, descriptor in pairs])

    def embed_faces_with_boxes(self, image: Image.Image) -> list[tuple[tuple[int, int, int, int], np.ndarray]]:
        """[(box [x1, y1, x2, y2] pixels, unit descriptor)], most confident detection first."""
        pixels = np.ascontiguousarray(np.asarray(image.convert("RGB")))
        with self._lock:  # dlib's detector and models are not thread-safe
            boxes, scores, _ = self._detector.run(pixels, self.upsample, 0.0)
            order = np.argsort(-np.asarray(scores), kind="stable")  # most confident detection first
            chosen = [boxes[int(i)] for i in order]
            shapes = [self._landmarks(pixels, box) for box in chosen]
            descriptors = [np.asarray(self._encoder.compute_face_descriptor(pixels, s)) for s in shapes]
        return [
            ((box.left(), box.top(), box.right(), box.bottom()), _normalise(d)) for box, d in zip(chosen, descriptors)
        ]


class FacenetEmbedder:
    """MTCNN crops + InceptionResnetV1 (512-d), FastComposer's identity metric. Weights: a local file."""

    name = "facenet"
    dimension = 512

    def __init__(self, weights: str | Path, device: str = "cpu"):
        import torch
        from facenet_pytorch import MTCNN, InceptionResnetV1

        self.device = device
        self._detector = MTCNN(
            image_size=160,
            margin=0,
            min_face_size=20,
            thresholds=[0.6, 0.7, 0.7],
            factor=0.709,
            post_process=True,
            keep_all=True,
            select_largest=True,
            device=device,
        )
        self._model = InceptionResnetV1(classify=False).eval()
        state = load_state_dict(weights)
        # the VGGFace2 file also holds the training classifier ("logits.*"), which embeddings do not use
        state = {k: v for k, v in state.items() if not k.startswith("logits.")}
        missing, unexpected = self._model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{weights}: not InceptionResnetV1 weights ({len(missing)} missing, e.g. {missing[:2]}; "
                f"{len(unexpected)} unexpected, e.g. {unexpected[:2]})"
            )
        self._model.to(device)
        self._torch = torch

    def embed_faces(self, image: Image.Image) -> np.ndarray:
        with self._torch.no_grad():
            crops = self._detector(image.convert("RGB"))  # [faces, 3, 160, 160], largest first; None if none
            if crops is None:
                return np.zeros((0, self.dimension), dtype=np.float32)
            embeddings = self._model(crops.to(self.device)).cpu().numpy()
        return _normalise(embeddings)


def load_state_dict(path: str | Path) -> dict:
    """Weights from a local file without unpickling code: safetensors, else torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


# ------------------------------------------------------------------------------------------ matching


def greedy_match(similarity: np.ndarray) -> list[int | None]:
    """similarity [faces, references] → for each reference, the index of its face (None when faces ran out).

    Repeatedly takes the most similar remaining (face, reference) pair, so each face serves one reference.
    """
    similarity = np.asarray(similarity, dtype=np.float64)
    faces, references = similarity.shape
    assigned: list[int | None] = [None] * references
    free = np.ones_like(similarity, dtype=bool)
    for _ in range(min(faces, references)):
        masked = np.where(free, similarity, -np.inf)
        face, reference = np.unravel_index(int(np.argmax(masked)), masked.shape)
        assigned[reference] = int(face)
        free[face, :] = False
        free[:, reference] = False
    return assigned


def subject_similarities(faces: np.ndarray, references: Sequence[np.ndarray | None]) -> list[float | None]:
    """Raw cosine similarity of each subject's reference to its face in the image; None: no face for it.

    One subject: the first (largest) face, as in FastComposer. Several: greedy matching.
    """
    out: list[float | None] = [None] * len(references)
    known = [i for i, ref in enumerate(references) if ref is not None]
    if len(faces) == 0 or not known:
        return out
    similarity = faces @ np.stack([references[i] for i in known]).T  # rows are unit vectors: cosine
    if len(references) == 1:
        out[0] = float(similarity[0, 0])
        return out
    for column, face in enumerate(greedy_match(similarity)):
        if face is not None:
            out[known[column]] = float(similarity[face, column])
    return out


def identity_score(similarities: Sequence[float | None]) -> float:
    """The image's identity score: minimum over subjects, a missing face counting 0, negatives clamped to 0."""
    if not similarities:
        raise ValueError("identity_score needs at least one subject")
    return float(min(max(0.0, s) if s is not None else 0.0 for s in similarities))


def has_duplicate(faces: np.ndarray, references: Sequence[np.ndarray | None]) -> bool:
    """Two or more detected faces whose most similar reference is the same one (an identity copied twice)."""
    known = [ref for ref in references if ref is not None]
    if len(known) < 2 or len(faces) < 2:
        return False
    best = np.argmax(faces @ np.stack(known).T, axis=1)
    return len(set(best.tolist())) < len(best)


@dataclass
class ImageIdentity:
    similarities: list[float | None]  # per subject, raw cosine; None when no face matched it
    num_faces: int
    score: float  # identity_score(similarities)
    duplicate: bool
    warnings: list[str]  # blend_warnings: a copied face, merged subjects

    @property
    def missing_faces(self) -> int:
        return sum(s is None for s in self.similarities)


def mean_reference(found: Sequence[np.ndarray]) -> np.ndarray | None:
    """One subject's reference from the descriptors of its photos' faces (one per photo that shows one): their
    mean, L2-normalised; None when no photo showed a face. Saved subjects (the HTTP service) keep the
    descriptors and average them here, so they score as their photos would."""
    return _normalise(np.mean(found, axis=0)) if len(found) else None


class IdentityScorer:
    """An embedder plus cached reference embeddings: score generated images against their subjects."""

    def __init__(self, embedder: FaceEmbedder):
        self.embedder = embedder
        self.name = embedder.name
        self._references: dict[str, np.ndarray | None] = {}

    def reference(self, photos, key: str | None = None) -> np.ndarray | None:
        """Embedding of one subject: its first face in each photo, averaged; None when no photo shows a face.

        `photos` is one image (PIL, path, bytes, array) or a list of them. `key` caches the result.
        """
        if key is not None and key in self._references:
            return self._references[key]
        photos = list(photos) if isinstance(photos, (list, tuple)) else [photos]
        found = [faces[0] for faces in (self.embedder.embed_faces(load_image(p)) for p in photos) if len(faces)]
        embedding = mean_reference(found)
        if key is not None:
            self._references[key] = embedding
        return embedding

    def score(self, image: Image.Image, references: Sequence[np.ndarray | None]) -> ImageIdentity:
        faces = self.embedder.embed_faces(image)
        similarities = subject_similarities(faces, references)
        return ImageIdentity(
            similarities,
            len(faces),
            identity_score(similarities),
            has_duplicate(faces, references),
            blend_warnings(faces, references),
        )


_SHARED_DLIB: IdentityScorer | None = None


def shared_dlib_scorer() -> IdentityScorer:
    """One dlib scorer per process (its models load in about a second)."""
    global _SHARED_DLIB
    if _SHARED_DLIB is None:
        _SHARED_DLIB = IdentityScorer(DlibEmbedder())
    return _SHARED_DLIB


def identity_report(
    images: Sequence[Image.Image], references: Sequence, scorer: IdentityScorer | None = None
) -> list[ImageIdentity]:
    """Per image: each subject's similarity (rounded to 4 places; None when no face is found for it), the
    weakest subject's score and the blend warnings. What `FaceDiffuserPipeline(..., identity_scores=True)`
    reports; `scorer` defaults to a shared dlib scorer."""
    scorer = scorer or shared_dlib_scorer()
    embedded = [scorer.reference(reference) for reference in references]
    report = [scorer.score(image, embedded) for image in images]
    for identity in report:
        identity.similarities = [None if s is None else round(s, 4) for s in identity.similarities]
    return report


def identity_similarities(
    images: Sequence[Image.Image], references: Sequence, scorer: IdentityScorer | None = None
) -> list[list[float | None]]:
    """Per image, per subject: similarity of the subject's reference to its face (None when none is found)."""
    return [identity.similarities for identity in identity_report(images, references, scorer)]
