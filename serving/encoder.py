"""The SubjectEncoder deployment: prompts and reference photos → prompt embeddings; dlib identity scores."""

from __future__ import annotations

import asyncio
import logging

from ray import serve

from facediffuser import faults
from serving.api import Limits, internal_error
from serving.coalescer import Coalescer, histogram, no_concurrent_batches_warning
from serving.models import load_models
from serving.settings import ServeConfig


@serve.deployment(name="SubjectEncoder")
class SubjectEncoderDeployment:
    """Reference photos → the reference transform in the request's mode → CLIP image tokens (LRU-cached by mode and
    content hash) → prompt embeddings."""

    def __init__(self, config: dict):
        from facediffuser.metrics.identity import shared_dlib_scorer
        from serving.references import IdentityScoring, SubjectEncoding

        cfg = ServeConfig.from_dict(config)
        pipe, self.model_info = load_models(cfg, drop=("sdm_unet", "tdm_unet", "vae"))
        max_reference_pixels = Limits(**cfg.limits).max_reference_pixels
        # the face detector (face and person modes) is built by the library on the first request that needs it
        self.encoding = SubjectEncoding(pipe, cfg.face_detector, cfg.cache_size, max_reference_pixels)
        self.encoding.thresholds = cfg.reference_thresholds()  # reference photos checked at the door
        self.encoding.model_version = self.model_info["model_version"]  # saved subjects of another model: refused
        # dlib: CPU, bundled CC0 weights; references shrunk to a bounded copy, descriptors in a bounded LRU cache
        # the process's one dlib scorer, which the reference checks' descriptors use too (one model load, not two)
        self.identity_scoring = IdentityScoring(shared_dlib_scorer(), cfg.cache_size, max_reference_pixels)
        logging.getLogger("ray.serve").addFilter(no_concurrent_batches_warning)
        # Requests that arrive while a call runs are encoded together in the next one (identical ones once), so
        # requests that came in together leave together and can meet in one sampler batch.
        self.coalescer = Coalescer(self._encode_many, limit=cfg.max_ongoing_requests)
        self.encode.set_max_batch_size(cfg.max_ongoing_requests)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0, max_concurrent_batches=1024)
    async def encode(
        self,
        prompts: list[str],
        negative_prompts: list[str | None],
        references: list[list[list[bytes]]],
        subject_scales: list[list[float] | None],
        reference_modes: list[str],
    ) -> list[dict]:
        """Per request: {"null", "text", "augmented", "reference_sha256", "embedding_sha256", "subject_tokens",
        "model_version"} or {"error": (status, code, message)}."""
        return await self.coalescer(list(zip(prompts, negative_prompts, references, subject_scales, reference_modes)))

    async def _encode_many(self, requests: list[tuple]) -> list[dict]:
        results = await asyncio.to_thread(self.encoding.encode_many, requests)
        # tagged with the model that made them: the sampler refuses embeddings of another model (a mixed rollout)
        return [r if "error" in r else {**r, "model_version": self.model_info["model_version"]} for r in results]

    async def identity_scores(self, images: list[bytes], references: list[list[bytes]]) -> dict:
        """→ {"scores": per image, per subject: dlib cosine similarity of the subject's reference to its face
        (None: no face); "weakest": per image, its weakest subject's; "warnings": per image, the blend guard's}, or
        {"error_id": ...} when scoring failed (logged here under that id).

        Reference descriptors are cached by the sha256 of the subject's photos, like the CLIP embeddings."""
        try:
            faults.fire("serve.encoder", once=True)  # tests only: off unless armed (arm_fault)
            return await asyncio.to_thread(self.identity_scoring.scores, images, references)
        except Exception as exc:
            return {"error_id": internal_error("identity scoring", exc).error_id}

    async def subject_features(self, photos: list[bytes], reference_mode: str) -> dict:
        """A subject to save (POST /v1/subjects): per photo its embedding and dlib descriptor, and this replica's
        model_version; or {"error": ...}. Leaves the caches as they were (serving/subjects.py)."""
        from serving.subjects import subject_features

        features = await asyncio.to_thread(
            subject_features, self.encoding, self.identity_scoring, photos, reference_mode
        )
        return features if "error" in features else {**features, "model_version": self.model_info["model_version"]}

    def arm_fault(self, point: str, value: str = "RuntimeError") -> None:
        """TESTS ONLY (tests/test_serve.py): arm a fault point in this replica (facediffuser/faults.py; here
        `serve.encoder`, whose next identity_scores call then raises once). Reachable only through a Ray deployment
        handle, not over HTTP or config."""
        faults.arm(point, value)

    def ready(self) -> dict:
        return {
            **self.encoding.stats(),
            "identity_cached": len(self.identity_scoring.cache),
            "calls": histogram(self.coalescer.sizes),
        }

    def model(self) -> dict:
        """What this replica loaded ({"model", "hashes", "model_version"}); the ingress compares it with the
        sampler's."""
        return self.model_info

    def check_health(self) -> None:
        if self.encoding.pipe.subject_encoder is None:
            raise RuntimeError("subject encoder not loaded")
