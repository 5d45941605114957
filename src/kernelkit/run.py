"""The adapter from Config to the library: train, predict, write submission.csv.

Whatever happens in training, a submission is written from the best weights available; the exit
status says what happened (see EXIT_*).
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed, env
from .budget import BudgetClock, InferenceReserve, affordable_tta, fmt_seconds
from .checkpoint import load_checkpoint, save_checkpoint, set_rng_state
from .cache import ImageCache, build_cache, open_cache
from .competition import Competition, format_predictions, load_competition, write_submission
from .config import Config, budget_seconds, make_config, parse_duration, parse_kwargs
from .data import ImageDataset, make_loader, split_indices
from .decode import decode
from .demo import make_demo_competition
from .distributed import DistInfo
from .infer import predict
from .losses import get_loss
from .metrics import fbeta_per_image, prior_baseline
from .models import build_model, create_ema, create_optimizer
from .plan import Plan, make_plan
from .folds import make_folds, save_oof
from .reports import plot_history, write_error_analysis, write_label_statistics
from .sampling import balanced_sampler
from .session import begin_run, finish_run
from .thresholds import ThresholdRule, groups_from_names, search_classes, search_groups
from .train import FitOptions, FitState, fit, train_one_epoch
from .transforms import BatchAugment, EvalTransform, TrainTransform, tta_views

log = logging.getLogger("kernelkit")

EXIT_OK = 0
EXIT_NO_SUBMISSION = 1
EXIT_TRAIN_FAILED = 3  # training raised; submission.csv written from the best checkpoint
EXIT_PLAN_DOES_NOT_FIT = 4  # --dry-run: the plan does not fit the budget


def setup_logging() -> None:
    """Timestamped lines on stdout, unless the host (pytest, a notebook that set up logging)
    already handles records: then ours propagate to it instead of printing twice."""
    log.setLevel(logging.INFO)
    if not log.handlers and not logging.getLogger().handlers:
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(h)


def output_dir(cfg: Config) -> Path:
    return Path(cfg.out_dir) if cfg.out_dir else env.default_out_dir()


def resolve_paths(cfg: Config) -> tuple[Path, Path, bool]:
    """-> (data_dir, out_dir, is_demo)."""
    out_dir = output_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.data_dir:
        return Path(cfg.data_dir), out_dir, False
    found = env.find_competition_dir()
    if found is not None:
        return found, out_dir, False
    return out_dir / "demo_data", out_dir, True


def num_workers(cfg: Config) -> int:
    return min(env.cpu_count(), 8) if cfg.num_workers < 0 else cfg.num_workers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def image_cache(cfg: Config, paths: list[str], info: DistInfo = distributed.SINGLE) -> ImageCache | None:
    """Decode once at img_size; epochs after the first read uint8 rows. Rank 0 builds, others open."""
    if not cfg.cache_images or not paths:
        return None
    root = Path(cfg.cache_dir) if cfg.cache_dir else env.default_cache_dir(output_dir(cfg))
    geometry = (cfg.img_size, cfg.pad_aspect, cfg.pad_fill)
    cache = None
    if info.is_main:
        cache = build_cache(paths, geometry, root, num_workers=num_workers(cfg), mp_context=cfg.mp_context,
                            max_bytes=int(cfg.cache_max_gb * 1e9))
    if info.enabled:
        distributed.barrier(info)
        if cache is None:
            cache = open_cache(paths, geometry, root)
    return cache


def build_test_loader(cfg: Config, comp: Competition, device: torch.device):
    ds = ImageDataset(comp.test_paths, None, EvalTransform(cfg.img_size, cfg.pad_aspect, cfg.pad_fill),
                      cfg.img_size, cfg.pad_fill)
    return make_loader(ds, cfg.batch_size * 2, False, num_workers(cfg), cfg.mp_context, device.type == "cuda")


def write_outputs(comp: Competition, probs: np.ndarray, ok: np.ndarray, task: str, rule: ThresholdRule,
                  out_dir: Path) -> Path:
    """Decode, write submission.csv (validated) and the raw probabilities for blending."""
    if (~ok).any():
        log.warning("%d test images could not be read; their rows use the model's output on a blank image",
                    int((~ok).sum()))
    np.save(out_dir / "test_probs.npy", probs.astype(np.float32))
    cells = format_predictions(comp, decode(task, probs, rule=rule))
    path = out_dir / "submission.csv"
    write_submission(comp, cells, path)
    log.info("submission written: %s (%d rows)", path.resolve(), len(cells))
    return path


def load_resume_checkpoint(path: Path | None, cfg: Config, comp: Competition) -> dict[str, Any] | None:
    if path is None:
        return None
    ckpt = load_checkpoint(path)
    if ckpt.get("classes") != comp.classes or ckpt.get("config", {}).get("model") != cfg.model:
        log.warning("%s belongs to a different model or label set; starting fresh", path)
        return None
    return ckpt


@dataclass
class TrainingData:
    train_loader: Any
    val_loader: Any
    train_targets: np.ndarray
    val_targets: np.ndarray
    val_paths: list[str]
    val_rows: np.ndarray  # positions of the validation images in comp.train_paths (for out-of-fold files)


def build_training_data(cfg: Config, comp: Competition, device: torch.device,
                        info: DistInfo = distributed.SINGLE) -> TrainingData:
    nw, pin = num_workers(cfg), device.type == "cuda"
    targets, paths = comp.train_targets, comp.train_paths
    keep = np.arange(len(paths))
    if cfg.max_train_images and len(paths) > cfg.max_train_images:
        keep = np.sort(np.random.default_rng(cfg.seed).permutation(len(paths))[:cfg.max_train_images])
        paths, targets = [paths[i] for i in keep], targets[keep]
    if cfg.fold >= 0:  # K-fold cross-validation: iterative stratification for multi-label targets
        folds = make_folds(targets, cfg.n_folds, cfg.seed)
        tr_idx, va_idx = np.flatnonzero(folds != cfg.fold), np.flatnonzero(folds == cfg.fold)
    else:
        tr_idx, va_idx = split_indices(targets, cfg.val_fraction, cfg.seed)
    if len(tr_idx) == 0:
        raise ValueError("no training images found")
    cache = image_cache(cfg, paths, info)
    train_ds = ImageDataset([paths[i] for i in tr_idx], targets[tr_idx],
                            TrainTransform(cfg.img_size, cfg.pad_aspect, cfg.pad_fill, cfg.aug), cfg.img_size,
                            cfg.pad_fill, cache=cache.subset(tr_idx) if cache else None)
    val_ds = ImageDataset([paths[i] for i in va_idx], targets[va_idx],
                          EvalTransform(cfg.img_size, cfg.pad_aspect, cfg.pad_fill), cfg.img_size, cfg.pad_fill,
                          cache=cache.subset(va_idx) if cache else None)
    log.info("train %d / validation %d images, %d workers, device %s", len(train_ds), len(val_ds), nw, device)
    sampler = None
    if cfg.balanced_sampling > 0:
        if info.enabled:
            raise ValueError("balanced_sampling is not supported with data-parallel training yet; set ddp_procs=1")
        sampler = balanced_sampler(targets[tr_idx], cfg.balanced_sampling, cfg.seed)
    elif info.enabled:  # each rank sees its own shard, the same number of batches on every rank
        sampler = torch.utils.data.DistributedSampler(train_ds, info.world_size, info.rank, shuffle=True,
                                                      seed=cfg.seed, drop_last=True)
    return TrainingData(
        train_loader=make_loader(train_ds, cfg.batch_size, True, nw, cfg.mp_context, pin, cfg.seed, sampler),
        val_loader=(make_loader(val_ds, cfg.batch_size * 2, False, nw, cfg.mp_context, pin)
                    if len(val_ds) and info.is_main else None),
        train_targets=targets[tr_idx], val_targets=targets[va_idx], val_paths=[paths[i] for i in va_idx],
        val_rows=keep[va_idx])


def model_from_config(cfg: Config, num_classes: int, with_weights: bool = True) -> torch.nn.Module:
    """The architecture a config describes; `with_weights=False` when a checkpoint will fill it."""
    return build_model(cfg.model, num_classes, cfg.pretrained_path if with_weights else "", cfg.drop_rate,
                       cfg.head, cfg.head_hidden, cfg.head_dropout, cfg.model2,
                       cfg.pretrained_path2 if with_weights else "")


def build_model_and_optimizer(cfg: Config, num_classes: int, device: torch.device):
    model = model_from_config(cfg, num_classes).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer(model, cfg.lr, cfg.weight_decay, cfg.layer_decay)
    enabled = cfg.amp and device.type == "cuda"
    # torch.amp.GradScaler appeared in torch 2.3; older Kaggle images only have the cuda one.
    scaler = (torch.amp.GradScaler("cuda", enabled=enabled) if hasattr(torch.amp, "GradScaler")
              else torch.cuda.amp.GradScaler(enabled=enabled))
    return model, optimizer, scaler


def inference_weights(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights that were validated: the EMA when training kept one."""
    return ckpt.get("ema") or ckpt["model"]


def restore(ckpt: dict[str, Any], model, optimizer, scaler, ema=None) -> FitState:
    model.load_state_dict(ckpt["model"])
    if ema is not None and "ema" in ckpt:
        ema.module.load_state_dict(ckpt["ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    return FitState(epoch=ckpt["epoch"], step=ckpt["step"], progress=ckpt["progress"],
                    best_score=ckpt["best_score"], threshold=ckpt["threshold"])


def batch_augment(cfg: Config, task: str, num_classes: int) -> BatchAugment | None:
    if not (cfg.gpu_aug or cfg.mixup > 0 or cfg.cutmix > 0):
        return None
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.loss == "complement":
        raise ValueError("mixup/cutmix give soft targets, which the complement loss does not take")
    return BatchAugment(cfg.gpu_aug, cfg.mixup, cfg.cutmix, num_classes if task == "multiclass" else 0)


def fit_options(cfg: Config, task: str = "multilabel", num_classes: int = 0) -> FitOptions:
    return FitOptions(batch_aug=batch_augment(cfg, task, num_classes), lr=cfg.lr, warmup=cfg.warmup, schedule=cfg.schedule, epochs=cfg.epochs, amp=cfg.amp,
                      channels_last=cfg.channels_last, checkpoint_every_s=parse_duration(cfg.checkpoint_every),
                      threshold=cfg.threshold, min_labels=cfg.min_labels, max_labels=cfg.max_labels,
                      beta=cfg.beta, clip_grad=cfg.clip_grad, freeze_until=cfg.freeze,
                      unfreeze_blocks=cfg.unfreeze_blocks)


def _report(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception:  # noqa: BLE001  (a report must never cost the submission)
        log.exception("report %s failed; continuing", fn.__name__)
        return None


def write_validation_reports(cfg: Config, comp: Competition, data: TrainingData, rule: ThresholdRule,
                             out_dir: Path, summary: dict[str, Any]) -> None:
    """Curves, per-label errors and worst images of the best epoch; its out-of-fold file under K-fold."""
    metric = f"F{cfg.beta:g} per image" if comp.task == "multilabel" else "accuracy"
    _report(plot_history, out_dir / "history.csv", out_dir / "history.png", metric=metric)
    val_probs_path = out_dir / "val_probs.npy"
    if not len(data.val_targets) or not val_probs_path.is_file():
        return
    val_probs = np.load(val_probs_path)
    if val_probs.shape[0] != len(data.val_targets):
        return
    val_pred = rule.apply(val_probs) if comp.task == "multilabel" else val_probs.argmax(1)
    errors = _report(write_error_analysis, data.val_targets, val_pred, val_probs, comp.class_names,
                     [Path(p).stem for p in data.val_paths], out_dir)
    summary["errors"] = errors
    if cfg.fold >= 0:
        save_oof(out_dir / "oof", cfg.fold, data.val_rows, val_probs)


def build_loss(cfg: Config, task: str, train_targets: np.ndarray, num_classes: int):
    counts = None
    if cfg.class_balanced:
        counts = (train_targets.sum(0) if task == "multilabel"
                  else np.bincount(train_targets, minlength=num_classes)).astype(float).tolist()
    return get_loss(cfg.loss, task, class_counts=counts, **parse_kwargs(cfg.loss_args))


def choose_rule(cfg: Config, comp: Competition, threshold: float, out_dir: Path, val_targets: np.ndarray) -> ThresholdRule:
    """The multi-label decision rule: the global threshold picked during training, refined per
    group or per class on the best epoch's validation probabilities when asked."""
    rule = ThresholdRule("global", [cfg.threshold if cfg.threshold >= 0 else threshold], cfg.min_labels,
                         cfg.max_labels)
    val_probs = out_dir / "val_probs.npy"
    if comp.task != "multilabel" or cfg.threshold >= 0 or cfg.threshold_rule == "global" or not val_probs.is_file():
        return rule
    probs = np.load(val_probs)
    if probs.shape != val_targets.shape:
        log.warning("val_probs.npy does not match the validation split; keeping the global threshold")
        return rule
    if cfg.threshold_rule == "group":
        groups = groups_from_names(comp.class_names)
        found, score = search_groups(val_targets, probs, groups, cfg.beta, min_labels=cfg.min_labels,
                                     max_labels=cfg.max_labels)
    elif cfg.threshold_rule == "class":
        found, score = search_classes(val_targets, probs, cfg.beta, min_labels=cfg.min_labels,
                                      max_labels=cfg.max_labels, show_progress=True)
    else:
        raise ValueError(f"unknown threshold_rule {cfg.threshold_rule!r}; choose global | group | class")
    log.info("threshold rule %s: validation F%g %.4f (global %.4f)", found.kind, cfg.beta, score,
             rule.score(val_targets, probs, cfg.beta))
    return found


def train_and_predict(cfg: Config, comp: Competition, out_dir: Path, device: torch.device,
                      clock: BudgetClock, resume_path: Path | None = None,
                      info: DistInfo = distributed.SINGLE) -> tuple[int, dict]:
    data = build_training_data(cfg, comp, device, info)
    model, optimizer, scaler = build_model_and_optimizer(cfg, comp.num_classes, device)
    if info.enabled and cfg.freeze > 0:
        raise ValueError("freeze is not supported with data-parallel training yet; set ddp_procs=1")
    ema = create_ema(model, cfg.ema)
    state = FitState()
    ckpt = load_resume_checkpoint(resume_path, cfg, comp)
    if ckpt is not None:
        state = restore(ckpt, model, optimizer, scaler, ema)
        log.info("resumed from %s: epoch %d, step %d, progress %.2f; %s of the budget already spent",
                 resume_path, state.epoch, state.step, state.progress, fmt_seconds(clock.elapsed()))
    model = distributed.wrap(model, info)
    n_val = len(data.val_targets)
    reserve = InferenceReserve(len(comp.test_ids), n_val, cfg.tta)
    extra = {"config": cfg.to_dict(), "classes": comp.classes, "task": comp.task}
    summary: dict[str, Any] = {"train_images": len(data.train_targets), "val_images": n_val,
                               "train_start_s": round(clock.elapsed(), 1)}
    # config errors surface here, not as a "training failed"
    loss_fn = build_loss(cfg, comp.task, data.train_targets, comp.num_classes)
    opts = fit_options(cfg, comp.task, comp.num_classes)
    status = EXIT_OK
    try:
        result = fit(model, data.train_loader, data.val_loader, data.val_targets, task=comp.task,
                     loss_fn=loss_fn, optimizer=optimizer, scaler=scaler, device=device,
                     clock=clock, reserve=reserve, opts=opts, out_dir=out_dir, state=state, extra=extra,
                     dist=info, ema=ema)
        summary.update(stop_reason=result["stop_reason"], epochs=len(result["history"]), steps=state.step,
                       bad_train_images=state.bad_images, nonfinite_steps=state.nonfinite_steps,
                       failed_saves=state.failed_saves, micro_batches=state.micro_batches)
        if state.step == 0:
            log.warning("the budget left no time to train (%s left, inference needs ~%s); predicting untrained",
                        fmt_seconds(clock.remaining()), fmt_seconds(reserve.seconds()))
    except Exception:  # noqa: BLE001  (the run must still produce a submission)
        log.exception("training failed; predicting with the best checkpoint available")
        status = EXIT_TRAIN_FAILED
        summary["stop_reason"] = "error"
    summary["train_end_s"] = round(clock.elapsed(), 1)
    if not info.is_main:
        return status, summary
    model = distributed.unwrap(model)

    threshold = state.threshold
    for name in ("best.pt", "last.pt"):
        if (out_dir / name).is_file():
            best = load_checkpoint(out_dir / name, device)
            model.load_state_dict(inference_weights(best))
            threshold = best.get("threshold", threshold)
            summary.update(checkpoint=name, val_score=best.get("best_score"))
            rule = choose_rule(cfg, comp, threshold, out_dir, data.val_targets)
            if rule.kind != "global":  # stored so offline inference decodes the same way
                save_checkpoint({**best, "threshold_rule": rule.to_dict()}, out_dir / name)
            break
    else:
        rule = choose_rule(cfg, comp, threshold, out_dir, data.val_targets)
    if n_val:
        summary["baseline"] = prior_baseline(comp.task, data.train_targets, data.val_targets, cfg.beta)
    summary["threshold_rule"] = rule.to_dict() if comp.task == "multilabel" else None
    write_validation_reports(cfg, comp, data, rule, out_dir, summary)
    # Model loading and reports are done by now: what is left is the test loader's start-up and the views.
    tta = affordable_tta(cfg.tta, len(comp.test_ids), reserve.infer_ips, clock.remaining() - reserve.startup_s)
    if tta < cfg.tta:
        log.warning("only %s left: predicting with %d TTA views instead of %d",
                    fmt_seconds(clock.remaining()), tta, cfg.tta)
    out = predict(model, build_test_loader(cfg, comp, device), device, comp.task, tta_views(tta),
                  cfg.amp, cfg.channels_last, desc="test")
    summary.update(tta=tta, infer_images_per_s=round(out["images_per_s"], 1))
    write_outputs(comp, out["probs"], out["ok"], comp.task, rule, out_dir)
    return status, summary


def dry_run(cfg: Config, comp: Competition, device: torch.device, setup_s: float, train_steps: int = 12,
            infer_batches: int = 4) -> Plan:
    """Time a few training steps and TTA batches on a subset, then plan the full budget."""
    data = build_training_data(cfg, comp, device)
    model, optimizer, scaler = build_model_and_optimizer(cfg, comp.num_classes, device)
    opts = fit_options(cfg, comp.task, comp.num_classes)
    state = FitState()

    def first_steps_at_peak_lr(step: int) -> tuple[bool, float]:
        return step >= train_steps, cfg.lr

    tr = train_one_epoch(model, data.train_loader, optimizer, scaler,
                         build_loss(cfg, comp.task, data.train_targets, comp.num_classes), device,
                         state, opts, control=first_steps_at_peak_lr)
    test_loader = build_test_loader(cfg, comp, device)
    subset = torch.utils.data.Subset(test_loader.dataset, range(min(len(test_loader.dataset),
                                                                    infer_batches * test_loader.batch_size)))
    loader = make_loader(subset, test_loader.batch_size, False, num_workers(cfg), cfg.mp_context,
                         device.type == "cuda")
    inf = predict(model, loader, device, comp.task, tta_views(cfg.tta), cfg.amp, cfg.channels_last, desc="dry-run")
    budget_s, margin_s = budget_seconds(cfg)
    return make_plan(budget_s=budget_s, margin_s=margin_s, setup_s=setup_s, train_ips=tr["images_per_s"],
                     infer_ips=inf["images_per_s"], n_train=len(data.train_targets), n_val=len(data.val_targets),
                     n_test=len(comp.test_ids), tta=cfg.tta, epochs=cfg.epochs, loader_startup_s=inf["first_batch_s"])


def find_checkpoints(spec: str) -> list[Path]:
    p = Path(spec)
    if p.is_dir():
        found = sorted(p.glob("best*.pt")) or sorted(p.glob("*.pt"))
    elif p.is_file():
        found = [p]
    else:
        found = sorted(Path(x) for x in glob.glob(spec))
    if not found:
        raise FileNotFoundError(f"no checkpoints match {spec!r}")
    return found


def infer_only(cfg: Config, comp: Competition, out_dir: Path, device: torch.device, clock: BudgetClock) -> dict:
    """Average TTA probabilities of one or more checkpoints; each rebuilds its own model and input size.

    The first checkpoint's measured speed decides how many TTA views the others can afford; a
    checkpoint that cannot fit even one view is skipped, so a submission is always written in time.
    """
    paths = find_checkpoints(cfg.checkpoints)
    probs_sum, ok, rules, used = None, None, [], []
    seconds_per_view: float | None = None
    for i, p in enumerate(paths):
        tta = cfg.tta
        if seconds_per_view is not None:
            share = clock.remaining() / (len(paths) - i)
            tta = affordable_tta(cfg.tta, 1, 1.0 / seconds_per_view, share)
            if share < seconds_per_view:
                log.warning("no time left for %s and %d more checkpoint(s); skipped", p, len(paths) - i - 1)
                break
            if tta < cfg.tta:
                log.warning("%s: %d TTA views instead of %d to stay inside the budget", p.name, tta, cfg.tta)
        ckpt = load_checkpoint(p, "cpu")
        ccfg = Config.from_dict(ckpt["config"])
        if ckpt["classes"] != comp.classes:
            raise ValueError(f"{p}: trained on a different label set than the {comp.format} data in {cfg.data_dir}")
        model = model_from_config(ccfg, len(ckpt["classes"]), with_weights=False)
        model.load_state_dict(inference_weights(ckpt))
        model.to(device).eval()
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        run_cfg = Config.from_dict({**ccfg.to_dict(), "batch_size": cfg.batch_size, "num_workers": cfg.num_workers,
                                    "mp_context": cfg.mp_context})
        t0 = time.time()
        out = predict(model, build_test_loader(run_cfg, comp, device), device, ckpt["task"], tta_views(tta),
                      cfg.amp, cfg.channels_last, desc=p.name)
        seconds_per_view = (time.time() - t0) / tta
        np.save(out_dir / f"test_probs_{p.stem}.npy", out["probs"].astype(np.float32))
        probs_sum = out["probs"] if probs_sum is None else probs_sum + out["probs"]
        ok = out["ok"]
        rules.append(ThresholdRule.from_dict(ckpt["threshold_rule"]) if "threshold_rule" in ckpt else
                     ThresholdRule("global", [float(ckpt.get("threshold", 0.5))], cfg.min_labels, cfg.max_labels))
        used.append({"checkpoint": str(p), "model": ccfg.model, "tta": tta, "val_score": ckpt.get("best_score")})
        log.info("%s: %s, val score %.4f, %d TTA views", p, ccfg.model, ckpt.get("best_score", float("nan")), tta)
    rule = ensemble_rule(rules, cfg)
    write_outputs(comp, probs_sum / len(used), ok, comp.task, rule, out_dir)
    return {"checkpoints": used, "threshold_rule": rule.to_dict(), "wall_s": round(clock.elapsed(), 1)}


def ensemble_rule(rules: list[ThresholdRule], cfg: Config) -> ThresholdRule:
    """Global thresholds of several checkpoints average; a refined rule is taken from the first."""
    if cfg.threshold >= 0:
        return ThresholdRule("global", [cfg.threshold], cfg.min_labels, cfg.max_labels)
    if all(r.kind == "global" for r in rules):
        return ThresholdRule("global", [float(np.mean([r.values[0] for r in rules]))], cfg.min_labels,
                             cfg.max_labels)
    log.info("using the %s threshold rule of the first checkpoint for the average", rules[0].kind)
    return rules[0]


def _demo_test_score(data_dir: Path, out_dir: Path, comp: Competition) -> float | None:
    sol = data_dir / "test_solution.csv"
    if comp.task != "multilabel" or not sol.is_file():
        return None
    import pandas as pd
    truth_df = pd.read_csv(sol, dtype=str, keep_default_na=False)
    sub = pd.read_csv(out_dir / "submission.csv", dtype=str, keep_default_na=False)
    pos = {c: i for i, c in enumerate(comp.classes)}

    def onehot(cells) -> np.ndarray:
        m = np.zeros((len(cells), len(pos)), np.uint8)
        for r, cell in enumerate(cells):
            for t in cell.split():
                m[r, pos[t]] = 1
        return m
    return fbeta_per_image(onehot(truth_df.attribute_ids), onehot(sub.iloc[:, 1]))


@dataclass
class Context:
    cfg: Config
    args: argparse.Namespace
    data_dir: Path
    out_dir: Path
    is_demo: bool
    t_start: float


def resolve(config_block: dict[str, Any] | None, argv: list[str] | None, t_start: float) -> Context:
    """Config and paths, with no side effects beyond creating out_dir."""
    cfg, args = make_config(config_block, argv)
    data_dir, out_dir, is_demo = resolve_paths(cfg)
    if is_demo and not cfg.preset:
        cfg, args = make_config({**(config_block or {}), "preset": "demo"}, argv)
        data_dir, out_dir, _ = resolve_paths(cfg)
    return Context(cfg, args, data_dir, out_dir, is_demo, t_start)


def announce(ctx: Context) -> None:
    env.check_versions({"torch": torch.__version__, "timm": timm_version()})
    log.info("kernelkit: torch %s, timm %s, %s, config:\n%s", torch.__version__, timm_version(),
             "on Kaggle" if env.on_kaggle() else "local", ctx.cfg.pretty())
    ctx.cfg.save(ctx.out_dir / "config.json")
    if ctx.is_demo:
        log.info("no competition data found: running the built-in demo (set data_dir= for a real competition)")
        make_demo_competition(ctx.data_dir, ctx.cfg.demo_images, max(50, ctx.cfg.demo_images // 5), ctx.cfg.seed)


def timm_version() -> str:
    import timm
    return timm.__version__


def main(config_block: dict[str, Any] | None = None, argv: list[str] | None = None,
         started_at: float | None = None) -> int:
    """`started_at`: process start (kernel.py records it before importing torch), so the budget
    counts the imports too."""
    setup_logging()
    ctx = resolve(config_block, argv, started_at or time.time())
    cfg = ctx.cfg
    if cfg.mode not in ("train", "infer"):
        raise ValueError(f"unknown mode {cfg.mode!r}; choose train | infer")
    info = distributed.from_torchrun()
    if info is not None:  # started by torchrun: one process per rank already
        info = DistInfo(info.rank, info.world_size, info.local_rank, distributed.default_backend(cfg.ddp_backend))
        if info.rank:
            log.setLevel(logging.WARNING)
        distributed.init(info)
        try:
            return run_rank(ctx, info)
        finally:
            distributed.shutdown(info)
    procs = distributed.wanted_processes(cfg.ddp_procs) if cfg.mode == "train" and not ctx.args.dry_run else 1
    if procs > 1:
        announce(ctx)  # once, before the ranks start: the demo data must exist for all of them
        return launch_ranks(procs, config_block, argv, ctx)
    return run_rank(ctx, distributed.SINGLE)


def launch_ranks(procs: int, config_block: dict[str, Any] | None, argv: list[str] | None, ctx: Context) -> int:
    """Kaggle has no torchrun in a script kernel: start one spawned process per rank ourselves."""
    import torch.multiprocessing as mp
    port = distributed.free_port()
    log.info("starting %d data-parallel processes (%s)", procs, distributed.default_backend(ctx.cfg.ddp_backend))
    mp.start_processes(rank_worker, args=(procs, port, config_block, argv, ctx.t_start), nprocs=procs,
                       join=True, start_method="spawn")
    summary = json.loads((ctx.out_dir / "summary.json").read_text())
    return int(summary.get("exit_status", EXIT_NO_SUBMISSION))


def rank_worker(rank: int, world_size: int, port: int, config_block: dict[str, Any] | None,
                argv: list[str] | None, t_start: float) -> None:
    """Entry of a spawned rank (module level, so spawn can import it)."""
    setup_logging()
    if rank:
        log.setLevel(logging.WARNING)
    ctx = resolve(config_block, argv, t_start)
    info = DistInfo(rank, world_size, rank, distributed.default_backend(ctx.cfg.ddp_backend))
    distributed.init(info, f"tcp://127.0.0.1:{port}")
    try:
        run_rank(ctx, info, announced=True)
    except Exception:  # noqa: BLE001
        if info.is_main:
            raise
        # Exiting non-zero would make the launcher kill rank 0 before it writes the submission.
        log.exception("rank %d failed; rank 0 carries on", rank)
    finally:
        distributed.shutdown(info)


def run_rank(ctx: Context, info: DistInfo, announced: bool = False) -> int:
    cfg, out_dir = ctx.cfg, ctx.out_dir
    if info.is_main and not announced:
        announce(ctx)
    distributed.barrier(info)
    comp = load_competition(ctx.data_dir, cfg.format)
    if info.is_main and cfg.mode == "train" and not ctx.args.dry_run:
        _report(write_label_statistics, comp.train_targets, comp.class_names, comp.train_paths, comp.task, out_dir)
    device = info.device()
    if cfg.mode == "infer":
        summary = infer_only(cfg, comp, out_dir, device, BudgetClock(*budget_seconds(cfg), start_time=ctx.t_start))
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
        log.info("done in %s: %s", fmt_seconds(time.time() - ctx.t_start), summary)
        return EXIT_OK
    if ctx.args.dry_run:
        plan = dry_run(cfg, comp, device, setup_s=time.time() - ctx.t_start)
        (out_dir / "plan.json").write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
        log.info("dry-run plan for %s on %s:\n%s", cfg.model, device, plan.table())
        return EXIT_OK if plan.fits else EXIT_PLAN_DOES_NOT_FIT

    run_start, resume_path = begin_run(out_dir, cfg.resume, ctx.t_start) if info.is_main else (0.0, None)
    run_start, resume_path = distributed.broadcast_object(info, (run_start, resume_path))
    if resume_path is None and cfg.resume_from:
        resume_path = Path(cfg.resume_from)
        if not resume_path.is_file():
            raise FileNotFoundError(f"resume_from {resume_path} does not exist")
    clock = BudgetClock(*budget_seconds(cfg), start_time=run_start)
    status, summary = train_and_predict(cfg, comp, out_dir, device, clock, resume_path, info)
    if not info.is_main:
        return status
    finish_run(out_dir)
    summary.update(wall_s=round(clock.elapsed(), 1), exit_status=status, world_size=info.world_size)
    if ctx.is_demo:
        summary["demo_test_score"] = _demo_test_score(ctx.data_dir, out_dir, comp)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    metric = f"F{cfg.beta:g} per image" if comp.task == "multilabel" else "accuracy"
    log.info("validation %s %.4f (label-prior baseline %.4f); %s of %s used; submission: %s",
             metric, summary.get("val_score") or float("nan"), summary.get("baseline", float("nan")),
             fmt_seconds(clock.elapsed()), fmt_seconds(clock.total_s), (out_dir / "submission.csv").resolve())
    if ctx.is_demo and summary.get("demo_test_score") is not None:
        log.info("demo test F2 against the generated answers: %.4f", summary["demo_test_score"])
    return status
