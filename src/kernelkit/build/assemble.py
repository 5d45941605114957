"""Config -> the competition (`open_competition`), and config + competition -> the loaders a run needs (the image cache, the split, samplers)."""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core import distributed, env
from ..core.clock import now as clock_now
from ..core.config import Config
from ..core.context import RunContext
from ..core.distributed import DistInfo
from ..core.stopping import StopFlag
from ..core.storage import GB, plan_storage
from ..data.cache import BuildStopped, ImageCache, build_cache, open_cache
from ..data.folds import make_folds
from ..data.loaders import ImageDataset, make_loader, split_indices
from ..data.images import RECT_ASPECTS, column_rows
from ..data.sampling import balanced_sampler, rect_buckets
from ..data.transforms import EvalTransform, TrainTransform
from ..inputs.competition import Competition, load_competition
from ..inputs.submission import check_submission_writable
from .augmentation import auto_augmentation

log = logging.getLogger("kernelkit")

CACHE_WAIT_SLACK_S = 120.0  # past the build's deadline: its abandonment and the index write

def open_competition(ctx: RunContext) -> Competition:
    """The data, and proof that a submission can be written for it, before anything slow runs."""
    cfg = ctx.cfg
    comp = load_competition(ctx.data_dir, cfg.format, id_column=cfg.id_column, label_column=cfg.label_column,
                            train_images=cfg.train_images, test_images=cfg.test_images, image_ext=cfg.image_ext)
    check_submission_writable(comp, ctx.out_dir)
    return comp


def num_workers(cfg: Config, world_size: int = 1) -> int:
    """num_workers as set, or -1: this rank's share of the cores (distributed.cpu_share)."""
    return distributed.cpu_share(env.cpu_count(), world_size) if cfg.num_workers < 0 else cfg.num_workers


@dataclass
class TrainingData:
    train_loader: Any
    val_loader: Any
    train_targets: np.ndarray
    val_targets: np.ndarray
    val_paths: list[str]
    val_rows: np.ndarray  # positions of the validation images in comp.train_paths (for out-of-fold files)
    gpu_aug: str = ""  # the augmentation level that runs on the device over whole batches ('' = none)


def augmentation_split(aug: str, gpu_aug: str, device_type: str, cached: bool) -> tuple[str, str]:
    """-> (per-image level in the loader, batch level on the device).

    gpu_aug='auto': on a GPU with every training image cached, the loader only gathers cached rows
    and `aug` runs on the device over whole batches: measured on an H100 with 4 cores, the per-image
    crop in the loader held training at ~57% of the GPU's speed. On a CPU, or with images decoded
    on the fly (the per-image work is there anyway), `aug` stays per image. An explicit gpu_aug is
    taken as given, alongside `aug`."""
    if gpu_aug != "auto":
        return aug, gpu_aug
    if device_type == "cuda" and cached:
        return "none", "" if aug == "none" else aug
    return aug, ""


def image_cache(cfg: Config, paths: list[str], info: DistInfo = distributed.SINGLE,
                stop: StopFlag | None = None, deadline: float = 0.0) -> ImageCache | None:
    """Decode once at img_size; epochs after the first read uint8 rows. Rank 0 builds (abandoning the
    build past `deadline`: a cache is a speed-up, never worth the run), others open."""
    if not cfg.cache_images or not paths:
        return None
    root = cache_root(cfg)
    geometry = cfg.geometry()
    cache = None
    if info.is_main:
        log.info("image cache: %d images at %d px%s", len(paths), cfg.img_size,
                 " (rank 0; the other ranks wait)" if info.enabled else "")
        try:
            # rank 0 alone: the other ranks wait idle, so it takes every core
            cache = build_cache(paths, geometry, root, num_workers=num_workers(cfg), mp_context=cfg.mp_context,
                                max_bytes=int(cfg.cache_max_gb * 1e9), stop=stop, deadline=deadline)
        except BuildStopped as e:
            log.warning("%s; images will be decoded as they are used", e)
        except OSError as e:  # a full or read-only disk: slower epochs, not a lost run
            log.error("!!! the image cache could not be built (%s); images will be decoded as they are used", e)
    if info.enabled:
        # a store key, not a barrier: the build may outlast any collective timeout
        distributed.main_done(info, deadline + CACHE_WAIT_SLACK_S if deadline else clock_now() + 86400.0)
        if cache is None:
            cache = open_cache(paths, geometry, root)
    return cache


def cache_root(cfg: Config) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else env.default_cache_dir(env.out_dir_for(cfg.out_dir))


def fit_outputs(cfg: Config, comp: Competition, out_dir: Path, n_params: int) -> Config:
    """The config the data is built with: the cache cut to what the output cap and the disk leave
    once the checkpoints are counted. Raises ConfigError when the checkpoints alone do not fit."""
    n_images = min(len(comp.train_paths), cfg.max_train_images or len(comp.train_paths))
    # a cached image is a column of img_size-wide rows: input_tiles() squares, or a rect's packed rows
    squares = column_rows(max(1, cfg.img_size), cfg.geometry()[3]) / max(1, cfg.img_size)
    plan = plan_storage(out_dir, cache_root(cfg), n_params=n_params, ema=cfg.ema > 0,
                        n_images=math.ceil(n_images * squares),
                        n_outputs=3 * (len(comp.test_ids) + n_images) * comp.num_classes, img_size=cfg.img_size,
                        cache_max_gb=cfg.cache_max_gb, cap_gb=env.output_cap_gb(cfg.output_cap_gb))
    log.info(plan.describe())
    if not cfg.cache_images or plan.cache_allowed_bytes >= plan.cache_wanted_bytes:
        return cfg
    if plan.cache_allowed_bytes < 3 * cfg.img_size ** 2:
        log.warning("no room for an image cache under the output cap and free disk: images are decoded every epoch")
        return dataclasses.replace(cfg, cache_images=False)
    return dataclasses.replace(cfg, cache_max_gb=plan.cache_allowed_bytes / GB)


def split(cfg: Config, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-> (train rows, validation rows): K-fold (iterative stratification for multi-label) or a hold-out."""
    if cfg.fold >= 0:
        folds = make_folds(targets, cfg.n_folds, cfg.seed)
        return np.flatnonzero(folds != cfg.fold), np.flatnonzero(folds == cfg.fold)
    return split_indices(targets, cfg.val_fraction, cfg.seed)


def build_training_data(cfg: Config, comp: Competition, device: torch.device,
                        info: DistInfo = distributed.SINGLE, stop: StopFlag | None = None,
                        cache_deadline: float = 0.0) -> TrainingData:
    nw, pin = num_workers(cfg, info.world_size), device.type == "cuda"
    targets, paths = comp.train_targets, comp.train_paths
    keep = np.arange(len(paths))
    if cfg.max_train_images and len(paths) > cfg.max_train_images:
        keep = np.sort(np.random.default_rng(cfg.seed).permutation(len(paths))[:cfg.max_train_images])
        paths, targets = [paths[i] for i in keep], targets[keep]
    tr_idx, va_idx = split(cfg, targets)
    if len(tr_idx) == 0:
        raise ValueError("no training images found")
    cache = image_cache(cfg, paths, info, stop, cache_deadline)
    *geometry, tiles = cfg.geometry()
    train_cache = cache.subset(tr_idx) if cache else None
    cached = train_cache is not None and train_cache.all_cached()
    # 'auto' is resolved (and logged) by the launcher; a caller building data directly gets the same choice.
    cpu_aug, gpu_aug = augmentation_split(auto_augmentation(cfg, paths)[0], cfg.gpu_aug, device.type, cached)
    if cfg.gpu_aug == "auto" and gpu_aug:
        log.info("augmentation %r runs on the %s over whole batches (the training images are cached: the "
                 "loader only gathers rows)", gpu_aug, device.type)
    train_ds = ImageDataset([paths[i] for i in tr_idx], targets[tr_idx], TrainTransform(*geometry, cpu_aug, tiles),
                            cfg.img_size, cfg.pad_fill, cache=train_cache)
    val_ds = ImageDataset([paths[i] for i in va_idx], targets[va_idx], EvalTransform(*geometry, tiles), cfg.img_size,
                          cfg.pad_fill, cache=cache.subset(va_idx) if cache else None)
    log.info("train %d / validation %d images, %d workers, device %s", len(train_ds), len(val_ds), nw, device)
    # rank 0 reads the headers and the others take its answer: a header one rank alone failed to read
    # would give the ranks different batch counts, and a collective would wait forever
    buckets = distributed.broadcast_object(info, image_buckets(cfg, paths, "training") if info.is_main else None)
    return TrainingData(
        train_loader=make_loader(train_ds, cfg.batch_size, True, nw, cfg.mp_context, pin, cfg.seed,
                                 train_sampler(cfg, targets[tr_idx], train_ds, info, bucketed=buckets is not None),
                                 buckets=None if buckets is None else buckets[tr_idx],
                                 shard=(info.world_size, info.rank)),
        val_loader=(make_loader(val_ds, cfg.batch_size * 2, False, nw, cfg.mp_context, pin,
                                buckets=None if buckets is None else buckets[va_idx])
                    if len(val_ds) and info.is_main else None),
        train_targets=targets[tr_idx], val_targets=targets[va_idx], val_paths=[paths[i] for i in va_idx],
        val_rows=keep[va_idx], gpu_aug=gpu_aug)


def train_sampler(cfg: Config, targets: np.ndarray, dataset, info: DistInfo, bucketed: bool = False):
    if cfg.balanced_sampling > 0:  # not under DDP: train_job.prepare refuses that combination first
        return balanced_sampler(targets, cfg.balanced_sampling, cfg.seed)
    if info.enabled and bucketed:  # every rank the same shuffle of all images; the loader shards the batches
        return torch.utils.data.DistributedSampler(dataset, 1, 0, shuffle=True, seed=cfg.seed)
    if info.enabled:  # each rank sees its own shard, the same number of batches on every rank
        return torch.utils.data.DistributedSampler(dataset, info.world_size, info.rank, shuffle=True,
                                                   seed=cfg.seed, drop_last=True)
    return None


def test_loader(cfg: Config, comp: Competition, device: torch.device, limit: int = 0):
    """The test images through the eval transform of `cfg` (a checkpoint's own config at inference);
    `limit` > 0: only the first `limit` images (the reserve probe)."""
    paths = comp.test_paths[:limit] if limit else comp.test_paths
    ds = ImageDataset(paths, None, EvalTransform(*cfg.geometry()), cfg.img_size,
                      cfg.pad_fill)
    return make_loader(ds, cfg.batch_size * 2, False, num_workers(cfg), cfg.mp_context, device.type == "cuda",
                       buckets=image_buckets(cfg, paths, "test", quiet=bool(limit)))


def image_buckets(cfg: Config, paths: list[str], what: str, quiet: bool = False) -> np.ndarray | None:
    """input_mode rect: each image's aspect bucket, from its header (batches hold one bucket each); None
    in the other modes."""
    if cfg.input_mode != "rect":
        return None
    t0 = clock_now()
    buckets = rect_buckets(paths)
    if not quiet:
        share = {b: float(np.mean(np.abs(buckets) == b)) for b in range(len(RECT_ASPECTS))}
        log.info("rect: %d %s images by aspect bucket %s, headers read in %.1fs", len(paths), what,
                 "  ".join(f"1:{RECT_ASPECTS[b]:g} {share[b]:.0%}" for b in share if share[b]), clock_now() - t0)
    return buckets
