"""Decoding: every image becomes 8-bit RGB, and an unreadable file is a named error.

Every source (image folders, Hugging Face datasets) goes through ``to_rgb``, so transforms never see
16-bit, float, palette, CMYK or transparent images.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

__all__ = ["IMG_EXTENSIONS", "UnreadableImageError", "open_image", "to_rgb"]

IMG_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".jfif",
    ".png",
    ".bmp",
    ".ppm",
    ".pgm",
    ".tif",
    ".tiff",
    ".webp",
)


class UnreadableImageError(RuntimeError):
    """An image file that PIL cannot decode (corrupt, truncated, empty, or not an image)."""


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    # PIL's own convert("RGB") clips 16/32-bit values at 255, which turns a 16-bit scan into a white
    # sheet. Scale by the nominal range instead, so brightness means the same in every image.
    values = np.asarray(image).astype(np.float32)
    if image.mode.startswith("I;16"):
        values = values / 257.0  # 0..65535 -> 0..255
    else:
        # "I" (int32) and "F" (float32) carry no nominal range. Take the common ones in order:
        # floats in [0, 1], values already in 8-bit range, 16-bit range; anything else (negative or
        # larger values) is stretched min-max, the only mapping that keeps it visible.
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        low, high = float(values.min()), float(values.max())
        if image.mode == "F" and low >= 0.0 and high <= 1.0:
            values = values * 255.0
        elif low >= 0.0 and high <= 255.0:
            pass
        elif low >= 0.0 and high <= 65535.0:
            values = values / 257.0
        else:
            values = (values - low) * (255.0 / max(high - low, 1e-12))
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL image to 8-bit RGB.

    Transparent images are composited onto ``background`` (white) rather than having their alpha
    dropped: the colour stored under fully transparent pixels is arbitrary (often black, sometimes
    leftovers of an editor), so dropping alpha invents content the picture never showed, while white
    reproduces how such images (logos, icons, web graphics) are seen on a page. 16/32-bit and float
    images are scaled to 8 bits, not clipped (see ``_high_depth_to_l``).
    """
    mode = image.mode
    has_key_transparency = "transparency" in image.info
    if mode == "RGB" and not has_key_transparency:
        return image
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_l(image).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or has_key_transparency:
        if mode == "La":  # premultiplied; PIL converts it to RGBA only via LA
            image = image.convert("LA")
        rgba = image.convert("RGBA")
        out = Image.new("RGB", rgba.size, background)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return image.convert("RGB")


def open_image(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` fully into an RGB image; raises whatever PIL raises for a bad file."""
    with Image.open(path) as image:
        image.load()  # truncated and corrupt files fail here, inside the caller's error handling
        return to_rgb(image)
