"""Batch-wise prediction with test-time augmentation; probabilities averaged over views."""
from __future__ import annotations

import contextlib
from collections import deque
from typing import Callable, Sequence

import numpy as np
import torch

from ..core.clock import now as clock_now
from ..core.progress import progress
from ..data.loaders import DeviceFeeder, loader_order, loader_tiles
from ..data.transforms import Preprocess, fold_tiles, normalize, pool_tiles, tta_identity
from .resolution import resize_batch


def autocast(device: torch.device, enabled: bool, dtype: torch.dtype = torch.float16):
    """Mixed precision on CUDA only: CPU autocast (bf16) is slower than fp32 on most CPUs."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


OutOfMemory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def _average_views(model, x, views, act, device, amp, amp_dtype, tiles: int = 1) -> torch.Tensor:
    """Probabilities averaged over the views; with tiles, each view's logits pooled over an image's tiles."""
    with autocast(device, amp, amp_dtype):
        return sum(act(pool_tiles(model(view(x)).float(), tiles)) for view in views) / len(views)


def activation(task: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return torch.sigmoid if task == "multilabel" else _softmax


def _softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, dim=1)


class HostChunks:
    """Per-batch results moved to host memory as they come, so the device holds one batch of them
    at a time (200k images x 15k classes is 12 GB: kept on a T4 until the end, it overflows it).

    On CUDA each batch is copied without blocking into one of `ring` reused pinned staging buffers
    (pinned memory per batch would stay page-locked in torch's host cache: 12 GB of it), and moved
    to pageable memory when its buffer comes round again, `ring` batches later: that waits for
    that batch's copy only, long done, never for the work queued since. `gather` lands the rest."""

    def __init__(self, device: torch.device, ring: int = 4):
        self.device, self.ring, self.chunks = device, ring, []
        self.pin = device.type == "cuda"
        self.pending: deque = deque()  # (staging buffer, event, chunk index) of copies in flight
        self.free: dict[tuple, list[torch.Tensor]] = {}

    def add(self, t: torch.Tensor) -> None:
        if not self.pin:
            host = torch.empty(t.shape, dtype=t.dtype)
            host.copy_(t)  # a copy owning its memory: nothing of the batch outlives it
            self.chunks.append(host)
            return
        if len(self.pending) >= self.ring:
            self._land(self.pending.popleft())
        key = (tuple(t.shape), t.dtype)
        staging = self.free.get(key, [])
        buf = staging.pop() if staging else torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        buf.copy_(t, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self.chunks.append(None)
        self.pending.append((buf, event, len(self.chunks) - 1))

    def _land(self, item: tuple) -> None:
        buf, event, i = item
        event.synchronize()
        self.chunks[i] = buf.clone()
        self.free.setdefault((tuple(buf.shape), buf.dtype), []).append(buf)

    def __len__(self) -> int:
        return len(self.chunks)

    def gather(self) -> torch.Tensor | None:
        while self.pending:
            self._land(self.pending.popleft())
        self.free.clear()  # the staging buffers go back to torch's host cache: `ring` batches at most
        return torch.cat(self.chunks) if self.chunks else None


@torch.no_grad()
def predict(model: torch.nn.Module, loader, device: torch.device, task: str,
            views: Sequence[Callable] = (tta_identity,), amp: bool = True, channels_last: bool = False,
            desc: str = "predict", stop=None, *, pre: Preprocess, amp_dtype: torch.dtype = torch.float16,
            size: int = 0) -> dict:
    """-> {probs (N, C) float32, ok (N,) bool, seconds, first_batch_s, startup_s, images_per_s}.

    images_per_s counts image-views after the first batch, so worker start-up (seconds under
    spawn) does not distort the estimate the budget planner uses; first_batch_s holds that cost.
    `stop` (stopping.StopFlag): once raised, the remaining batches get the first view only, so a
    SIGTERM still ends with a prediction for every row, soon. `size` > 0: every image (tile) is
    downscaled to size x size first (validation during progressive resizing's smaller stages).
    """
    model.eval()
    act = activation(task)
    probs, oks = HostChunks(device), HostChunks(device)
    t0 = clock_now()
    t_first, first_rows = None, 0
    pieces = 1  # after an out-of-memory, the batches that follow are split as far as that one needed
    # Batches arrive on the device a step ahead (DeviceFeeder); the probabilities leave it as they are
    # made (HostChunks: non-blocking copies into pinned memory), so neither waits for the GPU.
    tiles = loader_tiles(loader)
    for images, _, ok in progress(DeviceFeeder(loader, device), desc=desc):
        x, t = fold_tiles(images, tiles)  # tiles mode: (N, 3, T*s, s) columns -> N*T squares
        x = resize_batch(x, size) if size else x
        x = normalize(x, channels_last, pre)
        use = views[:1] if stop is not None and stop.requested else views
        p, pieces = _predict_batch(model, x, len(ok), use, act, device, amp, amp_dtype, t, pieces)
        probs.add(p)
        oks.add(ok > 0)
        if t_first is None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the first batch's true cost: loader start-up, lazy init
            t_first, first_rows = clock_now(), len(p)
    probs_all = probs.gather()
    probs_all = probs_all.numpy() if probs_all is not None else np.zeros((0, 0), np.float32)
    oks_all = oks.gather()
    oks_all = oks_all.numpy() if oks_all is not None else np.zeros(0, bool)
    order = loader_order(loader)
    if order is not None:  # rect buckets: rows back in the dataset's order
        probs_all[order], oks_all[order] = probs_all.copy(), oks_all.copy()
    t_end = clock_now()
    n, batches = len(probs_all), len(probs)
    steady_n = n - (first_rows if batches > 1 else 0)
    steady_s = (t_end - t_first) if batches > 1 else (t_end - t0)
    ips = steady_n * len(views) / max(steady_s, 1e-9)
    first_batch_s = (t_first or t_end) - t0
    return {
        "probs": probs_all,
        "ok": oks_all,
        "seconds": t_end - t0,
        "first_batch_s": first_batch_s,
        # what the first batch cost beyond its own share of the work: worker start-up, lazy init
        "startup_s": max(0.0, first_batch_s - first_rows * len(views) / ips) if batches > 1 else first_batch_s,
        "images_per_s": ips,
    }


def _predict_batch(model: torch.nn.Module, x: torch.Tensor, n_images: int, views: Sequence[Callable], act: Callable,
                   device: torch.device, amp: bool, amp_dtype: torch.dtype, tiles: int,
                   pieces: int) -> tuple[torch.Tensor, int]:
    """One batch's probabilities, in `pieces` parts; a batch that does not fit in memory is split in
    halves until it does, so the predictions are never lost to one large batch (an image's tiles stay
    in one piece). -> (probabilities, the pieces that fitted)."""
    while True:
        try:
            per = tiles * -(-n_images // pieces)
            return torch.cat([_average_views(model, part, views, act, device, amp, amp_dtype, tiles)
                              for part in x.split(per)]), pieces
        except OutOfMemory:
            if pieces >= n_images:
                raise
            pieces *= 2
            if device.type == "cuda":
                torch.cuda.empty_cache()
