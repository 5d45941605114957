"""Datasets and loaders. Bad files never stop a run: they become a blank image with ok=0."""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .images import BadImage, load_rgb

log = logging.getLogger("kernelkit")


class ImageDataset(Dataset):
    """(uint8 CHW image, target, ok). `ok` is 0 for an unreadable file so the loss can ignore it
    while batch shapes stay fixed and every test id still gets a prediction."""

    def __init__(self, paths: list[str], targets: np.ndarray | None, transform: Callable,
                 size: int, fill: int = 255):
        self.paths, self.targets, self.transform = list(paths), targets, transform
        self.size, self.fill = size, fill

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            img = self.transform(load_rgb(self.paths[i], self.size, self.fill))
            ok = 1.0
        except BadImage as e:
            log.warning("bad image skipped: %s", e)
            img = torch.full((3, self.size, self.size), 128, dtype=torch.uint8)
            ok = 0.0
        if self.targets is None:
            target = torch.zeros(())
        else:
            t = self.targets[i]
            target = torch.as_tensor(t, dtype=torch.float32 if np.ndim(t) else torch.long)
        return img, target, torch.tensor(ok)


def split_indices(targets: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified for single-label targets, random for multi-label; both sides non-empty."""
    n = len(targets)
    rng = np.random.default_rng(seed)
    if val_fraction <= 0 or n < 2:
        return np.arange(n), np.arange(0)
    if targets.ndim == 1:
        val = []
        for c in np.unique(targets):
            idx = rng.permutation(np.flatnonzero(targets == c))
            k = int(round(len(idx) * val_fraction))
            val.extend(idx[:k] if len(idx) > 1 else [])
        val = np.array(sorted(val), dtype=np.int64)
    else:
        perm = rng.permutation(n)
        val = np.sort(perm[:max(1, int(round(n * val_fraction)))])
    mask = np.ones(n, bool)
    mask[val] = False
    return np.flatnonzero(mask), val


def make_loader(ds: Dataset, batch_size: int, train: bool, num_workers: int, mp_context: str = "",
                pin_memory: bool = False, seed: int = 0, sampler=None) -> DataLoader:
    """`sampler` (e.g. DistributedSampler) replaces the loader's own shuffling."""
    kwargs = {}
    if num_workers > 0:
        # Persistent workers: under spawn each worker re-imports torch (seconds), once per run is enough.
        kwargs.update(persistent_workers=True, prefetch_factor=4)
        if mp_context:
            kwargs["multiprocessing_context"] = mp_context
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                      drop_last=train and len(ds) > batch_size, num_workers=num_workers, pin_memory=pin_memory,
                      generator=g, worker_init_fn=seed_worker, **kwargs)


def seed_worker(worker_id: int) -> None:
    """Python's `random` drives the augmentations; give each worker its own stream."""
    import random
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
