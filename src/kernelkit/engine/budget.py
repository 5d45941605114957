"""Wall-clock budget and the learning-rate schedule defined over it.

Budgeted training (Li et al., ICLR 2020): for a fixed time budget, a schedule that decays to zero
exactly when the budget ends beats any schedule tuned for a number of epochs that may not fit.
So progress is measured in time (or in steps when epochs are fixed) and the LR is a function of it.
"""
from __future__ import annotations

import math

from ..core.checks import budget_and_margin
from ..core.clock import now as clock_now
from ..core.config import Config


def budget_seconds(cfg: Config) -> tuple[float, float]:
    """-> (budget, margin) in seconds, as the start-up check computed them."""
    return budget_and_margin(cfg.budget, cfg.margin, cfg.mode)


class BudgetClock:
    """Seconds since the run started (possibly in an earlier process that was killed)."""

    def __init__(self, total_s: float, margin_s: float = 0.0, start_time: float | None = None):
        self.total_s, self.margin_s = float(total_s), float(margin_s)
        self.start_time = clock_now() if start_time is None else float(start_time)

    def elapsed(self) -> float:
        return clock_now() - self.start_time

    def remaining(self) -> float:
        return self.total_s - self.margin_s - self.elapsed()

    def fmt(self) -> str:
        return f"{fmt_seconds(self.elapsed())}/{fmt_seconds(self.total_s)}"


def fmt_seconds(s: float) -> str:
    s = max(0, int(s))
    h, m = divmod(s, 3600)
    m, sec = divmod(m, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


class InferenceReserve:
    """Time to keep for the final validation + test prediction, from measured throughput.

    `test_ips` comes from a probe before training (test images decoded from their files with the
    eval transform, TTA views counted: what the final prediction will really cost); `val_ips` from
    each validation pass (often cached images, so faster). Whichever is missing borrows the other;
    before either exists, inference is guessed from training speed (a forward pass costs about a
    third of forward+backward; assume half to stay safe). `startup_s` is the measured cost of a
    loader's first batch (worker start-up), paid twice: final validation and test loader.
    """

    def __init__(self, n_test: int, n_val: int, tta: int, overhead_s: float = 2.5, safety: float = 1.3):
        self.n_test, self.n_val, self.tta = n_test, n_val, tta
        self.overhead_s, self.safety = overhead_s, safety
        self.test_ips: float | None = None
        self.val_ips: float | None = None
        self.train_ips: float | None = None
        self.startup_s = 5.0  # until measured
        self._startup_measured = False
        # Work after training besides the final validation, at the validation rate: the weight
        # average's BatchNorm pass and its own validation (swa.py), with one more loader start-up.
        self.extra_images, self.extra_loaders = 0, 0

    @classmethod
    def measured(cls, n_test: int, n_val: int, tta: int, images_per_s: float, startup_s: float) -> InferenceReserve:
        """A reserve from a probe: inference speed (image-views/s) and a loader's first-batch latency."""
        reserve = cls(n_test, n_val, tta)
        reserve.test_ips = images_per_s
        reserve.observe_startup(startup_s)
        return reserve

    def observe_probe(self, probe: dict) -> None:
        """What predicting the first test batches measured (predictor.probe_inference): the speed, the
        loader's start-up, and its per-image set-up (rect reads every test header) for all test images."""
        self.test_ips = probe["images_per_s"]
        self.observe_startup(probe["startup_s"])
        self.overhead_s += probe.get("setup_s_per_image", 0.0) * self.n_test

    def observe_startup(self, seconds: float) -> None:
        """Keep the worst first-batch latency seen: persistent workers make later ones look free,
        but the test loader starts its workers from scratch."""
        self.startup_s = max(self.startup_s, seconds) if self._startup_measured else seconds
        self._startup_measured = True

    def seconds(self) -> float:
        guess = 2.0 * self.train_ips if self.train_ips else None
        test_rate = self.test_ips or self.val_ips or guess
        val_rate = self.val_ips or self.test_ips or guess
        fixed = self.overhead_s + (2 + self.extra_loaders) * self.startup_s
        if not test_rate:
            return fixed
        val_images = self.n_val + self.extra_images
        return fixed + self.safety * (self.n_test * self.tta / test_rate + val_images / val_rate)


def lr_factor(progress: float, warmup: float = 0.05, kind: str = "linear") -> float:
    """Multiplier of the peak LR at `progress` in [0, 1]: linear warmup, then decay to zero at 1."""
    p = min(max(progress, 0.0), 1.0)
    if warmup > 0 and p < warmup:
        return p / warmup
    q = (p - warmup) / max(1e-12, 1.0 - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - q)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * q))
    raise ValueError(f"unknown schedule {kind!r}; choose linear | cosine")


class Progress:
    """Where training is in [0, 1]: by time toward a (moving) deadline, or by steps.

    On resume it continues from the saved progress and spreads the rest of this session's slice
    (up to `end`; 1.0 unless the schedule is split over several Kaggle sessions) over the time left.
    """

    def __init__(self, clock: BudgetClock, start_progress: float = 0.0, total_steps: int = 0, end: float = 1.0):
        self.clock, self.p0, self.total_steps = clock, float(start_progress), total_steps
        self.end = max(float(end), self.p0)
        self.t0 = clock.elapsed()
        self.last = self.p0

    def at(self, deadline_s: float, step: int = 0) -> float:
        if self.total_steps:
            return min(1.0, step / self.total_steps)
        span = deadline_s - self.t0
        p = self.end if span <= 0 else self.p0 + (self.end - self.p0) * (self.clock.elapsed() - self.t0) / span
        # The deadline moves when the inference reserve is re-estimated; a later one must not take the
        # schedule (and the learning rate) backwards.
        self.last = max(self.last, min(self.end, p))
        return self.last


def affordable_tta(level: int, n_images: int, images_per_s: float | None, seconds_left: float) -> int:
    """The most TTA views (up to `level`) whose prediction fits in `seconds_left`; at least 1."""
    if not images_per_s or n_images == 0:
        return level
    per_view = n_images / images_per_s
    return max(1, min(level, int(seconds_left // max(per_view, 1e-9))))
