"""Datasets and loaders. Bad files never stop a run: they become a blank image with ok=0."""
from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler
from torch.utils.data._utils.collate import default_collate

from ..core.stopping import ignore_in_worker
from .images import BadImage, blank_image, load_rgb, resize_tensor, tv_jpeg_decoder
from .sampling import BucketBatchSampler, ShardedBatches
from .transforms import seed_augmentations

log = logging.getLogger("kernelkit")


class ImageDataset(Dataset):
    """(uint8 CHW image, target, ok). `ok` is 0 for an unreadable file so the loss can ignore it
    while batch shapes stay fixed and every test id still gets a prediction.

    With a kernelkit transform (one with `load`/`augment`, e.g. EvalTransform, TrainTransform)
    images are decoded by the fast tensor path; any other callable gets a PIL RGB image.
    `cache` (cache.ImageCache, or a `.subset(...)` of one, aligned with `paths`) serves the
    deterministic part from the pre-resized cache; the transform's random part still runs on it.
    """

    def __init__(self, paths: list[str], targets: np.ndarray | None, transform: Callable,
                 size: int, fill: int = 255, cache=None):
        self.paths, self.targets, self.transform = list(paths), targets, transform
        self.size, self.fill = size, fill
        self.cache = cache
        if cache is not None:
            if len(cache) != len(self.paths):
                raise ValueError(f"cache holds {len(cache)} images, dataset {len(self.paths)}")
            geometry = getattr(transform, "geometry", None)
            if geometry is None or (*geometry, 1)[:4] != tuple(cache.geometry):  # (3-tuples: square)
                raise ValueError(f"cache geometry {cache.geometry} does not match the transform's {geometry}")

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, i: int) -> tuple[torch.Tensor, bool]:
        """(transformed uint8 image, readable?) for item i."""
        if self.cache is not None and self.cache.has(i):
            x, ok = self.cache.get(i)  # unreadable files were named in the log when the cache was built
            return (self.transform(x), True) if ok else (self.blank(), False)
        try:
            if hasattr(self.transform, "load"):
                return self.transform(self.transform.load(self.paths[i])), True
            return self.transform(load_rgb(self.paths[i], self.size, self.fill)), True
        except BadImage as e:
            log.warning("bad image skipped: %s", e)
            return self.blank(), False

    def blank(self) -> torch.Tensor:
        """The placeholder of an unreadable file, shaped like the transform's output (tiles: a column)."""
        blank = getattr(self.transform, "blank", None)
        return blank() if blank is not None else blank_image(self.size)

    def batch(self, indices: list[int], pin_memory: bool = False) -> list | None:
        """The whole batch in one gather from the cache, as collate_images would stack it, when every
        item is cached and the transform adds nothing per image (aug none: the augmentation runs on
        the GPU; evaluation). None otherwise: the caller builds the batch item by item."""
        if self.cache is None or getattr(self.transform, "per_image_work", True):
            return None
        items = np.asarray(indices, dtype=np.int64)
        if not self.cache.all_cached(items):
            return None
        # Gathered straight into page-locked memory, so the copy to the GPU needs no staging copy.
        out = torch.empty((len(items), *self.cache.row_shape), dtype=torch.uint8, pin_memory=pin_memory)
        ok = torch.from_numpy(self.cache.gather(items, out.numpy()).astype(np.float32))
        if self.targets is None:
            targets = torch.zeros(len(items))
        else:
            t = self.targets[items]
            targets = torch.as_tensor(t, dtype=torch.float32 if t.ndim > 1 else torch.long)
        return [out.permute(0, 3, 1, 2), targets, ok]

    def __getitem__(self, i: int):
        img, ok = self.image(i)
        if self.targets is None:
            target = torch.zeros(())
        else:
            t = self.targets[i]
            target = torch.as_tensor(t, dtype=torch.float32 if np.ndim(t) else torch.long)
        return img, target, torch.tensor(1.0 if ok else 0.0)


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


def fully_cached(ds: Dataset) -> bool:
    cache = getattr(ds, "cache", None)
    return cache is not None and cache.all_cached()


def make_loader(ds: Dataset, batch_size: int, train: bool, num_workers: int, mp_context: str = "",
                pin_memory: bool = False, seed: int = 0, sampler=None, threads: bool | None = None,
                buckets: np.ndarray | None = None, shard: tuple[int, int] = (1, 0)):
    """`sampler` (e.g. DistributedSampler) replaces the loader's own shuffling. `buckets` (one per
    item, input_mode rect): every batch holds one bucket (sampling.BucketBatchSampler), in the order
    of the sampler underneath; `shard` (world_size, rank): this rank's share of those batches (the
    sampler must then shuffle alike on every rank).

    threads: build batches with `num_workers` threads in this process (ThreadLoader) instead of
    worker processes. None = yes when every item comes from the pre-resized cache: then the
    per-image work is a row copy plus cheap augmentation, and worker processes would spend
    most of their time shipping batches through shared memory (measured 10x slower, README).
    """
    if threads is None:
        threads = fully_cached(ds)
    if not threads and num_workers > 0:
        tv_jpeg_decoder()  # import torchvision's decoder once here; forked workers inherit it
    g = torch.Generator()
    g.manual_seed(seed)
    batch_sampler = None
    if buckets is not None:
        if sampler is None:
            sampler = RandomSampler(ds, generator=g) if train else SequentialSampler(ds)
        batch_sampler = BucketBatchSampler(sampler, buckets, batch_size, min_last=2 if train else 1)
        if shard[0] > 1:
            batch_sampler = ShardedBatches(batch_sampler, *shard, seed=seed)
    if threads:
        return ThreadLoader(ds, batch_size, shuffle=train and sampler is None, drop_last=train and len(ds) > batch_size,
                            num_threads=max(1, num_workers), sampler=sampler, generator=g, pin_memory=pin_memory,
                            batch_sampler=batch_sampler)
    kwargs = {}
    if num_workers > 0:
        # Persistent workers: under spawn each worker re-imports torch (seconds), once per run is enough.
        kwargs.update(persistent_workers=True, prefetch_factor=4)
        if mp_context:
            kwargs["multiprocessing_context"] = mp_context
    if batch_sampler is not None:
        return DataLoader(ds, batch_sampler=batch_sampler, num_workers=num_workers, pin_memory=pin_memory,
                          generator=g, worker_init_fn=seed_worker, collate_fn=collate_images, **kwargs)
    return DataLoader(ds, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                      drop_last=train and len(ds) > batch_size, num_workers=num_workers, pin_memory=pin_memory,
                      generator=g, worker_init_fn=seed_worker, collate_fn=collate_images, **kwargs)


def set_epoch(loader, epoch: int) -> None:
    """A new shuffle per epoch where the sampler takes one (DistributedSampler, directly or under the
    bucketed batches of rect)."""
    for sampler in (getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
            return


def loader_tiles(loader) -> int:
    """Squares per image in the batches of `loader` (what `transforms.fold_tiles` splits): the tile
    count of its dataset's transform, 1 for anything else (pad, squeeze, rect)."""
    tiles = getattr(getattr(getattr(loader, "dataset", None), "transform", None), "tiles", 1)
    return tiles if isinstance(tiles, int) and tiles > 1 else 1


def loader_order(loader) -> np.ndarray | None:
    """The dataset index of each row a pass over `loader` yields, when batches do not follow the
    dataset's order (rect buckets); None when they do."""
    order = getattr(getattr(loader, "batch_sampler", None), "order", None)
    return np.asarray(order(), dtype=np.int64) if callable(order) else None


def seed_worker(worker_id: int) -> None:
    """Each worker its own augmentation stream, derived from the loader's seeded generator (so
    runs repeat); signals are left to the main process, which finishes the run on SIGTERM."""
    import random
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    seed_augmentations(seed)
    ignore_in_worker()


def is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 3 and x.stride(0) == 1 and x.shape[0] > 1


def collate_images(batch: list):
    """default_collate, except that channels-last images (rows of the cache, and what the random
    crop makes of them) are stacked as NHWC with one memcpy each, giving an (N, 3, H, W) batch in
    channels_last memory format (what channels_last models want anyway) instead of a ~20x slower
    transposing copy into NCHW."""
    first = batch[0][0]
    if not (isinstance(first, torch.Tensor) and is_channels_last(first)):
        return default_collate(batch)
    batch = same_shape(batch)
    first = batch[0][0]
    c, h, w = first.shape
    out = None
    if torch.utils.data.get_worker_info() is not None:
        # In a worker process, stack straight into shared memory, as default_collate does.
        try:
            storage = first._typed_storage()._new_shared(len(batch) * c * h * w, device=first.device)
            out = first.new(storage).resize_(len(batch), h, w, c)
        except (AttributeError, RuntimeError):
            out = None
    images = torch.stack([b[0].permute(1, 2, 0) for b in batch], out=out).permute(0, 3, 1, 2)
    return [images, *default_collate([tuple(b[1:]) for b in batch])]


def same_shape(batch: list) -> list:
    """Items whose image is not in the batch's most common shape resized to it: in rect mode an
    unreadable file's blank square, or a file whose header and pixels disagree on its shape, joins a
    batch of another bucket (a slightly stretched image rather than a lost batch)."""
    shapes = [tuple(b[0].shape) for b in batch]
    if len(set(shapes)) == 1:
        return batch
    _, h, w = max(set(shapes), key=shapes.count)
    return [b if tuple(b[0].shape[-2:]) == (h, w) else (resize_tensor(b[0], h, w), *b[1:]) for b in batch]


class ThreadLoader:
    """A DataLoader for cheap items: batches are built by a pool of threads in this process, a few
    batches ahead, with no pickling and no shared-memory transfer. Row copies, resizing and the
    other torch/numpy work release the GIL, so the threads run in parallel.

    Offers what the training and inference loops use of a DataLoader: len(), iteration (each
    pass reshuffles), .dataset, .batch_size, .sampler (set_epoch works), .drop_last.
    """

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool = False, drop_last: bool = False,
                 num_threads: int = 2, sampler=None, generator: torch.Generator | None = None,
                 pin_memory: bool = False, prefetch: int = 4, collate_fn: Callable | None = None,
                 batch_sampler=None):
        self.dataset, self.batch_size, self.drop_last = dataset, batch_size, drop_last
        if sampler is None:
            sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
        self.sampler = sampler
        self.batch_sampler = BatchSampler(sampler, batch_size, drop_last) if batch_sampler is None else batch_sampler
        self.num_threads, self.prefetch = max(1, num_threads), max(1, prefetch)
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.collate_fn = collate_fn or collate_images
        self.generator = generator

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def _fetch(self, indices: list[int], seed: int):
        seed_augmentations(seed)  # per batch, so the result does not depend on which thread builds it
        whole = getattr(self.dataset, "batch", None)
        batch = whole(indices, self.pin_memory) if whole is not None else None
        if batch is not None:
            return [b if b.is_pinned() or not self.pin_memory else b.pin_memory() for b in batch]
        batch = self.collate_fn([self.dataset[i] for i in indices])
        if self.pin_memory:
            batch = [b.pin_memory() if isinstance(b, torch.Tensor) else b for b in batch]
        return batch

    def __iter__(self):
        batches = enumerate(iter(self.batch_sampler))
        epoch_seed = int(torch.randint(0, 2**62, (1,), generator=self.generator).item())
        pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="kernelkit-loader")
        pending: deque = deque()
        try:
            for _ in range(self.num_threads + self.prefetch):
                item = next(batches, None)
                if item is None:
                    break
                pending.append(pool.submit(self._fetch, item[1], epoch_seed + item[0]))
            while pending:
                batch = pending.popleft().result()
                item = next(batches, None)
                if item is not None:
                    pending.append(pool.submit(self._fetch, item[1], epoch_seed + item[0]))
                yield batch
        finally:  # also when the consumer stops early (budget reached): drop what is queued
            pool.shutdown(wait=True, cancel_futures=True)


class DeviceFeeder:
    """Batches of `loader` on `device`, each copied on a side CUDA stream while the previous step
    computes, so the step never waits for a host-to-device copy (the pinned batches make the copy
    asynchronous). On a CPU device: the loader's batches unchanged. Offers len() like the loader."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        if self.device.type != "cuda":
            yield from self.loader
            return
        stream = torch.cuda.Stream(self.device)
        batches = iter(self.loader)
        try:
            ahead = self._copy(next(batches, None), stream)
            while ahead is not None:
                torch.cuda.current_stream(self.device).wait_stream(stream)
                for t in ahead:
                    # The step's stream uses these tensors: their memory must not be reused by the
                    # caching allocator until it is done with them.
                    t.record_stream(torch.cuda.current_stream(self.device))
                current, ahead = ahead, self._copy(next(batches, None), stream)
                yield current
        finally:  # the consumer stopped early (budget reached): stop the loader's threads now
            close = getattr(batches, "close", None)
            if close is not None:
                close()

    def _copy(self, batch, stream) -> list | None:
        if batch is None:
            return None
        with torch.cuda.stream(stream):
            return [t.to(self.device, non_blocking=True) for t in batch]
