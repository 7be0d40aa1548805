"""Cheap previews: latents → RGB by the fixed SD1.5 linear map, and the fusion mask so far as a grayscale PNG."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from facediffuser.images import png_bytes
from facediffuser.preview import latents_to_rgb, mask_image, mask_so_far, preview_images


def test_shape_dtype_and_scale():
    latents = torch.randn(3, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    rgb = latents_to_rgb(latents)
    assert rgb.shape == (3, 8, 12, 3) and rgb.dtype == torch.uint8
    images = preview_images(latents)
    assert len(images) == 3 and all(im.mode == "RGB" and im.size == (24, 16) for im in images)  # ×2, (w, h)
    assert preview_images(latents, scale=1)[0].size == (12, 8)
    # nearest: each latent pixel is a 2×2 block of its own colour
    assert images[1].getpixel((5, 3)) == tuple(rgb[1, 1, 2].tolist())
    with pytest.raises(ValueError, match="latents"):
        latents_to_rgb(torch.zeros(1, 3, 8, 8))


def test_deterministic_and_independent_of_dtype_and_batch():
    latents = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(latents_to_rgb(latents), latents_to_rgb(latents.clone()))
    assert torch.equal(latents_to_rgb(latents)[1:], latents_to_rgb(latents[1:]))
    half = latents.half()
    assert torch.equal(latents_to_rgb(half), latents_to_rgb(half.float()))


def test_known_latents_map_to_the_expected_colours():
    latents = torch.zeros(4, 4, 1, 1)
    latents[1, 3] = -1.0  # −channel 3 is bluish: (0.2120, 0.2616, 0.7177) → ((x + 1) · 127.5)
    latents[2, 0] = 10.0  # far out of range: clamped to white
    latents[3, 0] = -10.0  # … and to black
    rgb = latents_to_rgb(latents)[:, 0, 0].tolist()
    assert rgb[0] == [128, 128, 128]  # zero latents: mid-grey (127.5 rounds to even 128)
    assert rgb[1] == [155, 161, 219]
    assert rgb[2] == [255, 255, 255] and rgb[3] == [0, 0, 0]


def test_mask_so_far_and_its_png():
    masks = [torch.zeros(1, 4, 4), torch.ones(1, 4, 4), torch.zeros(1, 4, 4)]
    masks[2][0, 0, 0] = 1.0
    mean = mask_so_far(masks)
    assert (
        mean.shape == (4, 4) and mean[0, 0].item() == pytest.approx(2 / 3) and mean[1, 1].item() == pytest.approx(1 / 3)
    )
    assert torch.equal(mask_so_far(torch.stack(masks)), mean)
    image = mask_image(mean)
    assert image.mode == "L" and image.size == (8, 8)
    assert image.getpixel((0, 0)) == 170 and image.getpixel((7, 7)) == 85  # round(255·2/3), round(255/3)
    data = png_bytes(image)
    assert data.startswith(b"\x89PNG") and len(data) < 1000
    assert Image.open(io.BytesIO(data)).tobytes() == image.tobytes()
    with pytest.raises(ValueError, match="masks"):
        mask_so_far(torch.zeros(2, 2, 4, 4))
