"""Image transforms: aspect handling from the iMet seed, train augmentation, the eval transform,
and batch augmentations (mixup, cutmix, flip, shift/scale/rotate, colour jitter, noise) that run
on whole batches on any device.

A transform has two stages:

* `load(path)` / `base(img)`: deterministic, to the working geometry, uint8 (3, size, size).
  This is the expensive part (decode + resize) and what the pre-resized cache stores.
* `augment(x)`: random, on the uint8 tensor (cheap: crop + resize of a size x size image, flip...).
  It runs the same way on a freshly decoded image and on one read from the cache.

`transform(img)` = `augment(base(img))` for a PIL image or a uint8 tensor. Outputs are uint8 CHW;
normalisation happens on the device (`normalize`), so workers ship 4x fewer bytes than floats.

Randomness: per-sample augmentations draw from Python's `random` (each DataLoader worker is seeded
by `data.seed_worker`); batch functions take an optional `torch.Generator` for their parameters,
so they are reproducible and run wherever the batch lives. Without one they draw on the batch's
device (its global RNG): on a GPU a parameter drawn on the CPU is one blocking upload per draw,
and a parameter read back to choose a branch (mixup's lambda, cutmix's box) is a wait for the
GPU, so nothing in a batch function reads a tensor on the host.
"""
from __future__ import annotations

import functools
import math
import random
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .images import (
    RECT,
    RECT_TAG,
    blank_image,
    channels_last,
    column_rows,
    fit_size,
    load_rect,
    load_resized,
    load_tiles,
    resize_or_pad_tensor,
    resize_tensor,
    to_rect,
    to_tiles,
    unpack_rect,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

AUG_LEVELS = ("none", "flip", "light", "medium", "strong")


def resize_or_pad(img: Image.Image, size: int, pad_aspect: float = 2.0, fill: int = 255) -> Image.Image:
    """Square `size` x `size`: stretch ordinary images, pad very long/thin ones (iMet seed).

    Stretching a 1:5 strip to a square destroys it; fitting the long side and padding the short
    side keeps its content recognisable. (Pillow version; the pipeline uses the tensor twin
    `images.resize_or_pad_tensor`, which makes the same decision and the same offsets.)
    """
    w, h = img.size
    nw, nh = fit_size(w, h, size, pad_aspect)
    if (nw, nh) != (size, size):
        img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=3.0)
        dw, dh = size - nw, size - nh
        return ImageOps.expand(img, (dw // 2, dh // 2, dw - dw // 2, dh - dh // 2), fill=(fill, fill, fill))
    return img.resize((size, size), Image.BILINEAR, reducing_gap=3.0)


def to_tensor_uint8(img: Image.Image) -> torch.Tensor:
    """PIL image -> contiguous uint8 (3, H, W)."""
    img = img if img.mode == "RGB" else img.convert("RGB")
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class EvalTransform:
    """Deterministic: resize or pad to the working size; with `tiles` > 1, `tiles` squares along the
    long side stacked as a (3, tiles * size, size) column (`images.to_tiles`); with tiles RECT, the
    image at its aspect bucket's shape, packed in a fixed-size column (`images.to_rect`) for the
    cache and unpacked to (3, h, w) when the transform is applied."""

    def __init__(self, size: int, pad_aspect: float = 2.0, fill: int = 255, tiles: int = 1):
        self.size, self.pad_aspect, self.fill, self.tiles = int(size), float(pad_aspect), int(fill), int(tiles)

    @property
    def geometry(self) -> tuple[int, float, int, int]:
        """(size, pad_aspect, fill, tiles): what `load` depends on, and what a cache is keyed by."""
        return self.size, self.pad_aspect, self.fill, self.tiles

    @property
    def rect(self) -> bool:
        return self.tiles == RECT

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of what `base` makes."""
        return column_rows(self.size, self.tiles), self.size

    def load(self, path: str) -> torch.Tensor:
        """File -> uint8 (3, H, W) at `shape`; raises images.BadImage."""
        if self.rect:
            return load_rect(path, self.size, self.fill)
        if self.tiles > 1:
            return load_tiles(path, self.size, self.tiles, self.fill)
        return load_resized(path, self.size, self.pad_aspect, self.fill)

    def base(self, img: Image.Image | torch.Tensor) -> torch.Tensor:
        """PIL image or uint8 (3, H, W) tensor -> uint8 (3, H, W) at `shape`; a tensor already at
        that shape (e.g. from the cache) passes through unchanged."""
        if isinstance(img, Image.Image):  # HWC memory, like the decoders' output
            img = torch.from_numpy(np.array(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8))
            x = img.permute(2, 0, 1)
        else:
            x = img
        if tuple(x.shape[-2:]) == self.shape and (not self.rect or is_packed_rect(x)):
            return x  # (a raw image of exactly this shape gives the same tiles: nothing to do either way)
        if self.rect:
            return to_rect(x, self.size, self.fill)
        if self.tiles > 1:
            return to_tiles(x, self.size, self.tiles, self.fill)
        return resize_or_pad_tensor(x, self.size, self.pad_aspect, self.fill)

    def blank(self) -> torch.Tensor:
        """The placeholder of an unreadable file, shaped like the transform's output (rect: unpacked)."""
        x = blank_image(self.size, self.tiles)
        return unpack_rect(x) if self.rect else x

    @property
    def per_image_work(self) -> bool:
        """False when a cached row is already the final image (a loader may then gather whole batches);
        a rect column is unpacked image by image."""
        return self.rect

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def __call__(self, img: Image.Image | torch.Tensor) -> torch.Tensor:
        x = self.base(img)
        return self.augment(unpack_rect(x) if self.rect else x)


class TrainTransform(EvalTransform):
    """Per-sample augmentation on the uint8 working-size tensor.

    aug: none | flip (horizontal flip) | light (flip + random resized crop) | medium (light +
    colour jitter) | strong (medium + shift/scale/rotate + Gaussian noise), the seeds'
    augmentations. On CPU the crop costs ~0.1 ms per image, jitter ~0.5 ms, shift/scale/rotate
    and noise ~1-3 ms: with few cores prefer `flip` or `light` here and the batch functions below
    (`resized_crop_batch`, `affine_batch`, `color_jitter_batch`, `noise_batch`, `mix_batch`) on
    the GPU.
    """

    def __init__(self, size: int, pad_aspect: float = 2.0, fill: int = 255, aug: str = "light", tiles: int = 1, *,
                 crop_scale: tuple[float, float] = (0.6, 1.0), crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 hflip: float = 0.5, vflip: float = 0.0, jitter: float = 0.2, degrees: float = 15.0,
                 translate: float = 0.1, scale: tuple[float, float] = (0.9, 1.1), affine_p: float = 0.5,
                 noise_std: float = 8.0, noise_p: float = 0.5):
        super().__init__(size, pad_aspect, fill, tiles)
        if aug not in AUG_LEVELS:
            raise ValueError(f"unknown aug {aug!r}; choose {' | '.join(AUG_LEVELS)}")
        self.aug = aug
        self.crop_scale, self.crop_ratio = crop_scale, crop_ratio
        self.hflip, self.vflip, self.jitter = hflip, vflip, jitter
        self.degrees, self.translate, self.scale, self.affine_p = degrees, translate, scale, affine_p
        self.noise_std, self.noise_p = noise_std, noise_p

    @property
    def per_image_work(self) -> bool:
        return self.aug != "none" or self.rect

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        if self.tiles > 1 and self.aug != "none":  # each tile on its own: a crop must not straddle two
            s = self.size
            return channels_last(torch.cat([self.augment_square(x[:, k * s:(k + 1) * s]) for k in range(self.tiles)], 1))
        return self.augment_square(x)

    def augment_square(self, x: torch.Tensor) -> torch.Tensor:
        level, rng = AUG_LEVELS.index(self.aug), aug_random()
        if level >= 2:
            h, w = x.shape[-2:] if self.rect else (self.size, self.size)  # a rect image keeps its bucket's shape
            x = random_resized_crop(x, (h, w), self.crop_scale, self.crop_ratio)
        if level >= 1:
            if rng.random() < self.hflip:
                x = x.flip(-1)
            if self.vflip and rng.random() < self.vflip:
                x = x.flip(-2)
        if level >= 4 and rng.random() < self.affine_p:
            angle = rng.uniform(-self.degrees, self.degrees)
            shift = (rng.uniform(-self.translate, self.translate), rng.uniform(-self.translate, self.translate))
            x = affine(_one(x), torch.tensor([angle]), torch.tensor([shift]),
                       torch.tensor([rng.uniform(*self.scale)]), fill=self.fill)[0]
        if level >= 3 and self.jitter:
            j = self.jitter
            x = color_jitter(_one(x), *(torch.tensor([rng.uniform(1 - j, 1 + j)]) for _ in range(3)))[0]
        if level >= 4 and rng.random() < self.noise_p:
            x = add_noise(x, self.noise_std, torch.Generator().manual_seed(rng.getrandbits(62)))
        return channels_last(x)


def is_packed_rect(x: torch.Tensor) -> bool:
    """Whether uint8 (3, H, W) ends with the tag `images.pack_rect` writes (a column from the cache)."""
    tail = x.permute(1, 2, 0).reshape(-1)[-6:-4].tolist() if x.numel() >= 6 else []
    return tuple(tail) == RECT_TAG


_local = threading.local()


def aug_random() -> random.Random:
    """The random stream of per-sample augmentations, one per thread: the threaded loader builds
    batches concurrently, and a shared stream would hand out numbers in scheduling order, so two
    runs with one seed would augment differently. Seeded per batch by the loaders."""
    rng = getattr(_local, "rng", None)
    if rng is None:
        rng = _local.rng = random.Random(random.getrandbits(64))
    return rng


def seed_augmentations(seed: int) -> None:
    _local.rng = random.Random(seed)


def _one(x: torch.Tensor) -> torch.Tensor:
    """(3, H, W) -> (1, 3, H, W) keeping channels-last memory recognisable (see images.resize_tensor)."""
    return x.permute(1, 2, 0).unsqueeze(0).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- per-sample ops
def crop_params(h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop with area fraction in `scale` and aspect in
    `ratio` (torchvision's RandomResizedCrop rule; falls back to the whole image)."""
    area, rng = h * w, aug_random()
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        r = math.exp(rng.uniform(*log_r))
        cw, ch = round(math.sqrt(target * r)), round(math.sqrt(target / r))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, h - ch), rng.randint(0, w - cw), ch, cw
    return 0, 0, h, w


def random_resized_crop(x: torch.Tensor, size: int | tuple[int, int], scale=(0.6, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """uint8 (3, H, W) -> (3, size, size) (or (3, h, w) for size (h, w)): random crop, resized back
    (antialiased bilinear)."""
    h, w = (size, size) if isinstance(size, int) else size
    top, left, ch, cw = crop_params(x.shape[-2], x.shape[-1], scale, ratio)
    return resize_tensor(x[:, top:top + ch, left:left + cw], h, w)


def add_noise(x: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise with `std` in pixel levels (0..255 scale); keeps the dtype."""
    return _back(x.float() + _randn_like(x, generator) * std, x.dtype)


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device (x's when None)."""
    dev = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=dev).to(x.device)


def _back(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float result on the 0..255 scale -> the input's dtype (rounded for uint8)."""
    y = y.clamp(0, 255)
    return y.round_().to(torch.uint8) if dtype == torch.uint8 else y.to(dtype)


# ----------------------------------------------------------------------------- batch ops
# All take images on the 0..255 scale, (N, 3, H, W) uint8 or float (e.g. `x.float()` on the GPU
# before `normalize`), and return the same dtype and device. Parameters are explicit; random ones
# are drawn from `generator` (a CPU torch.Generator, or the global RNG when None).
def _rand(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) draws on `device`: from `generator` where it lives (one copy), else from the
    device's own RNG (no copy at all)."""
    if generator is None:
        return torch.rand(n, device=device)
    return torch.rand(n, generator=generator, device=generator.device).to(device, non_blocking=True)


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return lo + (hi - lo) * _rand(n, generator, device)


def affine(x: torch.Tensor, angle: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
           fill: float = 0.0) -> torch.Tensor:
    """Rotate (degrees, counter-clockwise), shift (fraction of width/height, (N, 2)) and scale each
    image of the batch about its centre; uncovered pixels get `fill`. Bilinear."""
    n, _, h, w = x.shape
    dev = x.device
    a = angle.to(dev, torch.float32) * (math.pi / 180)
    s = scale.to(dev, torch.float32).clamp_min(1e-3)
    cos, sin = torch.cos(a) / s, torch.sin(a) / s
    # affine_grid maps output -> input coordinates in [-1, 1]; account for a non-square aspect.
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * h / w
    theta[:, 1, 0], theta[:, 1, 1] = sin * w / h, cos
    t = shift.to(dev, torch.float32).view(n, 2) * 2
    theta[:, 0, 2] = -(theta[:, 0, 0] * t[:, 0] + theta[:, 0, 1] * t[:, 1])
    theta[:, 1, 2] = -(theta[:, 1, 0] * t[:, 0] + theta[:, 1, 1] * t[:, 1])
    grid = F.affine_grid(theta, [n, 3, h, w], align_corners=False)
    xf = x.float() - fill
    y = F.grid_sample(xf, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
    return _back(y, x.dtype)


def color_jitter(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor,
                 saturation: torch.Tensor) -> torch.Tensor:
    """Per-image factors (N,) (1 = unchanged), applied as brightness, contrast, saturation."""
    dev = x.device
    b, c, s = (f.to(dev, torch.float32).view(-1, 1, 1, 1) for f in (brightness, contrast, saturation))
    y = x.to(torch.float32, copy=True).mul_(b).clamp_(0, 255)  # copy: never touch the caller's tensor
    mean = _gray(y).mean((2, 3), keepdim=True)
    y.mul_(c).add_(mean * (1 - c)).clamp_(0, 255)
    gray = _gray(y)
    y.mul_(s).add_(gray * (1 - s))
    return _back(y, x.dtype)


def _gray(y: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of float (N, 3, H, W) -> (N, 1, H, W)."""
    return (y[:, 0:1] * 0.299).add_(y[:, 1:2], alpha=0.587).add_(y[:, 2:3], alpha=0.114)


def hflip_batch(x: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    flip = (_rand(len(x), generator, x.device) < p).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x)


def affine_batch(x: torch.Tensor, degrees: float = 15.0, translate: float = 0.1,
                 scale: tuple[float, float] = (0.9, 1.1), p: float = 1.0, fill: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Random shift/scale/rotate per image (the seeds' ShiftScaleRotate), with probability p."""
    n, dev = len(x), x.device
    angle = _uniform(n, -degrees, degrees, generator, dev)
    shift = _uniform(2 * n, -translate, translate, generator, dev).view(n, 2)
    sc = _uniform(n, scale[0], scale[1], generator, dev)
    on = _rand(n, generator, dev) < p
    # torch.where, not masked assignment: a boolean index is a nonzero(), which waits for the GPU.
    return affine(x, torch.where(on, angle, 0.0), torch.where(on[:, None], shift, 0.0), torch.where(on, sc, 1.0),
                  fill)


def resized_crop_batch(x: torch.Tensor, scale: tuple[float, float] = (0.6, 1.0),
                       ratio: tuple[float, float] = (3 / 4, 4 / 3),
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Random resized crop of every image, back to the same size (bilinear): a crop with area
    fraction in `scale` and aspect ratio in `ratio`, at a random position. The batch twin of
    TrainTransform's per-sample crop, for running it on the GPU."""
    n, _, h, w = x.shape
    dev = x.device
    area = _uniform(n, scale[0], scale[1], generator, dev)
    r = torch.exp(_uniform(n, math.log(ratio[0]), math.log(ratio[1]), generator, dev))
    cw = torch.sqrt(area * r * h / w).clamp(max=1.0)  # crop size as a fraction of the width / height,
    ch = torch.sqrt(area / r * w / h).clamp(max=1.0)  # its aspect ratio (in pixels) r
    cx = (1 - cw) * (_rand(n, generator, dev) - 0.5)  # crop centre offset, fraction of the size
    cy = (1 - ch) * (_rand(n, generator, dev) - 0.5)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 1, 1] = cw, ch
    theta[:, 0, 2], theta[:, 1, 2] = 2 * cx, 2 * cy
    grid = F.affine_grid(theta, [n, x.shape[1], h, w], align_corners=False)
    y = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return _back(y, x.dtype)


def color_jitter_batch(x: torch.Tensor, brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Factors drawn uniformly from [1 - v, 1 + v] per image."""
    n, dev = len(x), x.device
    return color_jitter(x, _uniform(n, 1 - brightness, 1 + brightness, generator, dev),
                        _uniform(n, 1 - contrast, 1 + contrast, generator, dev),
                        _uniform(n, 1 - saturation, 1 + saturation, generator, dev))


def noise_batch(x: torch.Tensor, std: float = 8.0, p: float = 0.5,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise (std in pixel levels) on a random share p of the images."""
    on = (_rand(len(x), generator, x.device) < p).to(torch.float32).view(-1, 1, 1, 1)
    return _back(x.float() + _randn_like(x, generator) * (std * on), x.dtype)


# ----------------------------------------------------------------------------- mixup / cutmix
def soft_targets(y: torch.Tensor, num_classes: int = 0) -> torch.Tensor:
    """Class indices (N,) -> one-hot float (N, C); multi-hot/soft (N, C) -> float as is."""
    if y.ndim == 1:
        if num_classes <= 0:
            raise ValueError("class-index targets need num_classes to be mixed")
        # scatter, not F.one_hot: one_hot checks the range of y on the host (a wait for the GPU).
        return torch.zeros(len(y), num_classes, device=y.device).scatter_(1, y.long()[:, None], 1.0)
    return y.float()


def _beta(alpha: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """lam ~ Beta(alpha, alpha) as a 0-d tensor on `device` (G1 / (G1 + G2), Gi ~ Gamma(alpha)),
    drawn where it is used: a lambda read on the host would wait for the GPU every batch."""
    conc = torch.full((2,), float(alpha), device=generator.device if generator is not None else device)
    g = torch._standard_gamma(conc, generator=generator)
    return (g[0] / g.sum().clamp_min(1e-12)).to(device, non_blocking=True)


def _lam(lam: float | torch.Tensor | None, alpha: float, generator: torch.Generator | None,
         device: torch.device) -> torch.Tensor:
    if lam is None:
        return _beta(alpha, generator, device)
    return lam.to(device, torch.float32) if isinstance(lam, torch.Tensor) else torch.full((), float(lam), device=device)


def _partners(n: int, perm: torch.Tensor | None, generator: torch.Generator | None,
              device: torch.device) -> torch.Tensor:
    if perm is None:
        gdev = generator.device if generator is not None else device
        return torch.randperm(n, generator=generator, device=gdev).to(device, non_blocking=True)
    return perm.long().to(device)


def _mix_ok(ok: torch.Tensor | None, perm: torch.Tensor) -> torch.Tensor | None:
    """A mixed image is usable only if both its sources were readable."""
    return None if ok is None else ok * ok[perm.to(ok.device)]


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float = 0.4, num_classes: int = 0,
          ok: torch.Tensor | None = None, lam: float | torch.Tensor | None = None, perm: torch.Tensor | None = None,
          generator: torch.Generator | None = None):
    """x' = lam x + (1 - lam) x[perm], y' likewise, lam ~ Beta(alpha, alpha).

    -> (x', y' float (N, C), ok' or None). Targets: class indices (give num_classes) or
    (N, C) multi-hot. `ok` (1 = readable) is mixed as ok * ok[perm]. uint8 images are rounded.
    """
    t = soft_targets(y, num_classes)
    lam = _lam(lam, alpha, generator, x.device)
    perm = _partners(len(x), perm, generator, x.device)
    xm = _back(x.float() * lam + x[perm].float() * (1 - lam), x.dtype)
    lam_t = lam.to(t.device)
    return xm, t * lam_t + t[perm.to(t.device)] * (1 - lam_t), _mix_ok(ok, perm)


def cutmix_mask(h: int, w: int, lam: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool (h, w) on lam's device: a box of area ~ (1 - lam) h w at a random centre, clipped to the
    image. Built by comparisons, so the box never has to be read on the host to slice with it."""
    dev = lam.device
    r = (1.0 - lam).clamp_min(0.0).sqrt()
    ch, cw = (h * r).floor(), (w * r).floor()
    u = _rand(2, generator, dev)
    cy, cx = (u[0] * h).floor(), (u[1] * w).floor()
    y0, y1 = (cy - (ch / 2).floor()).clamp_min(0), (cy + ch - (ch / 2).floor()).clamp_max(h)
    x0, x1 = (cx - (cw / 2).floor()).clamp_min(0), (cx + cw - (cw / 2).floor()).clamp_max(w)
    rows, cols = torch.arange(h, device=dev), torch.arange(w, device=dev)
    return ((rows >= y0) & (rows < y1))[:, None] & ((cols >= x0) & (cols < x1))[None, :]


def cutmix(x: torch.Tensor, y: torch.Tensor, alpha: float = 1.0, num_classes: int = 0,
           ok: torch.Tensor | None = None, lam: float | torch.Tensor | None = None, perm: torch.Tensor | None = None,
           generator: torch.Generator | None = None):
    """Paste a box of x[perm] into x; targets mixed by the pasted area actually used.

    -> (x', y' float (N, C), ok' or None); see `mixup` for the arguments.
    """
    t = soft_targets(y, num_classes)
    lam = _lam(lam, alpha, generator, x.device)
    perm = _partners(len(x), perm, generator, x.device)
    h, w = x.shape[-2:]
    mask = cutmix_mask(h, w, lam, generator)
    xm = torch.where(mask, x[perm], x)
    kept = (1.0 - mask.float().mean()).to(t.device)  # the share of each image that stayed its own
    return xm, t * kept + t[perm.to(t.device)] * (1 - kept), _mix_ok(ok, perm)


def mix_batch(x: torch.Tensor, y: torch.Tensor, mixup_alpha: float = 0.4, cutmix_alpha: float = 1.0,
              prob: float = 1.0, switch_prob: float = 0.5, num_classes: int = 0,
              ok: torch.Tensor | None = None, generator: torch.Generator | None = None):
    """With probability `prob` apply cutmix (probability `switch_prob`, when cutmix_alpha > 0) or
    mixup (when mixup_alpha > 0); otherwise return the batch with targets made float. The branch is
    chosen with a host random stream (augmentation's, or one seeded from `generator`), so choosing
    it never reads the device."""
    rng = aug_random() if generator is None else random.Random(
        int(torch.randint(2**62, (1,), generator=generator, device=generator.device)))
    if rng.random() < prob:
        if cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < switch_prob):
            return cutmix(x, y, cutmix_alpha, num_classes, ok, generator=generator)
        if mixup_alpha > 0:
            return mixup(x, y, mixup_alpha, num_classes, ok, generator=generator)
    return x, soft_targets(y, num_classes), ok


BATCH_AUG_LEVELS = ("", "flip", "light", "medium", "strong")


class BatchAugment:
    """Augmentation of a whole batch on the training device, then mixup/cutmix.

    On Kaggle the 4 CPU cores feed the GPU; moving crop/flip/colour/affine/noise to the GPU
    (with aug='none' in the workers, or a cached dataset) frees them. Levels add up like
    TrainTransform's: flip; light = + random resized crop; medium = + colour jitter;
    strong = + shift/scale/rotate and noise, each on half the images and with `fill` outside the
    image, as TrainTransform does them. -> (x float 0-255, targets, ok).
    """

    def __init__(self, level: str = "", mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 num_classes: int = 0, fill: float = 0.0):
        if level not in BATCH_AUG_LEVELS:
            raise ValueError(f"unknown batch augmentation {level!r}; choose from {BATCH_AUG_LEVELS}")
        self.level, self.mixup_alpha, self.cutmix_alpha = level, mixup_alpha, cutmix_alpha
        self.num_classes, self.fill = num_classes, float(fill)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, ok: torch.Tensor):
        x = x.float()
        rank = BATCH_AUG_LEVELS.index(self.level)
        if rank >= 2:
            x = resized_crop_batch(x)
        if rank >= 1:
            x = hflip_batch(x)
        if rank >= 3:
            x = color_jitter_batch(x)
        if rank >= 4:
            x = noise_batch(affine_batch(x, p=0.5, fill=self.fill))
        if self.mixup_alpha > 0 or self.cutmix_alpha > 0:
            x, y, ok = mix_batch(x, y, self.mixup_alpha, self.cutmix_alpha, num_classes=self.num_classes, ok=ok)
        return x, y, ok


@dataclass(frozen=True)
class Preprocess:
    """What the model's weights expect of its input, stored in checkpoints so inference uses what
    training used. `interpolation` is recorded for other tools; our uint8 resize is bilinear with
    antialiasing whatever the weights were trained with."""
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std), "interpolation": self.interpolation}

    @classmethod
    def from_dict(cls, d: dict | None) -> "Preprocess":
        """None (a checkpoint from before this was stored): ImageNet, what every older run used."""
        if not d:
            return IMAGENET
        return cls(tuple(map(float, d["mean"])), tuple(map(float, d["std"])), str(d.get("interpolation", "bilinear")))


IMAGENET = Preprocess()


@functools.lru_cache(maxsize=16)
def _statistics(pre: Preprocess, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) * 255 as (1, 3, 1, 1) tensors on `device`, uploaded once per device: built per
    batch they were two blocking host-to-device copies every training step and predict batch."""
    mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1) * 255
    return mean, std


def normalize(batch: torch.Tensor, channels_last: bool, pre: Preprocess) -> torch.Tensor:
    """uint8 NCHW on any device -> float normalised with the model's statistics (no default: a
    caller that forgot them would silently feed a 0.5/0.5 model ImageNet-normalised inputs)."""
    mean, std = _statistics(pre, batch.device)
    x = (batch.float() - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


# ----------------------------------------------------------------------------- tiles
def fold_tiles(x: torch.Tensor, tiles: int) -> tuple[torch.Tensor, int]:
    """A batch of `tiles`-tile columns (N, 3, T * s, s) -> (N * T, 3, s, s) and T; any other batch as
    is (T = 1: squares, rect images). Image k's tiles are rows k*T .. k*T + T - 1 (what `pool_tiles`
    expects). The count comes from the loader (`loaders.loader_tiles`), not the shape: a portrait
    rect bucket can be exactly twice as tall as it is wide."""
    n, c, h, w = x.shape
    if tiles < 2 or h != tiles * w:
        return x, 1
    t = tiles
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    y = x.reshape(n, c, t, w, w).transpose(1, 2).reshape(n * t, c, w, w)
    return (y.contiguous(memory_format=torch.channels_last) if cl else y), t


def pool_tiles(logits: torch.Tensor, tiles: int) -> torch.Tensor:
    """(N * T, C) -> (N, C): each class's largest logit over an image's tiles (an object in any tile
    is in the image; iMet solutions took the max over crops). T = 1: unchanged."""
    return logits if tiles == 1 else logits.view(-1, tiles, logits.shape[-1]).amax(1)


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
