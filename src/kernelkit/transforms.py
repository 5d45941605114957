"""Image transforms: aspect handling from the iMet seed, train augmentation, the eval transform.

Transforms map a PIL RGB image to a uint8 CHW tensor; normalisation happens on the device
(`normalize`), so workers ship 4x fewer bytes than float tensors.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_or_pad(img: Image.Image, size: int, pad_aspect: float = 2.0, fill: int = 255) -> Image.Image:
    """Square `size` x `size`: stretch ordinary images, pad very long/thin ones (iMet seed).

    Stretching a 1:5 strip to a square destroys it; fitting the long side and padding the short
    side keeps its content recognisable.
    """
    w, h = img.size
    if pad_aspect and max(w, h) / max(1, min(w, h)) > pad_aspect:
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=3.0)
        dw, dh = size - nw, size - nh
        return ImageOps.expand(img, (dw // 2, dh // 2, dw - dw // 2, dh - dh // 2), fill=(fill, fill, fill))
    return img.resize((size, size), Image.BILINEAR, reducing_gap=3.0)


def to_tensor_uint8(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class EvalTransform:
    """Deterministic: resize or pad to the working size."""

    def __init__(self, size: int, pad_aspect: float = 2.0, fill: int = 255):
        self.size, self.pad_aspect, self.fill = size, pad_aspect, fill

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return to_tensor_uint8(resize_or_pad(img, self.size, self.pad_aspect, self.fill))


class TrainTransform(EvalTransform):
    """Random horizontal flip, and for aug='light' a mild random resized crop."""

    def __init__(self, size: int, pad_aspect: float = 2.0, fill: int = 255, aug: str = "light"):
        super().__init__(size, pad_aspect, fill)
        if aug not in ("none", "flip", "light"):
            raise ValueError(f"unknown aug {aug!r}; choose none | flip | light")
        self.aug = aug

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if self.aug == "light":
            img = resize_or_pad(img, int(self.size * 1.15), self.pad_aspect, self.fill)
            w, h = img.size
            area = w * h * random.uniform(0.6, 1.0)
            ratio = random.uniform(3 / 4, 4 / 3)
            cw = min(w, round((area * ratio) ** 0.5))
            ch = min(h, round((area / ratio) ** 0.5))
            x, y = random.randint(0, w - cw), random.randint(0, h - ch)
            img = img.crop((x, y, x + cw, y + ch)).resize((self.size, self.size), Image.BILINEAR)
        else:
            img = resize_or_pad(img, self.size, self.pad_aspect, self.fill)
        if self.aug != "none" and random.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor_uint8(img)


def normalize(batch: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 NCHW on any device -> float normalised with ImageNet statistics."""
    mean = torch.tensor(IMAGENET_MEAN, device=batch.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=batch.device).view(1, 3, 1, 1) * 255
    x = (batch.float() - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# Test-time views: each maps a normalised batch to a view of it. Chosen by level, in this order.
def tta_identity(x: torch.Tensor) -> torch.Tensor:
    return x


def tta_hflip(x: torch.Tensor) -> torch.Tensor:
    return torch.flip(x, dims=[3])


def tta_vflip(x: torch.Tensor) -> torch.Tensor:
    return torch.flip(x, dims=[2])


def tta_hvflip(x: torch.Tensor) -> torch.Tensor:
    return torch.flip(x, dims=[2, 3])


TTA_VIEWS = (tta_identity, tta_hflip, tta_vflip, tta_hvflip)


def tta_views(level: int) -> tuple:
    if not 1 <= level <= len(TTA_VIEWS):
        raise ValueError(f"tta must be 1..{len(TTA_VIEWS)}, got {level}")
    return TTA_VIEWS[:level]
