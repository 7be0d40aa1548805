"""FaceDiffuserPipeline: prompt with subject markers + one reference photo per subject → images.

Encoders run once (the encoding half: facediffuser/pipeline_encoding.py); the denoising loop is
`facediffuser.sampling.snf_denoise` (the only one in the project); its result becomes the output in
facediffuser/pipeline_output.py, the initial noise comes from facediffuser/noise.py.

The identity guard: `check_references` (default on; or a `ReferenceThresholds`) checks every reference photo first
(facediffuser/reference_checks.py): one that cannot serve is a ReferenceRefused error, a weak one a line in the
output's `warnings`. `best_of` n samples n candidates per image and returns the best, ranked by their weakest
subject's identity similarity; `min_identity` resamples (new seeds, at most `max_retries` more rounds) until every
returned image reaches it (facediffuser/best_of.py). Both score identities (dlib unless `identity_scores` is a
scorer) and record every candidate in the output's `candidates`.
"""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from facediffuser import model_dir
from facediffuser.best_of import Selection, selected
from facediffuser.layout import check_boxes
from facediffuser.models.subject_encoder import SubjectEncoder
from facediffuser.noise import seeded_latents
from facediffuser.pipeline_encoding import PromptEncoding
from facediffuser.pipeline_output import FaceDiffuserOutput, PipelineOutput
from facediffuser.prompts import DEFAULT_MAX_SUBJECTS, count_markers, ensure_image_token
from facediffuser.reference import DEFAULT_REFERENCE_MODE, check_mode
from facediffuser.reference_checks import ReferenceThresholds, reference_warnings
from facediffuser.sampling import (
    OFFICIAL_FUSION,
    FusionOptions,
    boundaries_from_fractions,
    check_boundaries,
    snf_denoise,
)

DEFAULT_ALPHA, DEFAULT_BETA = 0.3, 0.6  # s = 15, f = 30 at 50 steps: the official inference script


class FaceDiffuserPipeline(PromptEncoding, PipelineOutput, DiffusionPipeline):
    """TDM (scene) + SDM (subjects) with Saliency-adaptive Noise Fusion, diffusers-style.

    `sdm_unet` and `subject_encoder` form the SDM; `tdm_unet` is a plain SD UNet. The VAE, text encoder and
    tokenizer are shared (both models were fine-tuned from SD1.5 with them frozen).
    """

    model_cpu_offload_seq = "text_encoder->subject_encoder->tdm_unet->sdm_unet->vae"

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        subject_encoder: SubjectEncoder,
        sdm_unet: UNet2DConditionModel,
        tdm_unet: UNet2DConditionModel,
        scheduler,
        max_subjects: int = DEFAULT_MAX_SUBJECTS,
    ):
        super().__init__()
        ensure_image_token(tokenizer)
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            subject_encoder=subject_encoder,
            sdm_unet=sdm_unet,
            tdm_unet=tdm_unet,
            scheduler=scheduler,
        )
        self.register_to_config(max_subjects=max_subjects)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_sdm_and_tdm(cls, sdm_dir: str | Path, tdm_dir: str | Path, torch_dtype=torch.float32, **kwargs):
        """Compose from two model directories (diffusers layout; the SDM's also has `subject_encoder/`).

        VAE, text encoder, tokenizer and scheduler come from the SDM directory; the TDM contributes its UNet.
        """
        sdm_dir, tdm_dir = str(sdm_dir), str(tdm_dir)
        return cls(
            **model_dir.load_shared_parts(sdm_dir, torch_dtype=torch_dtype),
            subject_encoder=SubjectEncoder.from_pretrained(
                sdm_dir, subfolder=model_dir.SUBJECT_ENCODER, torch_dtype=torch_dtype
            ),
            sdm_unet=UNet2DConditionModel.from_pretrained(sdm_dir, subfolder=model_dir.UNET, torch_dtype=torch_dtype),
            tdm_unet=UNet2DConditionModel.from_pretrained(tdm_dir, subfolder=model_dir.UNET, torch_dtype=torch_dtype),
            **kwargs,
        )

    @classmethod
    def from_official_checkpoints(
        cls,
        base_sd_dir: str | Path,
        sdm_checkpoint: str | Path,
        tdm_checkpoint: str | Path,
        *,
        vision_config: dict | None = None,
        torch_dtype=torch.float32,
        variant: str | None = None,
    ):
        """Import the released Face-diffuser checkpoints onto a Stable Diffusion 1.5 directory (the hub layout;
        `variant="fp16"` reads its `*.fp16.*` weight files).

        The checkpoints load as the official environment wrote them (`.bin` read with weights_only, or
        `.safetensors`; fp32, fp16 or bf16; the legacy CLIP position ids accepted): facediffuser.official says
        exactly what is accepted. Only `unet.*` (both), `image_encoder.*` and `postfuse_module.*` (SDM) are taken;
        VAE, text encoder and tokenizer come from the base (METHOD.md §5 quirk 13). `vision_config` defaults to
        CLIP ViT-L/14.
        """
        from facediffuser.official import official_components

        return cls(
            **official_components(base_sd_dir, sdm_checkpoint, tdm_checkpoint, vision_config, torch_dtype, variant)
        )

    def save_model_dir(self, out_dir: str | Path, which: str) -> None:
        """Write the SDM or TDM alone as one model directory (`facediffuser.model_dir.save`, the layout's one
        writer; docs/model-directory.md). `from_sdm_and_tdm` reads two of them back."""
        model_dir.save(
            out_dir,
            which,
            unet=self.sdm_unet if which == model_dir.SDM else self.tdm_unet,
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            scheduler=self.scheduler,
            subject_encoder=self.subject_encoder,
        )

    # ------------------------------------------------------------------ sampling
    def resolve_boundaries(self, num_inference_steps, alpha=None, beta=None, start_merge_step=None, final_step=None):
        """Iteration count and inclusive stage boundaries (s, f) for this scheduler and step count."""
        self.scheduler.set_timesteps(num_inference_steps)
        num_iterations = len(self.scheduler.timesteps)
        if (start_merge_step is None) != (final_step is None):
            raise ValueError("give both start_merge_step and final_step, or neither")
        if start_merge_step is not None and (alpha is not None or beta is not None):
            raise ValueError("give stage boundaries either as alpha/beta fractions or as step indices, not both")
        if start_merge_step is None:
            start_merge_step, final_step = boundaries_from_fractions(
                DEFAULT_ALPHA if alpha is None else alpha, DEFAULT_BETA if beta is None else beta, num_iterations
            )
        check_boundaries(start_merge_step, final_step, num_iterations)
        return num_iterations, start_merge_step, final_step

    def _initial_latents(self, count, height, width, seed, generator, dtype):
        shape = (4, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if generator is not None:
            latents = torch.randn((count, *shape), generator=generator, dtype=torch.float32)
            return latents, [None] * count
        seed = random.randrange(2**31) if seed is None else int(seed)
        seeds = [seed + k for k in range(count)]  # one seed per image: image k is reproducible on its own
        latents, _ = seeded_latents(shape, seeds)
        return latents, seeds

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        reference_images: Sequence,
        *,
        negative_prompt: str | None = None,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        alpha: float | None = None,
        beta: float | None = None,
        start_merge_step: int | None = None,
        final_step: int | None = None,
        height: int | None = None,
        width: int | None = None,
        return_masks: bool = False,
        fusion: FusionOptions = OFFICIAL_FUSION,
        boxes: Sequence | None = None,
        subject_scales: Sequence[float] | None = None,
        output_type: str = "pil",
        callback: Callable[[int, int], None] | None = None,
        identity_scores: bool | Any = False,
        reference_mode: str = DEFAULT_REFERENCE_MODE,
        check_references: bool | ReferenceThresholds = True,
        best_of: int = 1,
        min_identity: float | None = None,
        max_retries: int = 2,
    ) -> FaceDiffuserOutput:
        """`boxes` ([x0, y0, x1, y1] fractions, one per marker) place each subject; `subject_scales` (one per
        marker, 1 = full strength, 0 = the noun alone) set how strongly each subject's photo counts. Both default
        to off, which is the official sampler. `identity_scores=True` (or an `IdentityScorer`) also returns each
        image's identity similarities and blend warnings. `reference_mode`: what the subject encoder sees of each
        photo, whole (default; the official transform), face or person (facediffuser.reference).
        `check_references`, `best_of`, `min_identity`, `max_retries`: the identity guard (module docstring)."""
        height, width = self._checked_size(height, width)
        selection = Selection(best_of, min_identity, max_retries)
        self._check_options(num_images_per_prompt, num_inference_steps, output_type, identity_scores)
        selection.check_call(generator, output_type)
        stages = self.resolve_boundaries(num_inference_steps, alpha, beta, start_merge_step, final_step)
        self._check_subjects(prompt, reference_images, boxes, reference_mode)
        warnings = reference_warnings(reference_images, check_references)
        embeds, conditions = self._encode(prompt, reference_images, negative_prompt, subject_scales, reference_mode)
        denoise = (conditions, stages, num_inference_steps, guidance_scale, return_masks, fusion, generator, callback)
        finish = (stages, embeds, output_type, return_masks, identity_scores or selection.active, reference_images)
        sample = partial(self._sample_round, prompt, boxes, (height, width), generator, denoise, finish)
        output = selected(sample, seed, num_images_per_prompt, selection)
        output.warnings = warnings + output.warnings
        return output

    def _sample_round(self, prompt, boxes, size, generator, denoise, finish, first_seed, count) -> FaceDiffuserOutput:
        """`count` images from seed `first_seed` on: start latents → `_denoise(*denoise)` → `_finish(*finish)`."""
        start = self._start_latents(prompt, boxes, count, *size, first_seed, generator)
        return self._finish(self._denoise(start, *denoise), start[1], *finish)

    def _encode(self, prompt, reference_images, negative_prompt, subject_scales, reference_mode):
        """→ (the subjects' embeddings, (null, text, augmented) prompt embeddings)."""
        subject_embeds = self.encode_references(reference_images, reference_mode)
        conditions = self.encode_prompt(
            prompt, reference_images, negative_prompt, subject_embeds=subject_embeds, subject_scales=subject_scales
        )
        return subject_embeds, conditions

    def _denoise(self, start, conditions, stages, steps, guidance_scale, return_masks, fusion, generator, callback):
        """`snf_denoise` from `start` = (latents, seeds, regions), each of the (null, text, augmented) `conditions`
        repeated per image; `stages` = (iterations, s, f)."""
        latents, seeds, regions = start
        count, dtype = len(seeds), self.sdm_unet.dtype
        null, text, augmented = (c.repeat(count, 1, 1).to(dtype) for c in conditions)
        _, s, f = stages
        return snf_denoise(
            self.tdm_unet,
            self.sdm_unet,
            self.scheduler,
            latents,
            null,
            text,
            augmented,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            start_merge_step=s,
            final_step=f,
            return_masks=return_masks,
            fusion=fusion,
            generator=generator,
            callback=callback,
            regions=regions,
        )

    def _start_latents(self, prompt, boxes, count, height, width, seed, generator):
        """The initial noise for `count` images (scaled for the scheduler, on the SDM's device and dtype), each
        image's seed, and the sampler's `regions` for the layout boxes (None without boxes)."""
        dtype = self.sdm_unet.dtype
        latents, seeds = self._initial_latents(count, height, width, seed, generator, dtype)
        latents = (latents * self.scheduler.init_noise_sigma).to(self.sdm_unet.device, dtype)
        return latents, seeds, self.subject_regions(prompt, boxes, count, latents.shape[-2:])

    def _checked_size(self, height, width):
        """The call's height and width (the model's default where None), checked before any model runs."""
        default_size = self.sdm_unet.config.sample_size * self.vae_scale_factor
        height = default_size if height is None else height
        width = default_size if width is None else width
        multiple = self.vae_scale_factor
        if height % multiple or width % multiple or height < multiple or width < multiple:
            raise ValueError(f"height and width must be positive multiples of {multiple}, got {height}x{width}")
        return height, width

    def _check_options(self, num_images, num_inference_steps, output_type, identity_scores):
        """The call's counts and output options, checked before any model runs."""
        if not 1 <= num_images <= 64:
            raise ValueError(f"num_images_per_prompt must be in 1..64, got {num_images}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if output_type not in ("pil", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'pt' or 'latent', got {output_type!r}")
        if output_type == "latent" and identity_scores not in (False, None):
            raise ValueError("identity_scores need images: use output_type 'pil' or 'pt'")

    def _check_subjects(self, prompt, references, boxes, reference_mode):
        """Layout boxes, the reference mode and the prompt's markers vs the references, before any model runs."""
        check_boxes(boxes, count_markers(prompt))
        check_mode(reference_mode)
        self.check_markers(prompt, len(references))
