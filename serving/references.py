"""Subject encoding for the Serve app, without Ray: reference bytes → the library's reference transform in the
request's mode (`facediffuser.reference`: whole, face or person; the same function the pipeline and the CLI use)
→ CLIP embedding (cached per photo and mode) → the three prompt embeddings that `snf_denoise` takes.

Identity scoring of the generated images (`IdentityScoring`) lives here too, for the same reason: no Ray.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from dataclasses import replace

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from facediffuser.images import ImageDecodeError, decode_image
from facediffuser.prompts import tokenize_with_markers
from facediffuser.reference import (
    DEFAULT_DETECTOR,
    DEFAULT_REFERENCE_MODE,
    SubjectNotFound,
    embed_photo,
    embedding_sha256,
)
from facediffuser.reference_checks import (
    DEFAULT_THRESHOLDS,
    PhotoCheck,
    ReferenceRefused,
    check_photo,
    check_same_person,
    shared_embedder,
    warnings_of,
)
from serving.api import RequestError, internal_error
from serving.subjects import SavedSubject, reference_key

# Pillow decoders a reference may use (Image.open(formats=...)): the common photo formats, nothing more exotic
# (TIFF, PSD, EPS, ICO, ... are refused before any of their decoders runs).
REFERENCE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
IDENTITY_MAX_SIDE = 1024  # identity scoring works on a copy of each reference no larger than this per side


def decode_reference(data: bytes, where: str, max_pixels: int) -> Image.Image:
    """A reference photo's bytes → RGB image, or RequestError: 422 for anything but JPEG/PNG/WebP/GIF/BMP or an
    undecodable file, 413 for more than `max_pixels` pixels (checked from the header, before decoding)."""
    try:
        Image.open(io.BytesIO(data), formats=REFERENCE_FORMATS).close()  # reads the header only
    except UnidentifiedImageError:
        raise RequestError(422, "invalid_image", f"{where}: not a JPEG, PNG, WebP, GIF or BMP image") from None
    except Image.DecompressionBombError:
        raise RequestError(413, "invalid_image", f"{where}: too many pixels (limit {max_pixels})") from None
    except Exception as exc:  # a header Pillow chokes on
        raise RequestError(422, "invalid_image", f"{where}: not a decodable image ({type(exc).__name__})") from None
    try:
        return decode_image(data, max_pixels=max_pixels, name=where)
    except ImageDecodeError as exc:
        status = 413 if "exceeds the limit" in str(exc) else 422
        raise RequestError(status, "invalid_image", str(exc)) from None


class SubjectEncoding:
    """Owns the text encoder, tokenizer and subject encoder of a pipeline, plus an LRU cache of photo embeddings
    keyed by the reference mode and the sha256 of the photo's bytes (repeat customers pay for detection and CLIP
    once). `detector` names the face detector of the face and person modes (built on first use)."""

    def __init__(
        self, pipe, detector: str = DEFAULT_DETECTOR, cache_size: int = 256, max_reference_pixels: int = 4096 * 4096
    ):
        self.pipe = pipe
        self.detector = detector
        self.cache_size = cache_size
        self.max_reference_pixels = max_reference_pixels
        self.cache: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0
        self.lock = threading.Lock()  # the cache is not thread-safe
        self.model_version: str | None = None  # set by the deployment: saved subjects of another model are refused
        self.thresholds = DEFAULT_THRESHOLDS  # the reference checks' (ServeConfig.reference_thresholds())

    def photo_check(self, data: bytes, digest: str, where: str, image=None) -> PhotoCheck:
        """The reference checks' verdict on one photo (facediffuser/reference_checks.py), named `where`; RequestError
        422 naming the photo when it cannot serve. Kept in the embedding cache under ("check", sha256), so whatever
        drops a photo's entries drops its identity descriptor too."""
        key = ("check", digest)
        if key in self.cache:
            self.cache.move_to_end(key)
            return replace(self.cache[key], name=where)
        image = image or decode_reference(data, where, self.max_reference_pixels)
        try:
            check = check_photo(image, where, self.thresholds, detector=self.detector, embedder=shared_embedder())
        except ReferenceRefused as exc:
            raise RequestError(422, exc.code, str(exc)) from None
        self._remember(key, check)
        return check

    def _remember(self, key: tuple, value) -> None:
        self.cache[key] = value
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)

    def photo_embedding(self, data: bytes, where: str, mode: str = DEFAULT_REFERENCE_MODE) -> tuple[str, torch.Tensor]:
        """→ (the photo's sha256, its embedding [D] float32 on the CPU); RequestError 422 for a photo without a
        face (or person) in a mode that crops around one."""
        digest = hashlib.sha256(data).hexdigest()
        key = (mode, digest)  # one photo gives one embedding per mode
        if key in self.cache:
            self.cache.move_to_end(key)
            self.hits += 1
            return digest, self.cache[key]
        self.misses += 1
        image = decode_reference(data, where, self.max_reference_pixels)
        self.photo_check(data, digest, where, image)  # refused photos never reach the encoder
        try:
            embedding = embed_photo(self.pipe.subject_encoder, image, mode, detector=self.detector, name=where)
        except SubjectNotFound as exc:
            raise RequestError(422, exc.code, str(exc)) from None
        self._remember(key, embedding)
        return digest, embedding

    @torch.no_grad()
    def encode(
        self,
        prompt: str,
        negative_prompt: str | None,
        references: list[list[bytes]],
        subject_scales: list[float] | None = None,
        reference_mode: str = DEFAULT_REFERENCE_MODE,
    ) -> dict:
        """→ {"null", "text", "augmented": [1, 77, D] cpu tensors, "reference_sha256": [[hex, ...], ...],
        "embedding_sha256": [hex per subject], "subject_tokens": the subject nouns' token positions (for layout
        boxes)}. Each subject's embedding is its photos' embeddings averaged in float32, as the pipeline does.

        Raises RequestError for the client's mistakes (prompt, photos); anything else is a server fault.
        """
        try:  # the client's prompt: marker placement and length (what encode_prompt would refuse)
            tokens = tokenize_with_markers(self.pipe.tokenizer, prompt, self.pipe.max_subjects)
        except ValueError as exc:
            raise RequestError(422, "invalid_prompt", str(exc)) from None
        with self.lock:
            hashes, subjects, checks = zip(
                *(self._subject(index, photos, reference_mode) for index, photos in enumerate(references, start=1))
            )
            try:  # one person per subject: the checks' descriptors of every photo in the request
                check_same_person(checks, self.thresholds)
            except ReferenceRefused as exc:
                raise RequestError(422, exc.code, str(exc)) from None
            subject_embeds = torch.stack(subjects).to(self.pipe.subject_encoder.device, self.pipe.subject_encoder.dtype)
            # The prompt was checked above: a ValueError from here on is the model stack's, a server fault.
            null, text, augmented = self.pipe.encode_prompt(
                prompt, references, negative_prompt, subject_embeds=subject_embeds, subject_scales=subject_scales
            )
        return {
            "null": null.cpu(),
            "text": text.cpu(),
            "augmented": augmented.cpu(),
            "reference_sha256": list(hashes),
            "embedding_sha256": [embedding_sha256(e) for e in subject_embeds],
            "subject_tokens": tokens.image_token_mask.nonzero().flatten().tolist(),
            "warnings": warnings_of(checks),
        }

    def _subject(self, index: int, photos, mode: str) -> tuple[list[str], torch.Tensor, list[PhotoCheck]]:
        """One subject of a request → (its photos' sha256, or its saved id; its embedding; its photos' checks)."""
        if isinstance(photos, SavedSubject):  # a saved subject: its stored embeddings stand for its photos
            name = f"reference {index}"
            return [photos.reference_id], photos.embedding(mode, self.model_version), saved_checks(photos, name)
        count = len(photos)
        wheres = [f"reference {index} photo {k}" if count > 1 else f"reference {index}" for k in range(1, count + 1)]
        pairs = [self.photo_embedding(data, where, mode) for data, where in zip(photos, wheres)]
        checks = [self.photo_check(data, digest, where) for data, (digest, _), where in zip(photos, pairs, wheres)]
        return [digest for digest, _ in pairs], torch.stack([embedding for _, embedding in pairs]).mean(dim=0), checks

    def encode_many(
        self, requests: list[tuple[str, str | None, list[list[bytes]], list[float] | None, str]]
    ) -> list[dict]:
        """`encode` for several (prompt, negative_prompt, references, subject_scales, reference_mode) at once → per
        request, encode's dict or {"error": (status, code, message, error_id)}. Identical requests (same prompts,
        same photo bytes, same mode) are encoded once; a server fault in one request (logged with its error id)
        fails only that one."""
        done: dict[tuple, dict] = {}
        out = []
        for prompt, negative_prompt, references, scales, mode in requests:
            key = (
                prompt,
                negative_prompt,
                tuple(reference_key(photos) for photos in references),
                tuple(scales or ()),
                mode,
            )
            if key not in done:
                try:
                    done[key] = self.encode(prompt, negative_prompt, references, scales, mode)
                except RequestError as exc:
                    done[key] = {"error": exc.as_tuple()}  # plain data crosses processes
                except Exception as exc:
                    done[key] = {"error": internal_error("subject encoding", exc).as_tuple()}
            out.append(done[key])
        return out

    def stats(self) -> dict:
        return {"cached": len(self.cache), "hits": self.hits, "misses": self.misses}


def saved_checks(subject: SavedSubject, name: str) -> list[PhotoCheck]:
    """A saved subject's photos as the one-person-per-subject check sees them: their stored descriptors (the photos
    were checked when the subject was saved)."""
    return [
        PhotoCheck(f"{name} (subject {subject.id})", 1, [], 0.0, 0.0, descriptor=descriptor)
        for descriptor, found in zip(subject.descriptors, subject.faces)
        if found
    ]


class IdentityScoring:
    """dlib identity scores of generated images against their references, with bounded work and memory.

    Each reference photo is decoded as for encoding (same formats and pixel limit) and shrunk to at most
    `max_side` pixels a side before face detection, so a 16-megapixel reference costs what a 1-megapixel one
    does. One descriptor per subject is kept in an LRU cache of `cache_size` entries, keyed by the sha256 of
    the subject's photos (the library scorer's own cache is unbounded, so it is not used).
    """

    def __init__(
        self, scorer, cache_size: int = 256, max_reference_pixels: int = 4096 * 4096, max_side: int = IDENTITY_MAX_SIDE
    ):
        self.scorer = scorer
        self.cache_size, self.max_reference_pixels, self.max_side = cache_size, max_reference_pixels, max_side
        self.cache: OrderedDict[str, np.ndarray | None] = OrderedDict()
        self.lock = threading.Lock()  # dlib's detector and the cache are not thread-safe

    def bounded_copy(self, data: bytes, where: str) -> Image.Image:
        image = decode_reference(data, where, self.max_reference_pixels)
        image.thumbnail((self.max_side, self.max_side), Image.Resampling.LANCZOS)  # in place; keeps the aspect
        return image

    def reference(self, photos: list[bytes], where: str) -> np.ndarray | None:
        if isinstance(photos, SavedSubject):  # its stored descriptors, averaged as its photos' faces would be
            return photos.identity_reference()
        key = ",".join(hashlib.sha256(data).hexdigest() for data in photos)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        named = len(photos) > 1
        images = [self.bounded_copy(data, f"{where} photo {k}" if named else where) for k, data in enumerate(photos, 1)]
        embedding = self.scorer.reference(images)
        self.cache[key] = embedding
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return embedding

    def scores(self, images: list[bytes], references: list[list[bytes]]) -> dict:
        """Per image (PNG bytes): {"scores": per subject, the cosine similarity of the subject's reference face to
        its face in the image, rounded to 4 places (None: no face found for it); "weakest": the image's identity
        score (the weakest subject, a missing face counting 0); "warnings": the blend guard's, per image}."""
        with self.lock:
            embedded = [self.reference(photos, f"reference {index}") for index, photos in enumerate(references, 1)]
            found = [self.scorer.score(decode_image(png), embedded) for png in images]
        return {
            "scores": [[None if s is None else round(s, 4) for s in identity.similarities] for identity in found],
            "weakest": [identity.score for identity in found],
            "warnings": [identity.warnings for identity in found],
        }
