"""Where each person goes and how strongly: layout boxes and per-subject scales (named options; off by default).

Boxes are `[x0, y0, x1, y1]` fractions of the image, one per `<|image|>` marker. With boxes:
- in the fusion window the SDM may win a latent pixel only inside the union of the boxes (the TDM's noise is used
  everywhere else), and
- in the SDM UNet's cross-attention layers where FastComposer's localization loss looks (down_blocks.1/2,
  mid_block, up_blocks.1/2, `attn2`), subject k's token is visible only to query pixels inside box k: its
  attention weight is exactly zero outside.

A subject scale s blends subject k's fused token with the plain noun embedding: lerp(noun, fused, s), so 1 is the
fused token bit for bit and 0 the noun alone.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch

# the UNet blocks whose cross-attention FastComposer's localization loss supervises (METHOD.md §2)
LOCALIZATION_BLOCKS = ("down_blocks.1.", "down_blocks.2.", "mid_block.", "up_blocks.1.", "up_blocks.2.")


def _one_per_marker(values: Sequence, num_subjects: int, what: str) -> list:
    values = list(values)
    if len(values) != num_subjects:
        raise ValueError(f"{len(values)} {what} given for {num_subjects} <|image|> marker(s); give one per marker")
    return values


def check_boxes(boxes: Sequence | None, num_subjects: int) -> list[tuple[float, float, float, float]] | None:
    """Validate boxes against the number of markers; → a list of 4-tuples (or None when no boxes were given)."""
    if boxes is None:
        return None
    checked = []
    for index, box in enumerate(_one_per_marker(boxes, num_subjects, "box(es)"), start=1):
        try:
            x0, y0, x1, y1 = (float(v) for v in box)
        except (TypeError, ValueError):
            raise ValueError(f"box {index}: expected [x0, y0, x1, y1] as numbers, got {box!r}") from None
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):
            raise ValueError(f"box {index}: coordinates are fractions of the image and must lie in [0, 1], got {box!r}")
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"box {index}: needs x0 < x1 and y0 < y1, got {box!r}")
        checked.append((x0, y0, x1, y1))
    return checked


def check_scales(scales: Sequence | None, num_subjects: int) -> list[float] | None:
    if scales is None:
        return None
    checked = []
    for index, scale in enumerate(_one_per_marker(scales, num_subjects, "subject scale(s)"), start=1):
        try:
            value = float(scale)
        except (TypeError, ValueError):
            raise ValueError(f"subject scale {index}: expected a number, got {scale!r}") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(
                f"subject scale {index}: must be >= 0 (1 = full strength, 0 = the noun alone), got {scale!r}"
            )
        checked.append(value)
    return checked


def scale_subjects(
    text_embeds: torch.Tensor, augmented: torch.Tensor, token_positions: Sequence[int], scales: Sequence[float] | None
) -> torch.Tensor:
    """[1, L, D] embeddings → augmented with subject k's token at lerp(noun, fused, scales[k]) (exact at 0 and 1)."""
    if scales is None:
        return augmented
    out = augmented.clone()
    for position, scale in zip(token_positions, scales):
        if scale != 1.0:
            out[:, position] = torch.lerp(text_embeds[:, position], augmented[:, position], float(scale))
    return out


def box_grid(box: Sequence[float], height: int, width: int) -> torch.Tensor:
    """[height, width] bool: cells whose centre lies in the box; the cell under the box's centre always counts, so
    a small box still owns a cell on a coarse grid."""
    x0, y0, x1, y1 = box
    xs = (torch.arange(width, dtype=torch.float64) + 0.5) / width
    ys = (torch.arange(height, dtype=torch.float64) + 0.5) / height
    inside = ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]
    row = min(int((y0 + y1) / 2 * height), height - 1)
    col = min(int((x0 + x1) / 2 * width), width - 1)
    inside[row, col] = True
    return inside


@dataclass
class SubjectRegions:
    """Per sample of a batch: the token position and box of each subject. The UNets may see this batch tiled
    (the sampler stacks two conditionings), so every query repeats it to the batch it is asked for."""

    tokens: list[list[int]]  # [B][K_b] token positions of the subject nouns
    boxes: list[list[tuple[float, float, float, float]]]  # [B][K_b] boxes as fractions
    latent_size: tuple[int, int]  # (h, w) of the latents, to recover each layer's grid from its length

    def __post_init__(self):
        self._biases: dict = {}  # every step asks again for the same few layer sizes

    def copy(self) -> "SubjectRegions":
        """An independent copy (own lists, empty bias cache), so `keep_samples` on it leaves this one whole."""
        return SubjectRegions([list(t) for t in self.tokens], [list(b) for b in self.boxes], self.latent_size)

    def keep_samples(self, positions: Sequence[int]) -> None:
        """In place: keep only the samples at `positions` (in this order). In place because the boxed-attention
        processors already installed in a UNet hold this object; the cached biases have the old batch, so they go."""
        self.tokens = [self.tokens[p] for p in positions]
        self.boxes = [self.boxes[p] for p in positions]
        self._biases.clear()

    def fusion_region(self, device=None) -> torch.Tensor:
        """[B, 1, h, w] float32: 1 inside the union of a sample's boxes (where the SDM may win), 0 elsewhere; a
        sample without boxes is not restricted."""
        height, width = self.latent_size
        masks = []
        for boxes in self.boxes:
            union = torch.full((height, width), not boxes, dtype=torch.bool)
            for box in boxes:
                union |= box_grid(box, height, width)
            masks.append(union)
        return torch.stack(masks)[:, None].to(device=device, dtype=torch.float32)

    def grid_for(self, length: int) -> tuple[int, int]:
        """A UNet layer's flattened query length → its (h, w): each downsampling halves the grid, rounding up."""
        height, width = self.latent_size
        while height * width > length:
            height, width = -(-height // 2), -(-width // 2)
        if height * width != length:
            raise ValueError(f"no latent grid of {length} cells under {self.latent_size}")
        return height, width

    def attention_bias(self, batch: int, length: int, num_keys: int, dtype, device) -> torch.Tensor:
        """[batch, length, num_keys]: −inf where a query pixel lies outside the box of the subject whose token
        is the key, 0 elsewhere."""
        cache_key = (batch, length, num_keys, dtype, str(device))
        if cache_key in self._biases:
            return self._biases[cache_key]
        height, width = self.grid_for(length)
        bias = torch.zeros(len(self.tokens), length, num_keys, dtype=dtype)
        for sample, (tokens, boxes) in enumerate(zip(self.tokens, self.boxes)):
            for token, box in zip(tokens, boxes):
                outside = ~box_grid(box, height, width).reshape(-1)
                bias[sample, outside, token] = float("-inf")
        if batch % len(self.tokens):
            raise ValueError(f"a UNet batch of {batch} is not a multiple of {len(self.tokens)} samples")
        self._biases[cache_key] = bias.repeat(batch // len(self.tokens), 1, 1).to(device)
        return self._biases[cache_key]


class BoxedCrossAttention:
    """A cross-attention processor with a per-(query, key) bias from `SubjectRegions`. `record=True` keeps the
    last attention probabilities [batch·heads, queries, keys] (for tests and for looking at the maps)."""

    def __init__(self, regions: SubjectRegions, record: bool = False):
        self.regions, self.record, self.probabilities = regions, record, None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is None or hidden_states.ndim != 3:
            raise ValueError("BoxedCrossAttention serves the cross-attention (attn2) of transformer blocks only")
        residual = hidden_states
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        batch, length, _ = hidden_states.shape
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        if attention_mask is not None:
            raise ValueError("layout boxes do not combine with an encoder attention mask")
        bias = self.regions.attention_bias(batch, length, key.shape[1], query.dtype, query.device)
        probabilities = attn.get_attention_scores(query, key, bias.repeat_interleave(attn.heads, dim=0))
        if self.record:
            self.probabilities = probabilities.detach()
        hidden_states = attn.batch_to_head_dim(torch.bmm(probabilities, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def localization_layers(unet) -> list[str]:
    """Names of the cross-attention modules (attn2) in the localization blocks."""
    return [
        name for name, _ in unet.named_modules() if name.endswith(".attn2") and name.startswith(LOCALIZATION_BLOCKS)
    ]


@contextlib.contextmanager
def boxed_attention(unet, regions: SubjectRegions | None, record: bool = False):
    """Within the block, the UNet's localization cross-attention layers follow `regions`; → {layer name: processor}.
    The UNet's own processors come back afterwards, also on errors. `regions=None` changes nothing."""
    if regions is None:
        yield {}
        return
    original = unet.attn_processors
    boxed = {name: BoxedCrossAttention(regions, record) for name in localization_layers(unet)}
    unet.set_attn_processor(
        {name: boxed.get(name.removesuffix(".processor"), processor) for name, processor in original.items()}
    )
    try:
        yield boxed
    finally:
        unet.set_attn_processor(original)
