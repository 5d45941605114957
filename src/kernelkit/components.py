"""Config -> the training parts: model, optimizer, scaler, loss, EMA, batch augmentation, and the
seeds that make two runs with one seed give the same result."""
from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch

from .config import Config, parse_duration, parse_kwargs
from .learning import likely_causes
from .losses import get_loss
from .models import build_model, create_ema, create_optimizer
from .resolution import schedule_from
from .swa import create_averager
from .train import FitOptions, TrainParts
from .transforms import IMAGENET, BatchAugment, Preprocess, seed_augmentations

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


def model_from_config(cfg: Config, num_classes: int, with_weights: bool = True) -> torch.nn.Module:
    """The architecture a config describes; `with_weights=False` when a checkpoint will fill it."""
    return build_model(cfg.model, num_classes, cfg.pretrained_path if with_weights else "", cfg.drop_rate,
                       cfg.head, cfg.head_hidden, cfg.head_dropout, cfg.model2,
                       cfg.pretrained_path2 if with_weights else "")


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


def build_loss(cfg: Config, task: str, train_targets: np.ndarray, num_classes: int):
    counts = None
    if cfg.class_balanced:
        counts = (train_targets.sum(0) if task == "multilabel"
                  else np.bincount(train_targets, minlength=num_classes)).astype(float).tolist()
    return get_loss(cfg.loss, task, class_counts=counts, **parse_kwargs(cfg.loss_args))


def batch_augment(cfg: Config, task: str, num_classes: int) -> BatchAugment | None:
    if not (cfg.gpu_aug or cfg.mixup > 0 or cfg.cutmix > 0):
        return None
    return BatchAugment(cfg.gpu_aug, cfg.mixup, cfg.cutmix, num_classes if task == "multiclass" else 0)


def build_parts(cfg: Config, task: str, num_classes: int, train_targets: np.ndarray,
                device: torch.device) -> TrainParts:
    model = model_from_config(cfg, num_classes).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return TrainParts(model=model, optimizer=create_optimizer(model, cfg.lr, cfg.weight_decay, cfg.layer_decay),
                      scaler=make_scaler(cfg.amp and device.type == "cuda"),
                      loss_fn=build_loss(cfg, task, train_targets, num_classes), ema=create_ema(model, cfg.ema),
                      batch_aug=batch_augment(cfg, task, num_classes), swa=create_averager(model, cfg.swa))


def fit_options(cfg: Config, preprocess: Preprocess = IMAGENET) -> FitOptions:
    return FitOptions(lr=cfg.lr, warmup=cfg.warmup, schedule=cfg.schedule, epochs=cfg.epochs, amp=cfg.amp,
                      channels_last=cfg.channels_last, checkpoint_every_s=parse_duration(cfg.checkpoint_every),
                      threshold=cfg.threshold, min_labels=cfg.min_labels, max_labels=cfg.max_labels,
                      beta=cfg.beta, clip_grad=cfg.clip_grad, freeze_until=cfg.freeze,
                      unfreeze_blocks=cfg.unfreeze_blocks, preprocess=preprocess, learn_hint=likely_causes(cfg),
                      resolution=schedule_from(cfg.img_size, cfg.resize_start, cfg.resize_full_at))
