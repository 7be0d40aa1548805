"""Prompt consistency: CLIP cosine between an image and its prompt with the subject markers removed (METHOD.md §6).

The CLIP model (transformers `CLIPModel` + its tokenizer) comes from a local directory or a hub id. Images are
prepared as OpenAI CLIP does: bicubic resize of the short side, center crop, CLIP mean/std.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from facediffuser.prompts import strip_markers

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """PIL image → [3, size, size] normalised for CLIP."""
    image = image.convert("RGB")
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), Image.BICUBIC)
    left, top = (width - size) // 2, (height - size) // 2
    pixels = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(pixels).permute(2, 0, 1)
    return (tensor - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


class ClipPromptScorer:
    name = "clip"

    def __init__(self, model: str, device: str = "cpu"):
        from transformers import AutoTokenizer, CLIPModel

        try:
            self.model = CLIPModel.from_pretrained(model).eval().to(device)
            self.tokenizer = AutoTokenizer.from_pretrained(model)
        except OSError as exc:
            raise FileNotFoundError(f"cannot load a CLIP model from {model!r}: {exc}") from None
        self.device = device
        self.image_size = self.model.config.vision_config.image_size

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        """Cosine similarity of each image with its prompt (markers removed), in [-1, 1]."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        pixels = torch.stack([clip_pixels(image, self.image_size) for image in images]).to(self.device)
        tokens = self.tokenizer(
            [strip_markers(p) for p in prompts],
            padding=True,
            truncation=True,
            max_length=self.model.config.text_config.max_position_embeddings,
            return_tensors="pt",
        )
        image_features = _features(self.model.get_image_features(pixel_values=pixels))
        text_features = _features(
            self.model.get_text_features(
                input_ids=tokens.input_ids.to(self.device), attention_mask=tokens.attention_mask.to(self.device)
            )
        )
        cosine = torch.nn.functional.cosine_similarity(image_features.float(), text_features.float(), dim=-1)
        return [float(c) for c in cosine.cpu()]


def _features(output) -> torch.Tensor:
    """transformers 5 returns a model output whose pooler_output is the projected feature; 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output
