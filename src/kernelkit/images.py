"""Robust image decoding: any file Pillow can open becomes an RGB image, or a clear error."""
from __future__ import annotations

import warnings

import numpy as np
from PIL import Image, ImageOps

# Kaggle images can be huge (iMet up to 7351 x 5314); allow them but keep a bound against bombs.
Image.MAX_IMAGE_PIXELS = 300_000_000


class BadImage(Exception):
    """A file that cannot be decoded; the message names the file and the reason."""


def to_rgb(img: Image.Image, fill: int = 255) -> Image.Image:
    """Convert every Pillow mode to RGB; transparent pixels become `fill` (white like the iMet seed)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float32)
        hi = float(arr.max()) or 1.0
        scale = 255.0 / (65535.0 if hi > 255 else max(hi, 255.0))
        return Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / ((hi - lo) or 1.0) * 255.0
        return Image.fromarray(arr.astype(np.uint8)).convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (fill, fill, fill, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def load_rgb(path: str, target_size: int = 0, fill: int = 255) -> Image.Image:
    """Open, apply EXIF orientation, convert to RGB.

    `target_size` lets JPEG decode at a reduced scale (draft) when the image is much larger than
    needed; it never goes below twice the target so quality is kept for the resize that follows.
    """
    if not path:
        raise BadImage("missing file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            if target_size and img.format == "JPEG" and min(img.size) > 4 * target_size:
                img.draft("RGB", (2 * target_size, 2 * target_size))
            img = ImageOps.exif_transpose(img)
            img.load()
            return to_rgb(img, fill)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise BadImage(f"{path}: {type(e).__name__}: {e}") from e
