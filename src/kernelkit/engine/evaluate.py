"""Batch-wise prediction with test-time augmentation; probabilities averaged over views."""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Sequence

import numpy as np
import torch

from ..core.progress import progress
from ..data.loaders import DeviceFeeder
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
    probs, oks = [], []
    t0 = time.time()
    t_first = None
    pieces = 1
    # Batches arrive on the device a step ahead (DeviceFeeder) and the probabilities stay there until
    # the end: a copy back per batch would make the CPU wait for the GPU at every batch.
    for images, _, ok in progress(DeviceFeeder(loader, device), desc=desc):
        x, tiles = fold_tiles(images)  # tiles mode: (N, 3, T*s, s) columns -> N*T squares
        x = resize_batch(x, size) if size else x
        x = normalize(x, channels_last, pre)
        while True:
            try:
                use = views[:1] if stop is not None and stop.requested else views
                per = tiles * -(-len(ok) // pieces)  # whole images per piece: their tiles stay together
                p = torch.cat([_average_views(model, part, use, act, device, amp, amp_dtype, tiles)
                               for part in x.split(per)])
                break
            except OutOfMemory:
                if pieces >= len(ok):
                    raise
                pieces *= 2  # never lose the predictions to a batch that does not fit: split it
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        probs.append(p)
        oks.append(ok > 0)
        if t_first is None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the first batch's true cost: loader start-up, lazy init
            t_first = time.time()
    probs_all = torch.cat(probs).cpu().numpy() if probs else np.zeros((0, 0), np.float32)
    oks_all = torch.cat(oks).cpu().numpy() if oks else np.zeros(0, bool)
    t_end = time.time()
    n = sum(len(p) for p in probs)
    steady_n = n - (len(probs[0]) if len(probs) > 1 else 0)
    steady_s = (t_end - t_first) if len(probs) > 1 else (t_end - t0)
    ips = steady_n * len(views) / max(steady_s, 1e-9)
    first_batch_s = (t_first or t_end) - t0
    return {
        "probs": probs_all,
        "ok": oks_all,
        "seconds": t_end - t0,
        "first_batch_s": first_batch_s,
        # what the first batch cost beyond its own share of the work: worker start-up, lazy init
        "startup_s": max(0.0, first_batch_s - len(probs[0]) * len(views) / ips) if len(probs) > 1 else first_batch_s,
        "images_per_s": ips,
    }
