"""SDM subject encoder: CLIP vision tower + projection, and the post-fuse MLP (METHOD.md §1).

The parameter names follow the released checkpoints' `image_encoder.*` / `postfuse_module.*` layout so that
`FaceDiffuserPipeline.from_official_checkpoints` can load them without renaming.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# openai/clip-vit-large-patch14, the vision tower the SDM uses.
CLIP_VIT_L14 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
)


class _FuseMLP(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, residual: bool):
        super().__init__()
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.residual = residual

    def forward(self, x):
        y = self.fc2(F.gelu(self.fc1(self.layernorm(x))))
        return y + x if self.residual else y


class PostFuseModule(nn.Module):
    """h = MLP1([t; e]) + t;  h' = MLP2(h) (with residual);  out = LN(h')."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.mlp1 = _FuseMLP(2 * embed_dim, embed_dim, embed_dim, residual=False)
        self.mlp2 = _FuseMLP(embed_dim, embed_dim, embed_dim, residual=True)
        self.layer_norm = nn.LayerNorm(embed_dim)

    def forward(self, text_tokens: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        fused = self.mlp1(torch.cat([text_tokens, image_tokens], dim=-1)) + text_tokens
        return self.layer_norm(self.mlp2(fused))


class SubjectEncoder(ModelMixin, ConfigMixin):
    """Reference photos → one CLIP image token each → fused into the prompt at the subject-noun positions."""

    @register_to_config
    def __init__(self, vision_config: dict | None = None, text_embed_dim: int = 768):
        super().__init__()
        config = CLIPVisionConfig(**(vision_config or CLIP_VIT_L14))
        if config.projection_dim != text_embed_dim:
            raise ValueError(f"CLIP projection_dim {config.projection_dim} must equal the text width {text_embed_dim}")
        self.image_encoder = CLIPVisionModelWithProjection(config)
        self.postfuse_module = PostFuseModule(text_embed_dim)

    @property
    def image_size(self) -> int:
        return self.image_encoder.config.image_size

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1], [N, 3, H, W] (already padded square) → CLIP-normalised [N, 3, S, S]."""
        size = self.image_size
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        mean = images.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = images.new_tensor(CLIP_STD).view(1, 3, 1, 1)
        return (images - mean) / std

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [0, 1] → [N, D]: pooled post-LN CLS token through visual_projection."""
        pixels = self.preprocess(images.to(self.device, self.dtype))
        return self.image_encoder(pixel_values=pixels).image_embeds

    def fuse(
        self,
        text_embeds: torch.Tensor,
        image_token_mask: torch.Tensor,
        subject_embeds: torch.Tensor,
        num_subjects: torch.Tensor,
    ) -> torch.Tensor:
        """Replace each flagged token of `text_embeds` [B, L, D] by the post-fused (token, subject) pair.

        `image_token_mask` [B, L] flags the subject nouns in order; `subject_embeds` [B, K, D] holds the
        subjects in the same order, of which the first `num_subjects[b]` are valid.
        """
        flagged = image_token_mask.bool()
        valid = torch.arange(subject_embeds.shape[1], device=subject_embeds.device)[None] < num_subjects[:, None]
        if int(flagged.sum()) != int(valid.sum()):
            raise ValueError(f"{int(flagged.sum())} flagged tokens but {int(valid.sum())} subjects")
        fused = self.postfuse_module(text_embeds[flagged], subject_embeds[valid].to(text_embeds.dtype))
        out = text_embeds.clone()
        out[flagged] = fused.to(out.dtype)
        return out
