"""Cheap previews while sampling: latents → RGB by one fixed linear map (no VAE), and the fusion mask so far.

The map is the widely used approximation of SD1.5's VAE decoder by a 4×3 matrix (each latent channel's
contribution to R, G, B, fitted by the community on decoded images; e.g. ComfyUI's live previews use these
factors): rgb ≈ z·M with z the latents as the UNet sees them (VAE output × 0.18215), giving roughly [-1, 1] per
channel. One latent pixel gives one RGB pixel, so a 512² image previews at 64² (×`scale` nearest for visibility).
It is a blurry, colour-shifted impression of the picture, not a decode: on a noisy x_t it shows noise, and it
means nothing for random-init (tiny) models.
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

# rows: latent channels 0..3; columns: R, G, B (SD1.5 latent space)
SD15_LATENT_RGB = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
SD15_LATENT_RGB_BIAS = (0.0, 0.0, 0.0)  # the fit is centred: zero latents are mid-grey


def latents_to_rgb(latents: torch.Tensor, matrix=SD15_LATENT_RGB, bias=SD15_LATENT_RGB_BIAS) -> torch.Tensor:
    """[B, 4, h, w] latents (any dtype or device) → [B, h, w, 3] uint8 on the CPU: (z·M + b) in [-1, 1] → [0, 255]."""
    if latents.ndim != 4 or latents.shape[1] != len(matrix):
        raise ValueError(f"expected latents [B, {len(matrix)}, h, w], got {tuple(latents.shape)}")
    z = latents.detach().float().cpu().permute(0, 2, 3, 1)  # channels last, so the map is one matmul
    rgb = z @ torch.tensor(matrix, dtype=torch.float32) + torch.tensor(bias, dtype=torch.float32)
    return ((rgb + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8)


def preview_images(latents: torch.Tensor, scale: int = 2) -> list[Image.Image]:
    """One RGB PIL image per row of `latents`, enlarged `scale`× by nearest neighbour (latent pixels stay sharp)."""
    images = [Image.fromarray(row.numpy()) for row in latents_to_rgb(latents)]
    return [
        image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale != 1 else image
        for image in images
    ]


def mask_so_far(masks: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """The fusion masks of one image seen so far ([h, w] or [1, h, w] each, or stacked) → their mean [h, w]:
    the fraction of fusion steps in which the SDM's noise was used at each latent pixel."""
    stacked = masks if isinstance(masks, torch.Tensor) else torch.stack([torch.as_tensor(m) for m in masks])
    stacked = stacked.detach().float().cpu()
    if stacked.ndim == 4 and stacked.shape[1] == 1:
        stacked = stacked[:, 0]
    if stacked.ndim != 3:
        raise ValueError(f"expected masks [steps, h, w] (or [steps, 1, h, w]), got {tuple(stacked.shape)}")
    return stacked.mean(dim=0)


def mask_image(mask: torch.Tensor, scale: int = 2) -> Image.Image:
    """A [h, w] (or [1, h, w]) mask in [0, 1] → grayscale PIL image (white = SDM), enlarged `scale`× nearest."""
    mask = mask.detach().float().cpu().squeeze(0)
    if mask.ndim != 2:
        raise ValueError(f"expected a mask [h, w], got {tuple(mask.shape)}")
    pixels = (mask.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    image = Image.fromarray(pixels)  # uint8 [h, w]: mode L
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale != 1 else image
