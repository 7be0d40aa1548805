"""Saved subjects, without Ray: what is kept of a person's photos and how generation uses it in their place.

A subject keeps, per photo, the subject encoder's embedding (`SubjectEncoding.photo_embedding` in one reference
mode, made by one model version) and the dlib descriptor of the photo's face (as `IdentityScoring` computes a
reference: from a bounded copy of the photo). Generation averages the embeddings in float32 and the descriptors
as `IdentityScorer.reference` does, so a saved subject gives the embedding its photos give inline, bit for bit.
Nothing of a subject is cached in the encoder: saving computes around the caches, and generation reads the store.
The store itself is serving/subject_store.py; the routes serving/subject_routes.py.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, Field

from facediffuser.images import load_image
from facediffuser.metrics.identity import mean_reference
from serving.api import Base64Image, Limits, ReferenceMode, RequestError, decode_base64, internal_error

SUBJECT_PREFIX = "subject:"  # a saved subject in a manifest's `references`, in place of its photos' sha256


class SubjectRequest(BaseModel):
    """POST /v1/subjects: photos of one person, encoded once and kept for later requests (`subjects` field)."""

    model_config = {"extra": "forbid"}

    photos: list[Base64Image] = Field(
        ..., min_length=1, description="base64 images of one person, like a `references` entry; at least one"
    )
    name: str | None = Field(None, max_length=100, description="a label for lists; not used in generation")
    reference_mode: ReferenceMode | None = Field(
        None, description="what the subject encoder sees of each photo; requests using the subject must use the same"
    )
    keep_photos: bool = Field(False, description="also keep the photos themselves (by default only what is derived)")


@dataclass(frozen=True)
class SavedSubject:
    """A saved subject as generation uses it (read from the store for each request that names it)."""

    id: str
    reference_mode: str
    model_version: str
    embeddings: np.ndarray  # [photos, D] float32: each photo's subject-encoder embedding
    descriptors: np.ndarray  # [photos, 128] float32: each photo's first dlib face (zeros where none was found)
    faces: np.ndarray  # [photos] bool: which photos showed a face to dlib

    @property
    def reference_id(self) -> str:
        return f"{SUBJECT_PREFIX}{self.id}"

    def embedding(self, reference_mode: str, model_version: str | None) -> torch.Tensor:
        """The subject's embedding [D] float32: its photos' embeddings averaged, as for photos sent inline."""
        check_compatible(self.id, self.reference_mode, self.model_version, reference_mode, model_version)
        return torch.from_numpy(np.ascontiguousarray(self.embeddings)).mean(dim=0)

    def identity_reference(self) -> np.ndarray | None:
        return mean_reference(list(self.descriptors[self.faces]))


def check_compatible(
    subject_id: str, saved_mode: str, saved_version: str, mode: str, model_version: str | None
) -> None:
    """422 `subject_mismatch` for a subject made in another reference mode or by another model than the request's
    (its embeddings would mean something else)."""
    if saved_mode != mode:
        raise RequestError(
            422,
            "subject_mismatch",
            f"subject {subject_id} was saved with reference_mode {saved_mode!r}; this request uses {mode!r} "
            f"(send reference_mode {saved_mode!r}, or save the subject again in {mode!r})",
        )
    if model_version is not None and saved_version != model_version:
        raise RequestError(
            422,
            "subject_mismatch",
            f"subject {subject_id} was saved with model version {saved_version}; this server runs {model_version}: "
            "save the subject again from its photos",
        )


def reference_key(reference) -> tuple:
    """What makes two requests' subject the same (the encoder encodes identical requests once)."""
    if isinstance(reference, SavedSubject):
        return (reference.reference_id, reference.reference_mode, reference.model_version)
    return tuple(hashlib.sha256(data).digest() for data in reference)


def checked_photos(request: SubjectRequest, limits: Limits) -> list[bytes]:
    """The request's photos as bytes: at most `limits.max_photos_per_subject`, each valid base64."""
    if len(request.photos) > limits.max_photos_per_subject:
        raise RequestError(
            422,
            "too_many_photos",
            f"{len(request.photos)} photos given; a subject has at most {limits.max_photos_per_subject}",
        )
    return [decode_base64(photo, f"photo {k}") for k, photo in enumerate(request.photos, start=1)]


def subject_features(encoding, identity_scoring, photos: list[bytes], reference_mode: str) -> dict:
    """Per photo: the embedding (`encoding`: a SubjectEncoding) and the first face's dlib descriptor
    (`identity_scoring`: an IdentityScoring) → {"embeddings", "descriptors", "faces"} as numpy arrays, or
    {"error": (status, code, message, error_id)}. Leaves the encoder's caches as they were: what is derived from a
    saved subject's photos lives in the store only, so deleting it there erases it."""
    try:
        with encoding.lock:
            before = set(encoding.cache)
            try:
                embeddings = [
                    encoding.photo_embedding(data, f"photo {k}", reference_mode)[1].numpy()
                    for k, data in enumerate(photos, 1)
                ]
            finally:  # entries this call added go again (an entry an inline request made earlier stays)
                for key in [key for key in encoding.cache if key not in before]:
                    encoding.cache.pop(key, None)
        with identity_scoring.lock:
            found = [_first_face(identity_scoring, data, f"photo {k}") for k, data in enumerate(photos, 1)]
    except RequestError as exc:
        return {"error": exc.as_tuple()}
    except Exception as exc:
        return {"error": internal_error("saving a subject", exc).as_tuple()}
    dimension = next((face.shape[0] for face in found if face is not None), 128)
    return {
        "embeddings": np.stack(embeddings).astype(np.float32, copy=False),
        "descriptors": np.stack([np.zeros(dimension, np.float32) if f is None else f for f in found]).astype(
            np.float32, copy=False
        ),
        "faces": np.array([f is not None for f in found], dtype=bool),
    }


def _first_face(identity_scoring, data: bytes, where: str) -> np.ndarray | None:
    """The photo's most prominent face, as `IdentityScorer.reference` takes it from the bounded copy."""
    faces = identity_scoring.scorer.embedder.embed_faces(load_image(identity_scoring.bounded_copy(data, where)))
    return faces[0] if len(faces) else None
