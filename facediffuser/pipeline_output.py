"""The output half of FaceDiffuserPipeline: `FaceDiffuserOutput`, and a mixin (`PipelineOutput`) that turns
`snf_denoise`'s result into it: latents decoded by the VAE, fusion masks, identity scores when asked, the
embeddings' fingerprints.

Kept apart from facediffuser/pipeline.py, which checks a call and runs the loop. Expects the pipeline's `vae`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from facediffuser.images import tensor_to_pil
from facediffuser.reference import embedding_sha256


@dataclass
class FaceDiffuserOutput:
    images: list  # PIL images (a [B, 3, H, W] tensor in [0, 1] with output_type="pt", the latents with "latent")
    seeds: list[int | None]
    start_merge_step: int
    final_step: int
    num_iterations: int
    masks: torch.Tensor | None = None  # [fusion steps, B, h, w] float32, 1 = SDM chose the pixel
    fusion_steps: list[int] = field(default_factory=list)
    # with identity_scores: per image, per subject, dlib similarity of its face to the reference (None: no face)
    identity_scores: list[list[float | None]] | None = None
    # per subject: sha256 of the embedding its photos gave (facediffuser.reference.embedding_sha256)
    embedding_sha256: list[str] = field(default_factory=list)
    # with identity_scores: per image, the blend warnings (a copied face, merged subjects; metrics/identity.py)
    identity_warnings: list[list[str]] | None = None
    # what went wrong without failing the call: weak reference photos, a min_identity not met
    warnings: list[str] = field(default_factory=list)
    # with best_of or min_identity: every candidate sampled (seed, round, scores, chosen), in sampling order
    candidates: list[dict] | None = None
    identities: list | None = field(default=None, repr=False)  # ImageIdentity per image, when scored


class PipelineOutput:
    """snf_denoise's result → FaceDiffuserOutput, for FaceDiffuserPipeline."""

    def _finish(
        self,
        result,
        seeds: list,
        stages: tuple[int, int, int],
        subject_embeds: torch.Tensor,
        output_type: str,
        return_masks: bool,
        identity_scores,
        reference_images: Sequence,
    ) -> FaceDiffuserOutput:
        """snf_denoise's `result` → the output: images (decoded unless output_type is 'latent'), fusion steps and
        masks, when asked each image's identity scores against the references, and the embeddings' fingerprints.
        `stages` = (iterations, s, f)."""
        num_iterations, s, f = stages
        output = FaceDiffuserOutput(
            images=[],
            seeds=seeds,
            start_merge_step=s,
            final_step=f,
            num_iterations=num_iterations,
            fusion_steps=result.fusion_steps,
            embedding_sha256=[embedding_sha256(e) for e in subject_embeds],
        )
        count = len(seeds)
        images = result.latents if output_type == "latent" else self.decode_latents(result.latents)
        if return_masks:
            output.masks = (
                torch.stack(result.masks)[:, :, 0].cpu()
                if result.masks
                else torch.zeros(0, count, *result.latents.shape[-2:])
            )
        want_scores = identity_scores is not False and identity_scores is not None
        pil_images = tensor_to_pil(images) if output_type == "pil" or want_scores else None
        if want_scores:
            from facediffuser.metrics.identity import identity_report  # dlib loads only when asked

            scorer = None if identity_scores is True else identity_scores
            output.identities = identity_report(pil_images, reference_images, scorer)
            output.identity_scores = [identity.similarities for identity in output.identities]
            output.identity_warnings = [identity.warnings for identity in output.identities]
        output.images = images if output_type in ("pt", "latent") else pil_images
        return output

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        return (self.vae.decode(latents).sample.float() / 2 + 0.5).clamp(0, 1)
