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
by `data.seed_worker`); batch functions take an optional `torch.Generator` (CPU) for their
parameters, so they are reproducible and run wherever the batch lives.
"""
from __future__ import annotations

import math
import random
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .images import (blank_image, channels_last, fit_size, load_resized, load_tiles, resize_or_pad_tensor,
                     resize_tensor, to_tiles)

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
    long side stacked as a (3, tiles * size, size) column (`images.to_tiles`)."""

    def __init__(self, size: int, pad_aspect: float = 2.0, fill: int = 255, tiles: int = 1):
        self.size, self.pad_aspect, self.fill, self.tiles = int(size), float(pad_aspect), int(fill), int(tiles)

    @property
    def geometry(self) -> tuple[int, float, int, int]:
        """(size, pad_aspect, fill, tiles): what `load` depends on, and what a cache is keyed by."""
        return self.size, self.pad_aspect, self.fill, self.tiles

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of what `base` makes."""
        return self.tiles * self.size, self.size

    def load(self, path: str) -> torch.Tensor:
        """File -> uint8 (3, H, W) at `shape`; raises images.BadImage."""
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
        if tuple(x.shape[-2:]) == self.shape:
            return x  # (a raw image of exactly this shape gives the same tiles: nothing to do either way)
        if self.tiles > 1:
            return to_tiles(x, self.size, self.tiles, self.fill)
        return resize_or_pad_tensor(x, self.size, self.pad_aspect, self.fill)

    def blank(self) -> torch.Tensor:
        """The placeholder of an unreadable file, at `shape`."""
        return blank_image(self.size, self.tiles)

    @property
    def per_image_work(self) -> bool:
        """False when a cached row is already the final image (a loader may then gather whole batches)."""
        return False

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def __call__(self, img: Image.Image | torch.Tensor) -> torch.Tensor:
        return self.augment(self.base(img))


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
        return self.aug != "none"

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        if self.tiles > 1 and self.aug != "none":  # each tile on its own: a crop must not straddle two
            s = self.size
            return channels_last(torch.cat([self.augment_square(x[:, k * s:(k + 1) * s]) for k in range(self.tiles)], 1))
        return self.augment_square(x)

    def augment_square(self, x: torch.Tensor) -> torch.Tensor:
        level, rng = AUG_LEVELS.index(self.aug), aug_random()
        if level >= 2:
            x = random_resized_crop(x, self.size, self.crop_scale, self.crop_ratio)
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


def random_resized_crop(x: torch.Tensor, size: int, scale=(0.6, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """uint8 (3, H, W) -> (3, size, size): random crop, resized back (antialiased bilinear)."""
    top, left, ch, cw = crop_params(x.shape[-2], x.shape[-1], scale, ratio)
    return resize_tensor(x[:, top:top + ch, left:left + cw], size, size)


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
def _gdev(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _rand(n: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=_gdev(generator)).cpu()


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator | None) -> torch.Tensor:
    return lo + (hi - lo) * _rand(n, generator)


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
    flip = (_rand(len(x), generator) < p).to(x.device).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x)


def affine_batch(x: torch.Tensor, degrees: float = 15.0, translate: float = 0.1,
                 scale: tuple[float, float] = (0.9, 1.1), p: float = 1.0, fill: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Random shift/scale/rotate per image (the seeds' ShiftScaleRotate), with probability p."""
    n = len(x)
    angle = _uniform(n, -degrees, degrees, generator)
    shift = _uniform(2 * n, -translate, translate, generator).view(n, 2)
    sc = _uniform(n, scale[0], scale[1], generator)
    off = _rand(n, generator) >= p
    angle[off], shift[off], sc[off] = 0.0, 0.0, 1.0
    return affine(x, angle, shift, sc, fill)


def resized_crop_batch(x: torch.Tensor, scale: tuple[float, float] = (0.6, 1.0),
                       ratio: tuple[float, float] = (3 / 4, 4 / 3),
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Random resized crop of every image, back to the same size (bilinear): a crop with area
    fraction in `scale` and aspect ratio in `ratio`, at a random position. The batch twin of
    TrainTransform's per-sample crop, for running it on the GPU."""
    n, _, h, w = x.shape
    area = _uniform(n, scale[0], scale[1], generator)
    r = torch.exp(_uniform(n, math.log(ratio[0]), math.log(ratio[1]), generator))
    cw = torch.sqrt(area * r * h / w).clamp(max=1.0)  # crop size as a fraction of the width / height,
    ch = torch.sqrt(area / r * w / h).clamp(max=1.0)  # its aspect ratio (in pixels) r
    cx = (1 - cw) * (_rand(n, generator) - 0.5)  # crop centre offset, fraction of the size
    cy = (1 - ch) * (_rand(n, generator) - 0.5)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = cw, ch
    theta[:, 0, 2], theta[:, 1, 2] = 2 * cx, 2 * cy
    grid = F.affine_grid(theta.to(x.device), [n, x.shape[1], h, w], align_corners=False)
    y = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return _back(y, x.dtype)


def color_jitter_batch(x: torch.Tensor, brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Factors drawn uniformly from [1 - v, 1 + v] per image."""
    n = len(x)
    return color_jitter(x, _uniform(n, 1 - brightness, 1 + brightness, generator),
                        _uniform(n, 1 - contrast, 1 + contrast, generator),
                        _uniform(n, 1 - saturation, 1 + saturation, generator))


def noise_batch(x: torch.Tensor, std: float = 8.0, p: float = 0.5,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise (std in pixel levels) on a random share p of the images."""
    on = (_rand(len(x), generator) < p).to(x.device, torch.float32).view(-1, 1, 1, 1)
    return _back(x.float() + _randn_like(x, generator) * (std * on), x.dtype)


# ----------------------------------------------------------------------------- mixup / cutmix
def soft_targets(y: torch.Tensor, num_classes: int = 0) -> torch.Tensor:
    """Class indices (N,) -> one-hot float (N, C); multi-hot/soft (N, C) -> float as is."""
    if y.ndim == 1:
        if num_classes <= 0:
            raise ValueError("class-index targets need num_classes to be mixed")
        return F.one_hot(y.long(), num_classes).float()
    return y.float()


def _beta(alpha: float, generator: torch.Generator | None) -> float:
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=_gdev(generator)))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def _partners(n: int, perm: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
    if perm is None:
        return torch.randperm(n, generator=generator, device=_gdev(generator)).cpu()
    return perm.long().cpu()


def _mix_ok(ok: torch.Tensor | None, perm: torch.Tensor) -> torch.Tensor | None:
    """A mixed image is usable only if both its sources were readable."""
    return None if ok is None else ok * ok[perm.to(ok.device)]


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float = 0.4, num_classes: int = 0,
          ok: torch.Tensor | None = None, lam: float | None = None, perm: torch.Tensor | None = None,
          generator: torch.Generator | None = None):
    """x' = lam x + (1 - lam) x[perm], y' likewise, lam ~ Beta(alpha, alpha).

    -> (x', y' float (N, C), ok' or None). Targets: class indices (give num_classes) or
    (N, C) multi-hot. `ok` (1 = readable) is mixed as ok * ok[perm]. uint8 images are rounded.
    """
    lam = _beta(alpha, generator) if lam is None else float(lam)
    perm = _partners(len(x), perm, generator)
    pd = perm.to(x.device)
    xm = _back(x.float() * lam + x[pd].float() * (1 - lam), x.dtype)
    t = soft_targets(y, num_classes)
    return xm, t * lam + t[perm.to(t.device)] * (1 - lam), _mix_ok(ok, perm)


def cutmix_box(h: int, w: int, lam: float, generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): a box of area ~ (1 - lam) h w at a random centre, clipped to the image."""
    r = math.sqrt(max(0.0, 1.0 - lam))
    ch, cw = int(h * r), int(w * r)
    cy, cx = (int(v * n) for v, n in zip(_rand(2, generator), (h, w)))
    return max(cy - ch // 2, 0), min(cy + ch - ch // 2, h), max(cx - cw // 2, 0), min(cx + cw - cw // 2, w)


def cutmix(x: torch.Tensor, y: torch.Tensor, alpha: float = 1.0, num_classes: int = 0,
           ok: torch.Tensor | None = None, lam: float | None = None, perm: torch.Tensor | None = None,
           generator: torch.Generator | None = None):
    """Paste a box of x[perm] into x; targets mixed by the pasted area actually used.

    -> (x', y' float (N, C), ok' or None); see `mixup` for the arguments.
    """
    lam = _beta(alpha, generator) if lam is None else float(lam)
    perm = _partners(len(x), perm, generator)
    h, w = x.shape[-2:]
    y0, y1, x0, x1 = cutmix_box(h, w, lam, generator)
    xm = x.clone()
    xm[:, :, y0:y1, x0:x1] = x[perm.to(x.device)][:, :, y0:y1, x0:x1]
    lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    t = soft_targets(y, num_classes)
    return xm, t * lam + t[perm.to(t.device)] * (1 - lam), _mix_ok(ok, perm)


def mix_batch(x: torch.Tensor, y: torch.Tensor, mixup_alpha: float = 0.4, cutmix_alpha: float = 1.0,
              prob: float = 1.0, switch_prob: float = 0.5, num_classes: int = 0,
              ok: torch.Tensor | None = None, generator: torch.Generator | None = None):
    """With probability `prob` apply cutmix (probability `switch_prob`, when cutmix_alpha > 0) or
    mixup (when mixup_alpha > 0); otherwise return the batch with targets made float."""
    u = _rand(2, generator)
    if float(u[0]) < prob:
        if cutmix_alpha > 0 and (mixup_alpha <= 0 or float(u[1]) < switch_prob):
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


def normalize(batch: torch.Tensor, channels_last: bool, pre: Preprocess) -> torch.Tensor:
    """uint8 NCHW on any device -> float normalised with the model's statistics (no default: a
    caller that forgot them would silently feed a 0.5/0.5 model ImageNet-normalised inputs)."""
    mean = torch.tensor(pre.mean, device=batch.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(pre.std, device=batch.device).view(1, 3, 1, 1) * 255
    x = (batch.float() - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


# ----------------------------------------------------------------------------- tiles
def fold_tiles(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A batch of tile columns (N, 3, T * s, s) -> (N * T, 3, s, s) and T; a batch of squares as is
    (T = 1). Image k's tiles are rows k*T .. k*T + T - 1 (what `pool_tiles` expects)."""
    n, c, h, w = x.shape
    if h <= w or h % w:
        return x, 1
    t = h // w
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
