"""Samplers: class-balanced sampling for long-tailed data (iNaturalist seed); batches grouped by shape
(input_mode rect)."""
from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from .images import rect_bucket

HEADER_THREADS = 8  # header reads wait on the disk, not the CPU


def balanced_sample_weights(targets: np.ndarray, power: float = 0.5) -> np.ndarray:
    """Per-image sampling weight ~ 1 / count(class) ** power.

    power=1 draws every class equally often, 0 is plain shuffling; 0.5 (square-root sampling) is
    the usual compromise that lifts rare classes without repeating them to overfitting. For
    multi-label targets an image counts as its rarest label; images with no label get the
    weight of the most common label, so they are not dropped.
    """
    if targets.ndim == 1:
        counts = np.bincount(targets).astype(np.float64)
        w = 1.0 / np.maximum(counts[targets], 1.0) ** power
    else:
        counts = targets.sum(0).astype(np.float64)
        per_label = np.where(targets > 0, 1.0 / np.maximum(counts, 1.0) ** power, 0.0)
        w = per_label.max(1)
        w[w == 0] = 1.0 / max(counts.max(), 1.0) ** power
    return w / w.sum()


def balanced_sampler(targets: np.ndarray, power: float = 0.5, seed: int = 0) -> torch.utils.data.Sampler:
    g = torch.Generator()
    g.manual_seed(seed)
    weights = torch.as_tensor(balanced_sample_weights(targets, power), dtype=torch.double)
    return torch.utils.data.WeightedRandomSampler(weights, num_samples=len(targets), replacement=True, generator=g)


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of indices that share a bucket (input_mode rect: one image shape per bucket), drawn in
    the order of `sampler`: each index joins its bucket's open batch, which is yielded when full, so
    buckets interleave as the sampler shuffles (the NLP bucket-by-length batching). What is left in
    each bucket at the end is yielded too, in training only when it holds at least `min_last` images
    (BatchNorm cannot train on one); any sampler works underneath (random, class-balanced, sequential).
    Data-parallel ranks share one such sequence through ShardedBatches."""

    def __init__(self, sampler, buckets: Sequence[int], batch_size: int, min_last: int = 1):
        self.sampler, self.buckets = sampler, np.asarray(buckets)
        self.batch_size, self.min_last = int(batch_size), max(1, int(min_last))

    def __iter__(self) -> Iterator[list[int]]:
        open_batches: dict[int, list[int]] = {}
        for i in self.sampler:
            batch = open_batches.setdefault(int(self.buckets[i]), [])
            batch.append(int(i))
            if len(batch) == self.batch_size:
                yield batch
                open_batches[int(self.buckets[i])] = []
        for batch in open_batches.values():
            if len(batch) >= self.min_last:
                yield batch

    def __len__(self) -> int:
        """Exact for a sampler that draws every index once (random, sequential); for one that draws
        with replacement (class-balanced), the count its buckets would give at their average share."""
        _, counts = np.unique(self.buckets, return_counts=True)
        n = len(self.sampler)
        if n != len(self.buckets):
            counts = counts * n / max(1, len(self.buckets))
        full, rest = np.divmod(np.round(counts).astype(int), self.batch_size)
        return int(full.sum() + (rest >= self.min_last).sum())

    def order(self) -> list[int]:
        """Index of each row a pass yields, in the order it yields them (a deterministic sampler's: the
        predictions of a bucketed loader go back to the dataset's order with it)."""
        return [i for batch in self for i in batch]

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


class ShardedBatches(torch.utils.data.Sampler):
    """Rank `rank`'s share of a batch sequence every rank draws alike (a BucketBatchSampler over the
    same seeded shuffle): the batches shuffled once more (seeded by epoch: a bucket's leftover batch
    comes last in the sequence, and would always land on the same rank), padded to a multiple of
    world_size by repeating its first batches, then every `world_size`-th one, so every rank takes as
    many steps. A DistributedSampler cannot do this for bucketed batches: it splits the images, and each
    rank's images would fill a different number of batches (a collective hangs)."""

    def __init__(self, batches, world_size: int, rank: int, seed: int = 0):
        self.batches, self.world_size, self.rank = batches, int(world_size), int(rank)
        self.seed, self.epoch = int(seed), 0
        self.batch_size = getattr(batches, "batch_size", None)

    def __iter__(self) -> Iterator[list[int]]:
        every = list(self.batches)
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        every = [every[i] for i in torch.randperm(len(every), generator=g).tolist()]
        target = len(self) * self.world_size
        while every and len(every) < target:  # fewer batches than ranks: repeat them all
            every += every[:target - len(every)]
        return iter(every[self.rank::self.world_size])

    def __len__(self) -> int:
        return -(-len(self.batches) // self.world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.batches, "set_epoch"):
            self.batches.set_epoch(epoch)


def rect_buckets(paths: Sequence[str]) -> np.ndarray:
    """images.rect_bucket of each file from its header (EXIF orientation applied, as decoding does);
    0 (square) for a file whose header cannot be read: it fails again when decoded and becomes a blank
    square. Headers only: reading them all costs a fraction of decoding them."""
    with ThreadPoolExecutor(HEADER_THREADS) as pool:
        return np.fromiter(pool.map(_bucket_of, paths, chunksize=64), dtype=np.int64, count=len(paths))


_SWAPPED = (5, 6, 7, 8)  # EXIF orientations that turn the image by 90 degrees


def _bucket_of(path: str) -> int:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a decompression-bomb warning: no pixels are decoded here
            with Image.open(path) as im:
                w, h = im.size
                if im.getexif().get(0x0112) in _SWAPPED:  # any format: MPO phone photos turn too
                    w, h = h, w
        return rect_bucket(w, h)
    except Exception:  # noqa: BLE001  (any unreadable file: the loader logs it when it decodes it)
        return 0
