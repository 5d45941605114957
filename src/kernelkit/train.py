"""The training loop under a wall-clock budget."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .budget import BudgetClock, InferenceReserve, Progress, fmt_seconds, lr_factor
from .checkpoint import rng_state, save_checkpoint
from .decode import decode_multilabel
from .distributed import SINGLE, DistInfo, agree, all_finite, unwrap
from .models import set_trainable
from .infer import OutOfMemory, autocast, predict
from .metrics import accuracy, fbeta_per_image
from .thresholds import search_global
from .progress import progress
from .transforms import normalize

log = logging.getLogger("kernelkit")


@dataclass
class FitOptions:
    lr: float = 1e-3
    warmup: float = 0.05
    schedule: str = "linear"
    epochs: int = 0  # 0: train until the time budget (minus the inference reserve) is spent
    amp: bool = True
    channels_last: bool = False
    checkpoint_every_s: float = 1200.0
    threshold: float = -1.0  # multi-label: <0 searches on validation
    min_labels: int = 0
    max_labels: int = 0
    beta: float = 2.0
    clip_grad: float = 0.0  # max gradient norm; 0 = off
    freeze_until: float = 0.0  # progress until which only the head trains (1.0: linear probe)
    unfreeze_blocks: int = 0  # then train the last N backbone blocks (0: all)
    batch_aug: Callable | None = None  # (x uint8 on device, y, ok) -> (x float 0-255, y, ok), e.g. BatchAugment


@dataclass
class FitState:
    epoch: int = 0
    step: int = 0
    progress: float = 0.0
    best_score: float = -math.inf
    threshold: float = 0.5
    nonfinite_steps: int = 0
    bad_images: int = 0
    failed_saves: int = 0
    micro_batches: int = 1  # doubled after each out-of-memory error; gradients accumulate over them


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def train_one_epoch(model: torch.nn.Module, loader, optimizer: torch.optim.Optimizer, scaler, loss_fn: Callable,
                    device: torch.device, state: FitState, opts: FitOptions,
                    control: Callable[[int], tuple[bool, float]], on_step: Callable[[], None] | None = None,
                    dist: DistInfo = SINGLE) -> dict:
    """One pass over `loader`, or until control(step) says stop; control also gives each step's LR."""
    model.train()
    losses, images, skipped = [], 0, 0
    t0 = time.time()
    t_first, first_n = None, 0
    bar = progress(loader, desc=f"epoch {state.epoch}")
    stopped = False
    for x, y, ok in bar:
        stop, lr = control(state.step)
        if stop:
            stopped = True
            break
        set_lr(optimizer, lr)
        x, y, ok = (t.to(device, non_blocking=True) for t in (x, y, ok))
        if opts.batch_aug is not None:
            x, y, ok = opts.batch_aug(x, y, ok)
        x = normalize(x, opts.channels_last)
        loss = forward_backward_fitting_memory(model, x, y, ok, loss_fn, optimizer, scaler, device, state, opts, dist)
        if loss is None:
            # One NaN batch must not poison the weights of a 9-hour run: skip the update (on every
            # rank together, or the gradient all-reduce would wait forever).
            optimizer.zero_grad(set_to_none=True)
            state.nonfinite_steps += 1
            log.warning("non-finite loss at step %d; update skipped (%d so far)", state.step, state.nonfinite_steps)
            state.step += 1
            continue
        if opts.clip_grad > 0:
            scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
            torch.nn.utils.clip_grad_norm_(model.parameters(), opts.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        state.step += 1
        skipped += int((ok == 0).sum())
        images += len(ok)
        losses.append(loss.item())
        if t_first is None:
            t_first, first_n = time.time(), images
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                        p=f"{state.progress:.2f}", refresh=False)
        if on_step is not None:
            on_step()
    bar.close()
    t_end = time.time()
    state.bad_images += skipped
    # Throughput after the first step, which carries worker start-up and lazy initialisation.
    steady = (images - first_n, t_end - t_first) if t_first and images > first_n else (images, t_end - t0)
    return {"loss": float(np.mean(losses)) if losses else float("nan"), "images": images,
            "seconds": t_end - t0, "images_per_s": steady[0] / max(steady[1], 1e-9), "skipped": skipped,
            "stopped": stopped, "lr": optimizer.param_groups[0]["lr"]}


def forward_backward_fitting_memory(model, x, y, ok, loss_fn, optimizer, scaler, device, state: FitState,
                                    opts: FitOptions, dist: DistInfo = SINGLE) -> torch.Tensor | None:
    """Gradients of the batch loss, in `state.micro_batches` pieces; None when the loss is not finite.

    Out of memory: free what we can, split the batch in twice as many pieces and retry it. The
    pieces are weighted by their share of valid images, so the gradient equals the full batch's and
    the effective batch size (hence the LR that suits it) does not change.
    """
    while True:
        optimizer.zero_grad(set_to_none=True)
        try:
            return _accumulate(model, x, y, ok, loss_fn, scaler, device, state.micro_batches, opts, dist)
        except OutOfMemory:
            if dist.enabled or state.micro_batches >= len(x):
                raise  # ranks would disagree on the number of backward passes
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            state.micro_batches *= 2
            log.warning("out of memory at batch size %d: continuing with %d micro-batches of ~%d "
                        "(gradient accumulation keeps the effective batch)", len(x), state.micro_batches,
                        -(-len(x) // state.micro_batches))


def _accumulate(model, x, y, ok, loss_fn, scaler, device, pieces: int, opts: FitOptions,
                dist: DistInfo) -> torch.Tensor | None:
    total_weight = ok.sum().clamp_min(1.0)
    batch_loss = torch.zeros((), device=device)
    for xs, ys, oks in zip(x.chunk(pieces), y.chunk(pieces), ok.chunk(pieces)):
        with autocast(device, opts.amp):
            logits = model(xs)
        loss = loss_fn(logits, ys, oks) * (oks.sum().clamp_min(1.0) / total_weight if pieces > 1 else 1.0)
        if not all_finite(dist, loss):
            return None
        scaler.scale(loss).backward()
        batch_loss += loss.detach()
    return batch_loss


def score_predictions(task: str, targets: np.ndarray, probs: np.ndarray, opts: FitOptions) -> dict:
    """Competition metric on validation; multi-label also picks the threshold."""
    if task == "multilabel":
        if opts.threshold >= 0:
            t = opts.threshold
            s = fbeta_per_image(targets, decode_multilabel(probs, t, opts.min_labels, opts.max_labels), opts.beta)
        else:
            rule, s = search_global(targets, probs, opts.beta, min_labels=opts.min_labels, max_labels=opts.max_labels)
            t = rule.values[0]
        return {"score": s, "threshold": t, "metric": f"F{opts.beta:g} per image"}
    acc = accuracy(targets, probs)
    return {"score": acc, "threshold": 0.5, "metric": "accuracy", "top1_error": 1 - acc}


def validate(model: torch.nn.Module, loader, targets: np.ndarray, device: torch.device, task: str,
             opts: FitOptions) -> dict:
    out = predict(model, loader, device, task, amp=opts.amp, channels_last=opts.channels_last, desc="validate")
    return {**out, **score_predictions(task, targets, out["probs"], opts)}


def _timing(tr: dict, state: FitState, clock: BudgetClock, reserve: InferenceReserve) -> str:
    """Schedule position, speed, elapsed/budget and when training will end."""
    train_left = clock.total_s - clock.margin_s - reserve.seconds() - clock.elapsed()
    return (f"p={state.progress:.2f}  {tr['images_per_s']:.0f} img/s  [{clock.fmt()}, training ends in "
            f"{fmt_seconds(train_left)}, then ~{fmt_seconds(reserve.seconds())} inference]")


def _write_history(history: list[dict], out_dir: Path) -> None:
    import pandas as pd
    pd.DataFrame(history).to_csv(out_dir / "history.csv", index=False)


def fit(model: torch.nn.Module, train_loader, val_loader, val_targets: np.ndarray, *, task: str,
        loss_fn: Callable, optimizer: torch.optim.Optimizer, scaler, device: torch.device,
        clock: BudgetClock, reserve: InferenceReserve, opts: FitOptions, out_dir: Path,
        state: FitState | None = None, extra: dict[str, Any] | None = None, dist: DistInfo = SINGLE,
        ema=None) -> dict:
    """Train until the budget (or `opts.epochs`) is used; keep last.pt and best.pt in `out_dir`.

    `extra` (config dict, classes, task) is stored in every checkpoint so inference can rebuild
    the model from the checkpoint alone. Under DDP (`dist`), rank 0's clock rules and only rank 0
    validates and writes. With `ema` (timm ModelEma), the average is updated every step, validated
    and saved as "ema" beside "model".
    """
    state = state or FitState()
    extra = dict(extra or {})
    core = unwrap(model)
    total_steps = opts.epochs * len(train_loader) if opts.epochs else 0
    prog = Progress(clock, state.progress, total_steps)
    history: list[dict] = []
    last_save = [time.time()]
    has_val = dist.is_main and val_loader is not None and len(val_targets) > 0

    def deadline() -> float:
        return clock.total_s - clock.margin_s - reserve.seconds()

    def time_is_up() -> bool:
        if total_steps and state.step >= total_steps:
            return True
        return clock.elapsed() >= deadline()

    frozen = [False]

    def follow_freeze_schedule() -> None:
        want = state.progress < opts.freeze_until
        if want != frozen[0]:
            blocks = 0 if want else (opts.unfreeze_blocks or None)
            n = set_trainable(core, blocks)
            log.info("%s: %d trainable parameters", "backbone frozen" if want else
                     f"unfreezing {'all' if blocks is None else f'the last {blocks}'} backbone blocks", n)
            frozen[0] = want

    def control(step: int) -> tuple[bool, float]:
        stop, state.progress = agree(dist, time_is_up(), prog.at(deadline(), step))
        if opts.freeze_until > 0:
            follow_freeze_schedule()
        return stop, opts.lr * lr_factor(state.progress, opts.warmup, opts.schedule)

    def checkpoint(name: str, epoch_done: bool) -> None:
        try:
            _save(name, epoch_done)
        except OSError as e:
            # Disk full or unwritable: the previous file is intact (atomic save); keep training.
            state.failed_saves += 1
            log.error("could not save %s (%s); the previous %s stays usable, training continues", name, e, name)

    def _save(name: str, epoch_done: bool) -> None:
        save_checkpoint({
            "model": core.state_dict(), **({"ema": ema.module.state_dict()} if ema is not None else {}),
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "epoch": state.epoch + int(epoch_done), "step": state.step, "progress": state.progress,
            "best_score": state.best_score, "threshold": state.threshold,
            "elapsed": clock.elapsed(), "run_start": clock.start_time, "rng": rng_state(), **extra,
        }, out_dir / name)

    def on_step() -> None:
        if ema is not None:
            ema.update(core)
        if dist.is_main and time.time() - last_save[0] >= opts.checkpoint_every_s:
            checkpoint("last.pt", epoch_done=False)
            last_save[0] = time.time()

    stop_reason = "budget"
    while True:
        if opts.epochs and state.epoch >= opts.epochs:
            stop_reason = "epochs"
            break
        if agree(dist, time_is_up(), state.progress)[0]:
            break
        if hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(state.epoch)  # a new shuffle per epoch under DistributedSampler
        tr = train_one_epoch(model, train_loader, optimizer, scaler, loss_fn, device, state, opts, control,
                             on_step, dist)
        if tr["images"]:
            reserve.train_ips = tr["images_per_s"]
        if dist.is_main:
            history.append(_end_of_epoch(core if ema is None else ema.module, tr, val_loader, val_targets, has_val, task, device, opts, state,
                                         clock, reserve, checkpoint, out_dir))
            _write_history(history, out_dir)
            checkpoint("last.pt", epoch_done=not tr["stopped"])
            last_save[0] = time.time()
        if tr["stopped"] or not tr["images"]:
            break
        state.epoch += 1
    if dist.is_main and val_loader is None:
        checkpoint("best.pt", epoch_done=True)
    return {"state": state, "history": history, "stop_reason": stop_reason}


def _end_of_epoch(model: torch.nn.Module, tr: dict, val_loader, val_targets: np.ndarray, has_val: bool, task: str,
                  device: torch.device, opts: FitOptions, state: FitState, clock: BudgetClock,
                  reserve: InferenceReserve, checkpoint: Callable[[str, bool], None], out_dir: Path) -> dict:
    """Validate, keep best.pt and its validation probabilities (for threshold rules and blending),
    log; -> the epoch's history row."""
    row = {"epoch": state.epoch, "train_loss": tr["loss"], "train_images": tr["images"],
           "train_s": round(tr["seconds"], 2), "lr_end": tr["lr"], "progress": round(state.progress, 4),
           "elapsed_s": round(clock.elapsed(), 1)}
    if not (has_val and tr["images"]):
        log.info("epoch %d  loss %.4f  %s", state.epoch, tr["loss"], _timing(tr, state, clock, reserve))
        return row
    va = validate(model, val_loader, val_targets, device, task, opts)
    reserve.infer_ips = va["images_per_s"]
    reserve.observe_startup(va["first_batch_s"])
    row.update(val_score=va["score"], threshold=va["threshold"], val_s=round(va["seconds"], 2))
    if va["score"] > state.best_score:
        state.best_score, state.threshold = va["score"], va["threshold"]
        checkpoint("best.pt", not tr["stopped"])
        np.save(out_dir / "val_probs.npy", va["probs"].astype(np.float32))
    log.info("epoch %d  loss %.4f  val %s %.4f (best %.4f)  thr %.2f  %s", state.epoch, tr["loss"],
             va["metric"], va["score"], state.best_score, va["threshold"], _timing(tr, state, clock, reserve))
    return row
