"""Progressive resizing over the wall clock: train at a lower resolution early, at the full
`img_size` for the last part of the schedule.

FFCV and fastai step the resolution by epoch; here the stages are shares of the schedule's
progress (`FitState.progress`, the clock-based progress the LR schedule follows), so each stage
takes a fixed share of the WALL CLOCK whatever the throughput turns out to be, and a resumed run
continues at the size its restored progress calls for. With fixed `epochs` the progress is the
share of steps, the same way.

The cache holds every image at the full `img_size`; a lower stage is made by downscaling the batch
on the training device (`resize_batch`, antialiased bilinear: cheap on a GPU), so the cache already
holds what each stage needs and nothing is decoded twice. Validation during a smaller stage runs at
that stage's size (a network trained at half size validated at full size scores near chance while it
learns: issue #20); the best checkpoint is chosen among validations at the largest size reached; the
final prediction (TTA) runs at the full size. Few distinct sizes (at most `MAX_STAGES`): torch.compile recompiles and cudnn.benchmark
re-tunes per input shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.images import rect_bucket, rect_shape

MAX_STAGES = 4  # distinct sizes, the full one included
MIN_PX = 32  # a stride-32 backbone's last feature map is 1 x 1 here


def size_step(full: int) -> int:
    """Stage sizes are multiples of this: 32 keeps a stride-32 network's feature maps whole at
    large sizes; small images need finer steps to have stages at all."""
    return 32 if full >= 128 else 8


@dataclass(frozen=True)
class ResolutionSchedule:
    """`start_fraction * full` px at progress 0, up to `full` px from `full_at` on, in at most
    `stages` steps laid evenly over [0, full_at), each rounded down to a multiple of `step` and never
    below `min_px`. start_fraction 0 (or >= 1): always `full`."""
    full: int
    start_fraction: float = 0.0
    full_at: float = 0.75
    step: int = 0  # 0: size_step(full)
    stages: int = MAX_STAGES
    min_px: int = MIN_PX

    @property
    def enabled(self) -> bool:
        return 0 < self.start_fraction < 1 and len(set(self.sizes())) > 1

    def sizes(self) -> list[int]:
        """The size of each stage, smallest first, the last one `full` (may repeat when the
        rounding merges neighbours)."""
        if not 0 < self.start_fraction < 1 or self.stages < 2:
            return [self.full]
        step = self.step or size_step(self.full)
        lo = min(self.full, max(self.min_px, self.start_fraction * self.full))
        out = []
        for i in range(self.stages - 1):
            want = lo + (self.full - lo) * i / (self.stages - 1)
            out.append(min(self.full, max(self.min_px, int(want // step) * step)))
        return [*out, self.full]

    def size_at(self, progress: float) -> int:
        """The input size at schedule progress `progress` (0..1): non-decreasing, `full` from full_at on."""
        sizes = self.sizes()
        if len(sizes) == 1 or progress >= self.full_at:
            return self.full
        i = int(max(progress, 0.0) / self.full_at * (len(sizes) - 1))
        return sizes[min(i, len(sizes) - 1)]

    def spans(self) -> list[tuple[int, float, float]]:
        """(size, from progress, to progress) of each distinct stage, adjacent equal sizes merged."""
        sizes = self.sizes()
        if len(sizes) == 1:
            return [(self.full, 0.0, 1.0)]
        n = len(sizes) - 1
        out: list[tuple[int, float, float]] = []
        for i, s in enumerate(sizes):
            a, b = (self.full_at * i / n, self.full_at * (i + 1) / n) if i < n else (self.full_at, 1.0)
            if out and out[-1][0] == s:
                out[-1] = (s, out[-1][1], b)
            else:
                out.append((s, a, b))
        return out

    def shares(self) -> dict[int, float]:
        """{size: share of the schedule's progress spent at it}."""
        return {s: b - a for s, a, b in self.spans()}

    def describe(self) -> str:
        spans = self.spans()
        parts = [f"{s} px until p={b:.2f}" for s, _, b in spans[:-1]]
        return ", ".join([*parts, f"then {spans[-1][0]} px"])


def schedule_from(img_size: int, start: float, full_at: float) -> ResolutionSchedule | None:
    """The config's schedule, or None when off (start 0) or when the rounding leaves one size."""
    if not img_size or not 0 < start < 1:
        return None
    sched = ResolutionSchedule(img_size, start, full_at)
    return sched if sched.enabled else None


def fixed_input_size(model: torch.nn.Module) -> bool:
    """True for a model that takes only the size it was built for: timm's patch embedding with
    `strict_img_size` (ViT, DeiT, Swin built without dynamic_img_size) asserts on any other."""
    return any(getattr(m, "strict_img_size", False) for m in model.modules())


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, H, W) on the 0..255 scale (uint8 or float, contiguous or channels-last) -> size x size
    (a rect batch: its bucket's shape at `size`) on the same device, antialiased bilinear, same dtype
    and memory format; x itself at that size."""
    h, w = x.shape[-2:]
    out = (size, size) if h == w else rect_shape(rect_bucket(w, h), size)  # a rect bucket at the stage's size
    if (h, w) == out:
        return x
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    y = F.interpolate(x.float(), size=out, mode="bilinear", antialias=True, align_corners=False)
    y = y.clamp_(0, 255)  # the antialiasing filter's rounding may step a hair past the range
    if x.dtype == torch.uint8:
        y = y.round_().to(torch.uint8)
    elif y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


def effective_ips(ips_at: dict[int, float], schedule: ResolutionSchedule | None, over_clock: bool = True) -> float:
    """Training images/s over the whole schedule, from the throughput at each stage size.

    Over the clock (epochs=0) each stage has a fixed share of the TIME: the time-weighted mean.
    Over steps (fixed epochs) each stage has a fixed share of the IMAGES: the harmonic mean."""
    if schedule is None:
        return ips_at[max(ips_at)]
    shares = schedule.shares()
    if over_clock:
        return sum(w * ips_at[s] for s, w in shares.items())
    return 1.0 / sum(w / max(ips_at[s], 1e-9) for s, w in shares.items())


def epochs_with_schedule(train_s: float, n_train: int, ips_at: dict[int, float],
                         schedule: ResolutionSchedule | None) -> float:
    """Epochs that fit `train_s` seconds of training (the planners' arithmetic, validation aside)."""
    return train_s * effective_ips(ips_at, schedule) / max(n_train, 1)


def ips_by_pixels(sizes: list[int], measured: dict[int, float]) -> dict[int, float]:
    """Throughput at every size of `sizes` from two (or more) measured sizes: time per image taken
    as linear in the pixel count (a fixed per-image cost plus a per-pixel one), fitted through the
    smallest and the largest measurement; a single measurement scales with the pixel count."""
    lo, hi = min(measured), max(measured)
    t_lo, t_hi = 1 / measured[lo], 1 / measured[hi]
    if lo == hi:
        return {s: measured[hi] * (hi / s) ** 2 for s in sizes}
    slope = (t_hi - t_lo) / (hi * hi - lo * lo)
    out = {}
    for s in sizes:
        t = t_lo + slope * (s * s - lo * lo)
        out[s] = measured[s] if s in measured else 1 / max(t, min(t_lo, t_hi) * 1e-3)
    return out


def fmt_ips(ips_at: dict[int, float]) -> str:
    return ", ".join(f"{s} px {v:.1f} img/s" for s, v in sorted(ips_at.items()) if math.isfinite(v))
