"""The encoding half of FaceDiffuserPipeline (a mixin): prompt markers checked against the references, the prompt
and its subject-augmented twin encoded, reference photos → subject embeddings, layout boxes → the sampler's regions.

Kept apart from facediffuser/pipeline.py, which turns these into images. Expects the pipeline's `tokenizer`,
`text_encoder`, `subject_encoder` and `config.max_subjects`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from facediffuser.layout import SubjectRegions, check_boxes, check_scales, scale_subjects
from facediffuser.prompts import IMAGE_TOKEN, count_markers, tokenize_with_markers
from facediffuser.reference import (
    DEFAULT_DETECTOR,
    DEFAULT_REFERENCE_MODE,
    OBJECT_RESOLUTION,
    check_mode,
    embed_photo,
)
from facediffuser.reference import (
    reference_tensor as _reference_tensor,
)


class PromptEncoding:
    """Prompt and reference encoding for FaceDiffuserPipeline: encoders run once per call."""

    @property
    def max_subjects(self) -> int:
        return self.config.max_subjects

    def _text_embeds(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids.to(self.text_encoder.device))[0]

    def check_markers(self, prompt: str, num_references: int) -> int:
        """The prompt's marker count, checked against the references given; → that count."""
        num_markers = count_markers(prompt)
        if num_markers == 0:
            raise ValueError(f"the prompt has no {IMAGE_TOKEN} marker; put one after each subject noun")
        if num_markers > self.max_subjects:
            raise ValueError(f"the prompt has {num_markers} subjects; at most {self.max_subjects} are supported")
        if num_markers != num_references:
            raise ValueError(
                f"the prompt has {num_markers} {IMAGE_TOKEN} marker(s) but {num_references} reference image(s) "
                "were given"
            )
        return num_markers

    def encode_prompt(
        self,
        prompt: str,
        references: Sequence,
        negative_prompt: str | None = None,
        *,
        subject_embeds=None,
        subject_scales: Sequence[float] | None = None,
        reference_mode: str = DEFAULT_REFERENCE_MODE,
    ):
        """→ (null_embeds, text_embeds, augmented_embeds), each [1, 77, D].

        `subject_embeds` [K, D], when given, replaces encoding `references` (a caller that caches them, e.g.
        the Serve subject encoder); `references` is then only counted against the markers. `subject_scales`
        (one per marker) blends each subject's fused token with its plain noun (facediffuser.layout).
        `reference_mode` (facediffuser.reference) says what the encoder sees of each photo.
        """
        num_markers = self.check_markers(prompt, len(references))
        subject_scales = check_scales(subject_scales, num_markers)
        tokens = tokenize_with_markers(self.tokenizer, prompt, self.max_subjects)
        null_ids = self.tokenizer(
            negative_prompt or "",
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        text_embeds = self._text_embeds(tokens.input_ids[None])
        null_embeds = self._text_embeds(null_ids)
        if subject_embeds is None:
            subject_embeds = self.encode_references(references, reference_mode)
        subject_embeds = subject_embeds[None]  # [1, K, D]
        augmented = self.subject_encoder.fuse(
            text_embeds,
            tokens.image_token_mask[None].to(text_embeds.device),
            subject_embeds.to(text_embeds.device),
            torch.tensor([tokens.num_subjects], device=text_embeds.device),
        )
        positions = tokens.image_token_mask.nonzero().flatten().tolist()
        return null_embeds, text_embeds, scale_subjects(text_embeds, augmented, positions, subject_scales)

    def subject_regions(self, prompt: str, boxes: Sequence | None, count: int, latent_size) -> SubjectRegions | None:
        """Layout boxes (one per marker, fractions of the image) → the sampler's `regions` for `count` images."""
        if boxes is None:
            return None
        tokens = tokenize_with_markers(self.tokenizer, prompt, self.max_subjects)
        boxes = check_boxes(boxes, tokens.num_subjects)
        positions = tokens.image_token_mask.nonzero().flatten().tolist()
        return SubjectRegions(tokens=[positions] * count, boxes=[boxes] * count, latent_size=tuple(latent_size))

    def encode_references(
        self, references: Sequence, reference_mode: str = DEFAULT_REFERENCE_MODE, *, detector=DEFAULT_DETECTOR
    ) -> torch.Tensor:
        """One entry per subject: an image, or a list of photos of that person (their embeddings are averaged)
        → [K, D] on the subject encoder's device and dtype.

        Each photo is encoded alone and averaged in float32 (facediffuser.reference.embed_photo), as the Serve
        encoder does, so a photo gives the same embedding here, in `facediffuser generate` and over HTTP.
        `reference_mode`: whole (default), face or person; `detector` serves the last two."""
        check_mode(reference_mode)
        per_subject = []
        for index, reference in enumerate(references):
            photos = list(reference) if isinstance(reference, (list, tuple)) else [reference]
            if not photos:
                raise ValueError(f"reference {index + 1} has no photos")
            embeddings = []
            for number, photo in enumerate(photos, start=1):
                name = None if isinstance(photo, (str, Path)) or len(photos) == 1 else f"photo {number}"
                try:
                    embeddings.append(
                        embed_photo(self.subject_encoder, photo, reference_mode, detector=detector, name=name)
                    )
                except ValueError as exc:
                    raise ValueError(f"reference {index + 1}: {exc}") from None
            per_subject.append(torch.stack(embeddings).mean(dim=0))
        return torch.stack(per_subject).to(self.subject_encoder.device, self.subject_encoder.dtype)

    @staticmethod
    def reference_tensor(photo, reference_mode: str = DEFAULT_REFERENCE_MODE) -> torch.Tensor:
        """Reference photo → [3, 224, 224] in [0, 1] (facediffuser.reference.reference_tensor; the default mode,
        whole, pads the photo square with black and resizes it bilinearly: METHOD.md §1)."""
        return _reference_tensor(photo, reference_mode, size=OBJECT_RESOLUTION)
