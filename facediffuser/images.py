"""Image I/O shared by the pipeline, the CLI, preprocessing and serving: decode anything sane to RGB.

torch is imported only by the functions that need it: decoding alone stays light (preprocessing workers).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:  # annotations only: importing torch here would make decoding heavy
    import torch

DEFAULT_MAX_PIXELS = 40_000_000


class ImageDecodeError(ValueError):
    """Raised with a one-line reason when bytes are not a usable image."""


def _to_rgb(image: Image.Image) -> Image.Image:
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits, keep contrast
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image") -> Image.Image:
    """Bytes → RGB PIL image (EXIF orientation applied), or ImageDecodeError naming the problem."""
    if not data:
        raise ImageDecodeError(f"{name}: empty file")
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as exc:  # PIL raises several types for "not an image"
        raise ImageDecodeError(f"{name}: not a decodable image ({type(exc).__name__})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageDecodeError(f"{name}: {width}x{height} exceeds the limit of {max_pixels} pixels")
    try:
        image.load()
        return _to_rgb(image)
    except Exception as exc:
        raise ImageDecodeError(f"{name}: truncated or corrupt image ({type(exc).__name__}: {exc})") from None


def load_image(source, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A path, bytes, PIL image, HxWx3 uint8 array or [3,H,W] float tensor in [0,1] → RGB PIL image."""
    if isinstance(source, Image.Image):
        return _to_rgb(source)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ImageDecodeError(f"{path}: no such file")
        return decode_image(path.read_bytes(), max_pixels=max_pixels, name=str(path))
    if isinstance(source, (bytes, bytearray)):
        return decode_image(bytes(source), max_pixels=max_pixels)
    if isinstance(source, np.ndarray):
        if source.ndim == 2:
            source = np.stack([source] * 3, axis=-1)
        if source.ndim != 3 or source.shape[2] not in (3, 4):
            raise ImageDecodeError(f"array image must be HxWx3, got shape {source.shape}")
        return _to_rgb(Image.fromarray(np.ascontiguousarray(source[..., :3]).astype(np.uint8)))
    torch = sys.modules.get("torch")  # a tensor can only come from an already imported torch
    if torch is not None and isinstance(source, torch.Tensor):
        if source.ndim != 3 or source.shape[0] != 3:
            raise ImageDecodeError(f"tensor image must be [3,H,W] in [0,1], got shape {tuple(source.shape)}")
        array = (source.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round()
        return Image.fromarray(array.astype(np.uint8))
    raise ImageDecodeError(f"unsupported image type {type(source).__name__}")


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL → [3, H, W] float32 in [0, 1]."""
    import torch

    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


def pad_to_square(image: torch.Tensor) -> torch.Tensor:
    """[3, H, W] → [3, S, S] with black padding, centred (the SDM's object preprocessing)."""
    _, height, width = image.shape
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    out = image.new_zeros(3, side, side)
    out[:, top : top + height, left : left + width] = image
    return out


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [0, 1] → list of PIL images."""
    arrays = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]


def png_bytes(image: Image.Image) -> bytes:
    """A PIL image → the bytes of its PNG file (what the HTTP API returns, base64-encoded)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
