"""SDM training losses (METHOD.md §3): denoising loss with its masked variant, and the localization loss.

The localization loss needs the cross-attention probabilities of `attn2` in the middle five UNet blocks.
`CrossAttentionCapture` installs an attention processor on just those layers that computes the
probabilities explicitly and keeps them; every other layer keeps its (memory-efficient) default processor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# The middle 5 of the 7 cross-attention blocks of an SD1.x UNet (11 attn2 layers; the tiny UNet has the same layout).
LOCALIZATION_BLOCKS = ("down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.1", "up_blocks.2")
LOCALIZATION_WEIGHT = 1e-3
MASKED_LOSS_PROB = 0.5
_EPS = 1e-5  # guards mask sums of 0 (a subject whose mask vanishes at 8 px, or fills the whole frame)


def denoising_loss(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """mean((ε̂ − ε)²) over all elements; with `mask` [B, 1, h, w], both are multiplied by it first.

    No renormalisation by mask area: samples without subjects contribute zero (the official behaviour).
    """
    prediction, target = prediction.float(), target.float()
    if mask is not None:
        mask = mask.to(prediction.dtype)
        prediction, target = prediction * mask, target * mask
    return F.mse_loss(prediction, target, reduction="mean")


def union_mask(subject_masks: torch.Tensor, valid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, K, H, W] subject masks (only `valid` [B, K] ones count) → their union [B, 1, h, w], bilinearly resized."""
    masks = subject_masks.float() * valid.float()[:, :, None, None]
    union = masks.amax(dim=1, keepdim=True)
    return F.interpolate(union, size=size, mode="bilinear", align_corners=False)


def _map_size(num_positions: int, aspect: float) -> tuple[int, int]:
    """h, w of an attention map with `num_positions` = h·w pixels and the image's aspect ratio h / w."""
    height = round(math.sqrt(num_positions * aspect))
    width = num_positions // height
    if height * width != num_positions:
        raise ValueError(f"cannot lay out {num_positions} attention positions with aspect ratio {aspect:.3f}")
    return height, width


def localization_loss_one_map(
    attention: torch.Tensor, subject_masks: torch.Tensor, token_index: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Balanced L1 for one cross-attention map.

    attention [B·heads, h·w, L] (probabilities over the L text tokens); subject_masks [B, K, H, W] in {0, 1};
    token_index [B, K] (the subject noun's token position); valid [B, K] bool.
    For each valid subject k: ℓ = Σ A_k (1 − m_k) / Σ(1 − m_k) − Σ A_k m_k / Σ m_k with m_k the mask resized
    (bilinear + antialias) to h×w. Averaged over heads, then over the valid (sample, subject) pairs.
    """
    batch, num_subjects, height, width = subject_masks.shape
    heads = attention.shape[0] // batch
    positions, length = attention.shape[1], attention.shape[2]
    size = _map_size(positions, height / width)
    masks = F.interpolate(subject_masks.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    masks = masks.reshape(batch, 1, num_subjects, positions)  # [B, 1, K, hw]
    probs = attention.float().reshape(batch, heads, positions, length)
    index = token_index.long().clamp(0, length - 1)[:, None, None, :].expand(batch, heads, positions, num_subjects)
    token_probs = probs.gather(-1, index).transpose(-1, -2)  # [B, heads, K, hw]
    inside = (token_probs * masks).sum(-1) / (masks.sum(-1) + _EPS)
    outside = (token_probs * (1 - masks)).sum(-1) / ((1 - masks).sum(-1) + _EPS)
    per_subject = (outside - inside).mean(dim=1)  # [B, K], averaged over heads
    valid = valid.to(per_subject.dtype)
    return (per_subject * valid).sum() / valid.sum().clamp(min=1)


def localization_loss(
    attention_maps: list[torch.Tensor], subject_masks: torch.Tensor, token_index: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Mean over layers of `localization_loss_one_map`; 0 when no map was captured or no subject is valid."""
    if not attention_maps:
        return subject_masks.new_zeros(())
    losses = [localization_loss_one_map(a, subject_masks, token_index, valid) for a in attention_maps]
    return torch.stack(losses).mean()


class CapturingCrossAttnProcessor:
    """Plain (non-fused) cross-attention that hands its probabilities [B·heads, h·w, L] to `store`."""

    def __init__(self, store: list):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if (
            encoder_hidden_states is None
            or hidden_states.ndim != 3
            or attn.spatial_norm is not None
            or attn.group_norm is not None
        ):
            raise ValueError("CapturingCrossAttnProcessor handles SD-style attn2 cross-attention only")
        batch_size, text_length, _ = encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, text_length, batch_size)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, attention_mask)
        self.store.append(probs)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class CrossAttentionCapture:
    """Installs `CapturingCrossAttnProcessor` on `attn2` of the localization blocks of a UNet.

    `maps` fills during a forward pass; call `clear()` before each one. Install before wrapping in DDP.
    """

    def __init__(self, unet, blocks: tuple[str, ...] = LOCALIZATION_BLOCKS):
        self.maps: list[torch.Tensor] = []
        processor = CapturingCrossAttnProcessor(self.maps)
        processors = {}
        for name in unet.attn_processors:  # keys like "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"
            hooked = name.endswith("attn2.processor") and any(name.startswith(block + ".") for block in blocks)
            processors[name] = processor if hooked else unet.attn_processors[name]
        self.num_layers = sum(isinstance(p, CapturingCrossAttnProcessor) for p in processors.values())
        if self.num_layers == 0:
            raise ValueError(f"the UNet has no attn2 layers in {blocks}")
        unet.set_attn_processor(processors)

    def clear(self) -> None:
        self.maps.clear()
