"""Captions for one image: the built-in template (one person noun per subject) or a transformers image-to-text
model loaded from a local directory or hub id (BLIP-style: AutoProcessor + AutoModelForImageTextToText)."""

from __future__ import annotations

import numpy as np

TEMPLATE = "template"
PERSON_NOUN = "person"
_POSITIONS = {
    2: ["on the left", "on the right"],
    3: ["on the left", "in the middle", "on the right"],
}


def template_caption(num_subjects: int) -> str:
    """ "a photo of a person on the left and a person on the right": exactly one person noun per subject,
    in left-to-right order (the linking order), so linking a template caption always succeeds."""
    if num_subjects < 1:
        raise ValueError("a template caption needs at least one subject")
    if num_subjects == 1:
        return f"a photo of a {PERSON_NOUN}"
    if num_subjects in _POSITIONS:
        phrases = [f"a {PERSON_NOUN} {where}" for where in _POSITIONS[num_subjects]]
        suffix = ""
    else:
        phrases = [f"a {PERSON_NOUN}"] * num_subjects
        suffix = ", from left to right"
    return "a photo of " + ", ".join(phrases[:-1]) + " and " + phrases[-1] + suffix


def check_captioner(name_or_path: str) -> None:
    """Fail fast (before any work) when a captioner model cannot be found; a ValueError names the problem."""
    if name_or_path == TEMPLATE:
        return
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name_or_path)
    except Exception as exc:  # OSError (not found / offline), ValueError (not a model dir)
        raise ValueError(
            f"--captioner {name_or_path}: cannot load a model config ({str(exc).splitlines()[0]})"
        ) from None


class ModelCaptioner:
    """A transformers image-to-text model, loaded once; `caption(image)` → one line of text."""

    def __init__(self, name_or_path: str, device: str = "cpu", max_new_tokens: int = 30):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.device = device
        self.max_new_tokens = max_new_tokens
        self.processor = AutoProcessor.from_pretrained(name_or_path)
        self.model = AutoModelForImageTextToText.from_pretrained(name_or_path).to(device).eval()
        self._torch = torch

    def __call__(self, image: np.ndarray) -> str:
        from PIL import Image

        inputs = self.processor(images=Image.fromarray(image), return_tensors="pt").to(self.device)
        with self._torch.inference_mode():
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        text = self.processor.batch_decode(ids, skip_special_tokens=True)[0]
        return " ".join(text.split())


def make_captioner(name_or_path: str, device: str = "cpu"):
    """None for the template (it needs the subject count, not the image); else a ModelCaptioner."""
    return None if name_or_path == TEMPLATE else ModelCaptioner(name_or_path, device=device)
