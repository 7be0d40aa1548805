"""Subject encoding for the Serve app, without Ray: reference bytes → face crop → CLIP embedding (cached) →
the three prompt embeddings that `snf_denoise` takes.

The face detector is the preprocessing one (`facediffuser.data.faces`), so the crop a request gets and the
faces training saw come from the same model. With `detector=None` the whole photo is used (padded square).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np
import torch
from PIL import Image

from facediffuser.images import ImageDecodeError, decode_image

from serving.api import RequestError

FACE_MARGIN = 0.6  # crop = face box grown by this fraction of its size on every side (keeps hair and chin)


def subject_crop(image: Image.Image, detector, where: str) -> Image.Image:
    """The region of `image` the subject encoder sees: the largest face with a margin, or the whole photo.

    Raises RequestError (422) when a detector is set and finds no face.
    """
    if detector is None:
        return image
    faces = detector(np.asarray(image))
    if not faces:
        raise RequestError(422, "no_face_found", f"{where}: no face found in the photo")
    x1, y1, x2, y2 = max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1])).box
    side = max(x2 - x1, y2 - y1) * (1 + 2 * FACE_MARGIN)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    box = [max(0, cx - side / 2), max(0, cy - side / 2), min(image.width, cx + side / 2), min(image.height, cy + side / 2)]
    return image.crop(tuple(round(v) for v in box))


class SubjectEncoding:
    """Owns the text encoder, tokenizer and subject encoder of a pipeline, plus an LRU cache of photo embeddings
    keyed by the sha256 of the photo's bytes (repeat customers pay for detection and CLIP once)."""

    def __init__(self, pipe, detector=None, cache_size: int = 256, max_reference_pixels: int = 4096 * 4096):
        self.pipe = pipe
        self.detector = detector
        self.cache_size = cache_size
        self.max_reference_pixels = max_reference_pixels
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0
        self.lock = threading.Lock()  # detectors and the cache are not thread-safe

    def photo_embedding(self, data: bytes, where: str) -> tuple[str, torch.Tensor]:
        digest = hashlib.sha256(data).hexdigest()
        if digest in self.cache:
            self.cache.move_to_end(digest)
            self.hits += 1
            return digest, self.cache[digest]
        self.misses += 1
        try:
            image = decode_image(data, max_pixels=self.max_reference_pixels, name=where)
        except ImageDecodeError as exc:
            status = 413 if "exceeds the limit" in str(exc) else 422
            raise RequestError(status, "invalid_image", str(exc)) from None
        crop = subject_crop(image, self.detector, where)
        pixels = self.pipe.reference_tensor(crop)[None]
        embedding = self.pipe.subject_encoder.embed_images(pixels)[0].float().cpu()
        self.cache[digest] = embedding
        if len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return digest, embedding

    @torch.no_grad()
    def encode(self, prompt: str, negative_prompt: str | None, references: list[list[bytes]]) -> dict:
        """→ {"null", "text", "augmented": [1, 77, D] cpu tensors, "reference_sha256": [[hex, ...], ...]}."""
        with self.lock:
            hashes, subjects = [], []
            for index, photos in enumerate(references, start=1):
                named = len(photos) > 1
                pairs = [self.photo_embedding(data, f"reference {index} photo {k}" if named else f"reference {index}")
                         for k, data in enumerate(photos, start=1)]
                hashes.append([digest for digest, _ in pairs])
                subjects.append(torch.stack([embedding for _, embedding in pairs]).mean(dim=0))
            subject_embeds = torch.stack(subjects).to(self.pipe.subject_encoder.device, self.pipe.subject_encoder.dtype)
            try:
                null, text, augmented = self.pipe.encode_prompt(
                    prompt, references, negative_prompt, subject_embeds=subject_embeds
                )
            except ValueError as exc:  # marker placement, prompt length: the client's prompt
                raise RequestError(422, "invalid_prompt", str(exc)) from None
        return {
            "null": null.cpu(), "text": text.cpu(), "augmented": augmented.cpu(), "reference_sha256": hashes,
        }

    def encode_many(self, requests: list[tuple[str, str | None, list[list[bytes]]]]) -> list[dict]:
        """`encode` for several (prompt, negative_prompt, references) at once → per request, encode's dict or
        {"error": (status, code, message)}. Identical requests (same prompts, same photo bytes) are encoded once."""
        done: dict[tuple, dict] = {}
        out = []
        for prompt, negative_prompt, references in requests:
            key = (prompt, negative_prompt, tuple(tuple(hashlib.sha256(d).digest() for d in photos) for photos in references))
            if key not in done:
                try:
                    done[key] = self.encode(prompt, negative_prompt, references)
                except RequestError as exc:
                    done[key] = {"error": (exc.status, exc.code, exc.message)}  # plain data crosses processes
            out.append(done[key])
        return out

    def stats(self) -> dict:
        return {"cached": len(self.cache), "hits": self.hits, "misses": self.misses}
