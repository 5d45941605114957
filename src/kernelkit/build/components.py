"""Config -> the training parts: model, optimizer, scaler, loss, EMA, batch augmentation, and the
seeds that make two runs with one seed give the same result."""
from __future__ import annotations

import functools
import logging
import os
import random

import numpy as np
import torch

from ..core import accel
from ..core.config import Config, parse_duration, parse_kwargs
from ..core.weights import weights_given
from ..data.transforms import BatchAugment, Preprocess, normalize, seed_augmentations
from ..engine.evaluate import autocast
from ..engine.learning_check import likely_causes
from ..engine.resolution import fixed_input_size, schedule_from
from ..engine.swa import create_averager
from ..engine.trainer import FitOptions, TrainParts
from ..model.factory import (
    HIGH_RESOLUTION,
    bucket_norms,
    build_model,
    create_ema,
    create_optimizer,
    freeze_early,
    hold_frozen_norms,
)
from ..model.losses import get_loss

log = logging.getLogger("kernelkit")


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Python, NumPy, torch (CPU and every CUDA device) and the augmentation streams; loader workers
    derive theirs from the loader's seeded generator (data.seed_worker). On CPU that is enough for
    identical runs; on GPU `deterministic` also picks deterministic kernels (slower)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too
    seed_augmentations(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


def ready_device(cfg: Config, device: torch.device, rank: int = 0) -> None:
    """Seeds and accelerator settings, before anything runs on the device (autopick measures first):
    cuBLAS reads CUBLAS_WORKSPACE_CONFIG once, when it starts, and a measurement without
    cudnn.benchmark and TF32 underrates what training will reach."""
    seed_everything(cfg.seed + rank, cfg.deterministic)
    accel.tune(device, cfg.deterministic)


def model_from_config(cfg: Config, num_classes: int, with_weights: bool = True) -> torch.nn.Module:
    """The architecture a config describes; `with_weights=False` when a checkpoint will fill it. Rect
    runs keep BatchNorm statistics per aspect bucket (factory.bucket_norms)."""
    model = build_model(cfg.model, num_classes, cfg.pretrained_path if with_weights else "", cfg.drop_rate,
                        cfg.head, cfg.head_hidden, cfg.head_dropout, cfg.model2,
                        cfg.pretrained_path2 if with_weights else "")
    return bucket_norms(model) if cfg.input_mode == "rect" else model


def frozen_stages(cfg: Config) -> int:
    """frozen_stages resolved: as set, or auto = the high-resolution stages when fine-tuning from
    weights (random early layers must learn; pretrained ones already hold edges and colours)."""
    if cfg.frozen_stages >= 0:
        return cfg.frozen_stages
    return HIGH_RESOLUTION if weights_given(cfg.pretrained_path) else 0


def count_parameters(cfg: Config, num_classes: int) -> int:
    """Parameters of the configured model, built on the meta device (no memory, no weights read),
    so the storage plan knows the checkpoint size before the cache is built; 0 when that fails."""
    try:
        with torch.device("meta"):
            model = model_from_config(cfg, num_classes, with_weights=False)
        return sum(p.numel() for p in model.parameters())
    except Exception as e:  # noqa: BLE001  (an init that needs real tensors: plan without it)
        log.warning("could not size the model before building it (%s); the storage plan ignores checkpoints", e)
        return 0


def make_scaler(enabled: bool):
    # torch.amp.GradScaler appeared in torch 2.3; older Kaggle images only have the cuda one.
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda", enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)


SMOOTHED_LOSSES = ("auto", "ce", "complement")  # single-label losses that take label_smoothing
FINETUNE_SMOOTHING = 0.1


def label_smoothing(cfg: Config, task: str) -> float:
    """label_smoothing=-1 (auto): 0.1 for a single-label fine-tune from weights (a pretrained net fits a
    small training set in a few epochs and grows overconfident), else 0."""
    if task != "multiclass" or cfg.loss not in SMOOTHED_LOSSES:
        return 0.0
    if cfg.label_smoothing >= 0:
        return cfg.label_smoothing
    return FINETUNE_SMOOTHING if weights_given(cfg.pretrained_path) else 0.0


def build_loss(cfg: Config, task: str, train_targets: np.ndarray, num_classes: int):
    counts = None
    if cfg.class_balanced:
        counts = (train_targets.sum(0) if task == "multilabel"
                  else np.bincount(train_targets, minlength=num_classes)).astype(float).tolist()
    params = parse_kwargs(cfg.loss_args)
    smoothing = label_smoothing(cfg, task)
    if smoothing and "label_smoothing" not in params:  # loss_args is the more specific setting
        params["label_smoothing"] = smoothing
    return get_loss(cfg.loss, task, class_counts=counts, **params)


def batch_augment(cfg: Config, task: str, num_classes: int, level: str) -> BatchAugment | None:
    """`level`: the augmentation that runs on the device (assemble.augmentation_split decides)."""
    if not (level or cfg.mixup > 0 or cfg.cutmix > 0):
        return None
    return BatchAugment(level, cfg.mixup, cfg.cutmix, num_classes if task == "multiclass" else 0, fill=cfg.pad_fill)


def build_parts(cfg: Config, task: str, num_classes: int, train_targets: np.ndarray,
                device: torch.device, gpu_aug: str) -> TrainParts:
    """`gpu_aug`: the batch augmentation level on the device (TrainingData.gpu_aug)."""
    accel.tune(device, cfg.deterministic)
    model = model_from_config(cfg, num_classes).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
        if not accel.has_tensor_cores(device):
            log.info("channels_last on %s, which has no tensor cores: NHWC may be slower than NCHW there "
                     "(channels_last=false to compare)", torch.cuda.get_device_name(device))
    stages = frozen_stages(cfg)
    frozen = freeze_early(model, stages)
    if frozen:
        log.info("frozen for the whole run: the stem and %s, %d of %d parameters (frozen_stages=%s)",
                 "the stages at stride <= 4" if stages == HIGH_RESOLUTION else f"the first {stages} stage(s)",
                 frozen, sum(p.numel() for p in model.parameters()),
                 "auto, fine-tuning" if cfg.frozen_stages < 0 else stages)
    dtype = accel.amp_dtype(cfg.amp_dtype, device)
    if cfg.amp and device.type == "cuda":  # said once here; the other callers of amp_dtype stay quiet
        log.info("mixed precision: %s%s", accel.dtype_name(dtype),
                 " with loss scaling" if accel.needs_loss_scaling(cfg.amp, dtype, device) else "")
        if dtype == torch.bfloat16 and not accel.bf16_is_fast(device):
            log.warning("!!! amp_dtype=bf16 on %s, which has no fast bf16: expect slow steps (fp16 is faster "
                        "there)", torch.cuda.get_device_name(device))
    return TrainParts(model=model, optimizer=create_optimizer(model, cfg.lr, cfg.weight_decay, cfg.layer_decay),
                      scaler=make_scaler(accel.needs_loss_scaling(cfg.amp, dtype, device)),
                      loss_fn=build_loss(cfg, task, train_targets, num_classes), ema=create_ema(model, cfg.ema),
                      batch_aug=batch_augment(cfg, task, num_classes, gpu_aug), swa=create_averager(model, cfg.swa))


def compile_step_model(cfg: Config, parts: TrainParts, task: str, num_classes: int, device: torch.device,
                       preprocess: Preprocess) -> None:
    """cfg.compile: compile now (accel.compile_for_training) on dummy batches shaped like the real
    ones, at every input size progressive resizing will train at (a size first seen in training
    would recompile on the training clock, and a second size makes Dynamo trace dynamic shapes, so
    each size gets its own static graph here), so the time is spent before the schedule is laid over
    the clock; sets parts.step_model (the compiled model, or None after a logged fallback) and
    parts.compiled."""
    skip = accel.compile_unsupported(device)
    if skip:
        log.warning("compile=true skipped on %s (%s): training runs the eager model",
                    torch.cuda.get_device_name(device), skip)
        parts.compiled, parts.step_model = accel.Compiled(parts.model, 0.0, f"skipped: {skip}"), None
        return
    sizes = warmup_sizes(cfg, parts.model)
    dtype = accel.amp_dtype(cfg.amp_dtype, device)

    def warmup(model: torch.nn.Module) -> None:
        model.train()
        hold_frozen_norms(model)
        for size in sizes:
            x, y, ok = dummy_batch(cfg.batch_size, size, task, num_classes, device, cfg.channels_last, preprocess)
            with autocast(device, cfg.amp, dtype):
                logits = model(x)
            parts.loss_fn(logits, y, ok).backward()

    log.info("compiling %s for training at %s px (compile=true; the time counts against the budget)", cfg.model,
             ", ".join(map(str, sizes)))
    result = accel.compile_for_training(parts.model, warmup, compiler=functools.partial(torch.compile, dynamic=False))
    result.sizes = tuple(sizes)
    parts.compiled = result
    if result.error:
        log.error("!!! torch.compile failed after %.1fs (%s): training continues with the eager model",
                  result.seconds, result.error)
        parts.step_model = None
    else:
        log.info("compiled in %.1fs (%d input size%s, warm-up included; charged to the budget)", result.seconds,
                 len(sizes), "" if len(sizes) == 1 else "s")
        parts.step_model = result.model


def warmup_sizes(cfg: Config, model: torch.nn.Module) -> list[int]:
    """Every input size training will run at: the progressive-resizing stages, else img_size."""
    sched = schedule_from(cfg.img_size, cfg.resize_start, cfg.resize_full_at)
    if sched is None or fixed_input_size(model):
        return [cfg.img_size]
    return sorted(set(sched.sizes()))


def dummy_batch(n: int, size: int, task: str, num_classes: int, device: torch.device, channels_last: bool,
                preprocess: Preprocess) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = normalize(torch.zeros(n, 3, size, size, dtype=torch.uint8, device=device), channels_last, preprocess)
    y = (torch.zeros(n, num_classes, device=device) if task == "multilabel"
         else torch.zeros(n, dtype=torch.long, device=device))
    return x, y, torch.ones(n, device=device)


def fit_options(cfg: Config, preprocess: Preprocess, device: torch.device) -> FitOptions:
    return FitOptions(lr=cfg.lr, warmup=cfg.warmup, schedule=cfg.schedule, epochs=cfg.epochs, amp=cfg.amp,
                      amp_dtype=accel.amp_dtype(cfg.amp_dtype, device),
                      channels_last=cfg.channels_last, checkpoint_every_s=parse_duration(cfg.checkpoint_every),
                      threshold=cfg.threshold, min_labels=cfg.min_labels, max_labels=cfg.max_labels,
                      beta=cfg.beta, clip_grad=cfg.clip_grad, freeze_until=cfg.freeze,
                      unfreeze_blocks=cfg.unfreeze_blocks, preprocess=preprocess, learn_hint=likely_causes(cfg),
                      resolution=schedule_from(cfg.img_size, cfg.resize_start, cfg.resize_full_at))
