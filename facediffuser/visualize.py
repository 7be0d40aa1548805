"""Pictures people would rather look at than numbers: fusion masks, overlays, image grids."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw


def mask_grid(masks: torch.Tensor, cell: int = 64, gap: int = 2) -> Image.Image:
    """[steps, B, h, w] masks in [0, 1] → one image: a row per sample, a column per fusion step (white = SDM)."""
    steps, batch = masks.shape[:2]
    if steps == 0:
        return Image.new("L", (cell, cell * max(batch, 1)), 0)
    h, w = masks.shape[-2:]
    cell_w = max(1, round(cell * w / h))
    grid = Image.new("L", (steps * (cell_w + gap) - gap, batch * (cell + gap) - gap), 128)
    for b in range(batch):
        for s in range(steps):
            tile = Image.fromarray((masks[s, b].float().clamp(0, 1).numpy() * 255).astype(np.uint8))
            grid.paste(tile.resize((cell_w, cell), Image.NEAREST), (s * (cell_w + gap), b * (cell + gap)))
    return grid


BOX_COLOURS = [(40, 200, 255), (255, 210, 40), (120, 255, 120), (255, 120, 255)]  # subject 1..4


def mask_overlay(image: Image.Image, mask: torch.Tensor, alpha: float = 0.45, boxes=None) -> Image.Image:
    """Tint `image` red where the SDM dominated; `mask` is [h, w] in [0, 1] (e.g. the mean over fusion steps).
    `boxes` (layout boxes as fractions, one per subject) are drawn as numbered outlines, one colour per subject."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    big = Image.fromarray((mask.float().clamp(0, 1).numpy() * 255).astype(np.uint8)).resize(image.size, Image.BILINEAR)
    weight = np.asarray(big, dtype=np.float32)[..., None] / 255.0 * alpha
    red = np.array([255.0, 40.0, 40.0])
    overlay = Image.fromarray((base * (1 - weight) + red * weight).round().astype(np.uint8))
    width, height = overlay.size
    draw = ImageDraw.Draw(overlay)
    for index, (x0, y0, x1, y1) in enumerate(boxes or []):
        colour = BOX_COLOURS[index % len(BOX_COLOURS)]
        corners = [round(x0 * (width - 1)), round(y0 * (height - 1)), round(x1 * (width - 1)), round(y1 * (height - 1))]
        draw.rectangle(corners, outline=colour, width=max(1, width // 128))
        draw.text((corners[0] + 2, corners[1] + 1), str(index + 1), fill=colour)
    return overlay


def mask_pictures(images: list[Image.Image], masks: torch.Tensor, boxes=None) -> tuple[Image.Image, list[Image.Image]]:
    """What a user looks at after sampling: the fusion-mask grid of `masks` [steps, B, h, w] and, when fusion ran,
    each image with its mean mask (and the layout boxes) over it."""
    if not masks.shape[0]:
        return mask_grid(masks), []
    mean = masks.mean(dim=0)
    return mask_grid(masks), [mask_overlay(image, mean[k], boxes=boxes) for k, image in enumerate(images)]


def image_grid(images: list[Image.Image], columns: int, labels: list[str] | None = None) -> Image.Image:
    """Lay images out in a grid (all resized to the first one's size), with optional captions."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    width, height = images[0].size
    label_h = 14 if labels else 0
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * width, rows * (height + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for index, image in enumerate(images):
        x, y = (index % columns) * width, (index // columns) * (height + label_h)
        grid.paste(image.convert("RGB").resize((width, height)), (x, y + label_h))
        if labels:
            draw.text((x + 2, y + 1), labels[index][: max(4, width // 6)], fill="black")
    return grid


def grid_rows(picks: list[tuple[Image.Image, int]], cell: int = 64, gap: int = 2) -> Image.Image:
    """Rows of mask_grid pictures as one grid, in the order given: `picks` holds (a grid, the row to take), e.g.
    the chosen candidates of several best_of rounds. The grids are alike in width (the same fusion steps)."""
    width = max(grid.width for grid, _ in picks)
    out = Image.new("L", (width, len(picks) * (cell + gap) - gap), 128)
    for k, (grid, row) in enumerate(picks):
        top = row * (cell + gap)
        out.paste(grid.crop((0, top, grid.width, top + cell)), (0, k * (cell + gap)))
    return out
