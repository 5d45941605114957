"""The training loop under a wall-clock budget.

One `Trainer` holds everything a step changes (model, optimizer, scaler, EMA, the progress in
`FitState`); `fit` returns its result in memory (`FitResult`: history, the best epoch's
validation probabilities, the state). Checkpoints go through a `checkpoint.Checkpointer`, which
owns the file names; what goes in them is `TrainState`'s; the loop only says when.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import numpy as np
import torch

from ..core.accel import StepGuard
from ..core.clock import now as clock_now
from ..core.distributed import SINGLE, DistInfo, agree, main_done, sum_over_ranks, unwrap
from ..core.progress import progress
from ..core.stopping import StopFlag
from ..data.loaders import DeviceFeeder, loader_tiles, set_epoch
from ..data.transforms import IMAGENET, Preprocess, fold_tiles, normalize, pool_tiles
from ..decide.rules import keeps_up, score_validation
from ..model.factory import hold_frozen_norms, merge_bucket_norms, set_trainable
from .budget import BudgetClock, InferenceReserve, Progress, fmt_seconds, lr_factor
from .checkpoint import BEST, LAST, Checkpointer, rng_state, set_rng_state
from .evaluate import OutOfMemory, autocast, predict
from .learning_check import CHECK_AT, at_prior, stuck_message
from .resolution import ResolutionSchedule, fixed_input_size, resize_batch
from .swa import conclude_average

log = logging.getLogger("kernelkit")

LOG_EVERY = 25  # steps between progress-bar loss updates (each one waits for the GPU)


@dataclass
class FitOptions:
    lr: float = 1e-3
    warmup: float = 0.05
    schedule: str = "linear"
    epochs: int = 0  # 0: train until the time budget (minus the inference reserve) is spent
    amp: bool = True
    amp_dtype: torch.dtype = torch.float16  # accel.amp_dtype: bf16 on Ampere and later
    channels_last: bool = False
    checkpoint_every_s: float = 1200.0
    threshold: float = -1.0  # multi-label: <0 searches on validation
    min_labels: int = 0
    max_labels: int = 0
    beta: float = 2.0
    clip_grad: float = 0.0  # max gradient norm; 0 = off
    freeze_until: float = 0.0  # progress until which only the head trains (1.0: linear probe)
    unfreeze_blocks: int = 0  # then train the last N backbone blocks (0: all)
    preprocess: Preprocess = IMAGENET  # the input statistics the weights expect
    learn_check_at: float = CHECK_AT  # share of training after which a score at the label prior is flagged
    learn_hint: str = ""  # likely causes, named in that warning
    resolution: ResolutionSchedule | None = None  # progressive resizing over the clock; None: always full size


@dataclass
class TrainParts:
    """What a step updates. batch_aug: (x uint8 on device, y, ok) -> (x float 0-255, y, ok)."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Any
    loss_fn: Callable
    ema: Any = None
    batch_aug: Callable | None = None
    swa: Any = None  # swa.WeightAverage: running average of the weights over the end of the schedule
    step_model: Any = None  # the torch.compile'd model the training steps run (accel); None: `model`
    compiled: Any = None  # accel.Compiled: how the compile went (seconds, error), for the summary


@dataclass
class FitState:
    """Where training is; saved in every checkpoint, restored on resume."""
    epoch: int = 0
    step: int = 0
    progress: float = 0.0
    best_score: float = -math.inf  # validation score of best.pt
    peak_score: float = -math.inf  # highest validation score at best_px; best.pt: the latest epoch within noise of it
    threshold: float = 0.5
    best_px: int = 0  # input size best_score was validated at (progressive resizing: only equals compare)
    nonfinite_steps: int = 0
    bad_images: int = 0
    micro_batches: int = 1  # doubled after each out-of-memory error; gradients accumulate over them
    session: int = 1  # which Kaggle session of a schedule split over several (resume.py)
    session_end: float = 1.0  # progress at which this session's slice of the schedule ends


@dataclass
class TrainState:
    """The checkpoint format of a training run, owned in one place: what `state_dict` writes is what
    `load_state_dict` reads back (weights, EMA, weight average, optimizer, scaler, RNG, and where the
    schedule is). File names, atomic background writes, the format version and its migration are
    `checkpoint`'s; the session slice a restore starts is `resume`'s."""
    parts: TrainParts
    fit: FitState
    clock: BudgetClock | None = None  # saving only: the time spent so far goes into the file

    def state_dict(self, epoch_done: bool, weights: dict | None = None, average: bool = True) -> dict[str, Any]:
        """`weights`: saved instead of the model's (and of the EMA, which would otherwise predict);
        `average`: with the running weight average, which only a resume needs (last.pt)."""
        parts, state, clock = self.parts, self.fit, self.clock
        ema = {"ema": parts.ema.module.state_dict()} if parts.ema is not None and weights is None else {}
        swa = {"swa": parts.swa.state_dict()} if parts.swa is not None and average else {}
        return {
            "model": weights or unwrap(parts.model).state_dict(), **ema, **swa,
            "optimizer": parts.optimizer.state_dict(), "scaler": parts.scaler.state_dict(),
            "epoch": state.epoch + int(epoch_done), "step": state.step, "progress": state.progress,
            "best_score": state.best_score, "peak_score": state.peak_score, "threshold": state.threshold,
            "best_px": state.best_px,
            "session": state.session, "session_end": state.session_end,
            "elapsed": clock.elapsed() if clock else 0.0, "run_start": clock.start_time if clock else 0.0,
            "rng": rng_state(),
        }

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        parts, state = self.parts, self.fit
        unwrap(parts.model).load_state_dict(ckpt["model"])
        if parts.ema is not None and "ema" in ckpt:
            parts.ema.module.load_state_dict(ckpt["ema"])
            parts.ema.updates = int(ckpt["step"])  # the decay goes on where it was, not warming up again
        if parts.swa is not None and "swa" in ckpt:
            parts.swa.load_state_dict(ckpt["swa"])
        # The implementation flags stay this machine's: a fused (GPU) optimizer's state resumes on a
        # CPU, and a CPU one's on a GPU, each with the kernel it can run.
        flags = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in parts.optimizer.param_groups]
        try:
            parts.optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as e:  # other parameter groups, e.g. a checkpoint from before frozen_stages
            log.warning("optimizer state not restored (%s): the weights and the schedule resume, AdamW's "
                        "moments start afresh", e)
        for group, own in zip(parts.optimizer.param_groups, flags):
            group.update(own)
        if ckpt.get("scaler") and parts.scaler.is_enabled():
            parts.scaler.load_state_dict(ckpt["scaler"])
        # else: bf16 <-> fp16 across sessions on different GPUs (an H100, then a T4): the loss scale
        # starts afresh, which GradScaler finds within a few steps.
        set_rng_state(ckpt["rng"])
        state.epoch, state.step, state.progress = int(ckpt["epoch"]), int(ckpt["step"]), float(ckpt["progress"])
        state.best_score, state.threshold = ckpt["best_score"], ckpt["threshold"]
        state.peak_score = float(ckpt.get("peak_score", state.best_score))  # absent before the noise rule
        state.best_px = int(ckpt.get("best_px", 0))  # absent in checkpoints from before progressive validation
        state.session, state.session_end = int(ckpt.get("session", 1)), float(ckpt.get("session_end", 1.0))


@dataclass
class Validation:
    loader: Any
    targets: np.ndarray
    task: str
    prior: float | None = None  # score of the best constant prediction: the bar learning must clear


@dataclass
class FitResult:
    state: FitState
    history: list[dict] = field(default_factory=list)
    stop_reason: str = "budget"  # budget | epochs | signal | finished
    best_val_probs: np.ndarray | None = None
    average: dict | None = None  # the weight average's verdict (swa): snapshots, its score, whether it predicts
    warnings: list[str] = field(default_factory=list)  # loud but not failures (the model is not learning)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


class Trainer:
    """Trains `parts` until the budget (minus the measured inference reserve), `opts.epochs`, or a
    stop request. Under DDP (`dist`) rank 0's clock rules and only rank 0 validates and saves."""

    def __init__(self, parts: TrainParts, opts: FitOptions, clock: BudgetClock, reserve: InferenceReserve,
                 device: torch.device, saver: Checkpointer | None = None, dist: DistInfo = SINGLE,
                 stop: StopFlag | None = None, state: FitState | None = None):
        self.parts, self.opts, self.clock, self.reserve = parts, opts, clock, reserve
        self.device, self.saver, self.dist, self.stop = device, saver, dist, stop
        self.state = state or FitState()
        self.core = unwrap(parts.model)
        # The steps run the compiled model when there is one; validation, EMA and checkpoints use
        # the plain module (same weights), so no eval-mode recompile and no '_orig_mod.' keys.
        self.step_model = parts.step_model if parts.step_model is not None else parts.model
        self.total_steps = self.stop_step = 0
        self.schedule = Progress(clock, self.state.progress, end=self.state.session_end)
        self.step_s = 0.0  # smoothed wall time of one step, so the last one does not overrun
        self.frozen = False
        self.last_save = clock_now()
        self.stop_reason = "budget"
        self.learning_checked = False
        self.learning_peak = -math.inf  # the highest validation score at any size: what the learning check reads
        self.train_px = 0  # the input size of the last training step (progressive resizing)
        self.tiles = 1  # squares per image in the current batch (input_mode tiles: the model's max over them)
        self.result = FitResult(self.state)  # filled as training goes: survives a failure mid-way
        self.guard = StepGuard(parts.scaler)
        self.epoch_skipped = 0  # skipped steps of this epoch already counted in state.nonfinite_steps
        if opts.resolution is not None and fixed_input_size(self.core):
            # On by default, so a ViT's run is not flagged for what its user did not ask for: a log line.
            log.warning("progressive resizing off: this model takes only img_size inputs (a patch embedding with "
                        "a fixed size); training runs at img_size throughout")
            self.opts = dataclasses.replace(opts, resolution=None)

    # ------------------------------------------------------------------ schedule and stopping
    def deadline(self) -> float:
        return self.clock.total_s - self.clock.margin_s - self.reserve.seconds()

    def time_is_up(self) -> bool:
        if self.stop is not None and self.stop.requested:
            self.stop_reason = "signal"
            return True
        if self.stop_step and self.state.step >= self.stop_step:
            self.stop_reason = "epochs"
            return True
        return self.clock.elapsed() + self.step_s >= self.deadline()

    def control(self) -> tuple[bool, float]:
        """-> (stop now?, this step's LR); every rank adopts rank 0's answer."""
        stop, self.state.progress = agree(self.dist, self.time_is_up(),
                                          self.schedule.at(self.deadline(), self.state.step))
        if self.opts.freeze_until > 0:
            self.follow_freeze_schedule()
        return stop, self.opts.lr * lr_factor(self.state.progress, self.opts.warmup, self.opts.schedule)

    def follow_freeze_schedule(self) -> None:
        want = self.state.progress < self.opts.freeze_until
        if want != self.frozen:
            blocks = 0 if want else (self.opts.unfreeze_blocks or None)
            n = set_trainable(self.core, blocks)
            log.info("%s: %d trainable parameters", "backbone frozen" if want else
                     f"unfreezing {'all' if blocks is None else f'the last {blocks}'} backbone blocks", n)
            self.frozen = want

    def follow_resolution(self) -> int:
        """This step's input size; each stage change is logged once (the plan on the first step)."""
        px = self.opts.resolution.size_at(self.state.progress)
        if px != self.train_px:
            if not self.train_px:
                log.info("resolution: %s (p=%.2f now)", self.opts.resolution.describe(), self.state.progress)
            else:
                log.info("resolution -> %d px at p=%.2f", px, self.state.progress)
            self.train_px = px
        return px

    # ------------------------------------------------------------------ the loop
    def fit(self, train_loader, val: Validation | None) -> FitResult:
        """Epochs until told to stop; validate and checkpoint at each epoch end."""
        opts, state = self.opts, self.state
        self.total_steps = opts.epochs * len(train_loader) if opts.epochs else 0
        # Fixed epochs split over sessions: this session ends at the epoch its slice ends at.
        stop_epoch = round(state.session_end * opts.epochs)
        self.stop_step = stop_epoch * len(train_loader)
        self.schedule = Progress(self.clock, state.progress, self.total_steps, state.session_end)
        if self.parts.swa is not None:
            self.reserve.extra_images, self.reserve.extra_loaders = self.parts.swa.extra_images(train_loader,
                                                                                                self.reserve.n_val)
        result = self.result
        while not (opts.epochs and state.epoch >= stop_epoch) and not agree(self.dist, self.time_is_up(), 0.0)[0]:
            set_epoch(train_loader, state.epoch)
            tr = self.train_epoch(train_loader)
            if self.dist.enabled:  # every rank ends the epoch at the same step: the collective meets
                merge_bucket_norms(self.core, (self.parts.ema.module,) if self.parts.ema is not None else (),
                                   partial(sum_over_ranks, self.dist))
            if tr["images"]:
                self.reserve.train_ips = tr["images_per_s"]
            if self.dist.is_main:
                result.history.append(self.end_of_epoch(tr, val, result))
                self.save(LAST, epoch_done=not tr["stopped"])
            # rank 0 validated alone: the others wait on a store key, with no collective timeout to outlast
            main_done(self.dist, self.clock.start_time + self.clock.total_s)
            if tr["stopped"] or not tr["images"]:
                break
            state.epoch += 1
        result.stop_reason = "epochs" if opts.epochs and state.epoch >= stop_epoch else self.stop_reason
        if self.dist.is_main and (val is None or not len(val.targets)):
            self.save(BEST, epoch_done=True)  # nothing to select on: the last weights are the best
        if self.dist.is_main and self.parts.swa is not None:
            self.use_average(train_loader, val, result)
        return result

    def use_average(self, train_loader, val: Validation | None, result: FitResult) -> None:
        """The weight average becomes best.pt (what the submission predicts with) when it validates at
        least as well as the last and the best weights; both scores are logged either way."""
        last = result.history[-1].get("val_score") if result.history else None
        if self.stop is not None and self.stop.requested:
            log.info("weight average skipped: the grace after the stop request is for the prediction")
            return
        won = conclude_average(self.parts.swa, train_loader, val, self.device, self.opts, self.state.best_score, last)
        if won is None:
            return
        best = self.state.best_score if math.isfinite(self.state.best_score) else None
        result.average = {"snapshots": self.parts.swa.n, "score": won["score"], "last_score": last,
                          "best_score": best, "predicts": won["use"]}
        if not won["use"]:
            return
        if won["probs"] is not None:
            self.state.best_score, self.state.threshold = won["score"], won["threshold"]
            result.best_val_probs = won["probs"]
        self.save(BEST, epoch_done=True, weights=self.parts.swa.module.state_dict())

    def train_epoch(self, loader, max_steps: int = 0) -> dict:
        """One pass over `loader` (or `max_steps` steps): LR, step, clip, log, checkpoint."""
        parts, opts, state = self.parts, self.opts, self.state
        parts.model.train()
        hold_frozen_norms(parts.model)
        images, stopped, n_losses = 0, False, 0
        self.epoch_skipped = 0
        # Loss, unreadable images and skipped (non-finite) steps are summed on the device and read at the
        # end (and for the bar every LOG_EVERY steps): reading them per step would make the CPU wait for
        # the GPU at every step end, leaving the GPU idle while the next step is prepared.
        loss_sum, unreadable, skipped, good = (torch.zeros((), device=self.device) for _ in range(4))
        recent: deque = deque(maxlen=50)
        t0 = t_prev = clock_now()
        t_first, first_n = None, 0
        bar = progress(DeviceFeeder(loader, self.device), desc=f"epoch {state.epoch}")
        tiles = loader_tiles(loader)
        for x, y, ok in bar:
            stop, lr = self.control()
            if stop or (max_steps and state.step >= max_steps):
                stopped = True
                break
            set_lr(parts.optimizer, lr)
            x, self.tiles = fold_tiles(x, tiles)  # before the batch augmentation: a crop must not straddle two tiles
            if parts.batch_aug is not None:
                x, y, ok = parts.batch_aug(x, y, ok)
            if opts.resolution is not None:
                x = resize_batch(x, self.follow_resolution())
            loss = self.forward_backward(normalize(x, opts.channels_last, opts.preprocess), y, ok)
            bad = self.update(loss)
            loss = torch.where(bad > 0, torch.nan, loss)  # a skipped step's loss is not averaged
            skipped += bad
            good += 1 - bad
            unreadable += (ok == 0).sum()
            images += len(ok)
            loss_sum += loss.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
            recent.append(loss)
            n_losses += 1
            now = clock_now()
            self.step_s = now - t_prev if t_first is None else 0.8 * self.step_s + 0.2 * (now - t_prev)
            t_prev = now
            if t_first is None:
                t_first, first_n = now, images
            if n_losses % LOG_EVERY == 1:  # the loop's only host read: the bar's loss and the skip count
                mean, n_skipped = torch.stack((torch.stack(tuple(recent)).nanmean(), skipped)).tolist()
                self.note_skipped(int(n_skipped))
                bar.set_postfix(loss=f"{mean:.4f}", lr=f"{parts.optimizer.param_groups[0]['lr']:.2e}",
                                p=f"{state.progress:.2f}", refresh=False)
            if self.dist.is_main and now - self.last_save >= opts.checkpoint_every_s:
                self.save(LAST, epoch_done=False)
        bar.close()
        loss_total, n_good, n_unreadable, n_skipped = torch.stack((loss_sum, good, unreadable, skipped)).tolist()
        self.note_skipped(int(n_skipped))
        state.bad_images += int(n_unreadable)
        t_end = clock_now()
        # Throughput after the first step, which carries worker start-up and lazy initialisation.
        steady = (images - first_n, t_end - t_first) if t_first and images > first_n else (images, t_end - t0)
        return {"loss": loss_total / n_good if n_good else float("nan"), "images": images,
                "seconds": t_end - t0, "images_per_s": steady[0] / max(steady[1], 1e-9), "skipped": int(n_unreadable),
                "stopped": stopped, "lr": parts.optimizer.param_groups[0]["lr"]}

    def update(self, loss: torch.Tensor) -> torch.Tensor:
        """Clip, step, then the weight averages. One NaN batch must not poison the weights of a
        9-hour run: a step with non-finite gradients is skipped on the device (the fp16 scaler, or
        StepGuard for bf16/fp32), the same on every rank (the gradients are all-reduced first).
        -> 0-d float on the device: 1 when this step was skipped (fp16: when its loss was not finite)."""
        parts, state = self.parts, self.state
        if self.opts.clip_grad > 0:
            parts.scaler.unscale_(parts.optimizer)  # clip the true gradients, not the loss-scaled ones
            torch.nn.utils.clip_grad_norm_(parts.model.parameters(), self.opts.clip_grad)
        found = self.guard.step(parts.optimizer)
        if parts.ema is not None:
            parts.ema.update(self.core)
        if parts.swa is not None:
            parts.swa.update(self.core, state.progress)
        state.step += 1
        bad = (~torch.isfinite(loss)).float()
        return bad if found is None else torch.maximum(bad, found.to(bad.device).clamp(max=1.0))

    def note_skipped(self, epoch_total: int) -> None:
        """`epoch_total`: steps skipped so far this epoch (read with the loss); new ones are logged."""
        new = epoch_total - self.epoch_skipped
        if new > 0:
            self.epoch_skipped = epoch_total
            self.state.nonfinite_steps += new
            log.warning("non-finite loss or gradients in %d step(s) up to step %d; updates skipped (%d so far)",
                        new, self.state.step, self.state.nonfinite_steps)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        """Gradients of the batch loss, in `state.micro_batches` pieces; -> the loss (not read here).

        Out of memory: free what we can, split the batch in twice as many pieces and retry it. The
        pieces are weighted by their share of valid images, so the gradient equals the full batch's
        and the effective batch size (hence the LR that suits it) does not change.
        """
        state = self.state
        while True:
            self.parts.optimizer.zero_grad(set_to_none=True)
            try:
                return self._accumulate(x, y, ok, state.micro_batches)
            except OutOfMemory:
                if self.dist.enabled or state.micro_batches >= len(ok):
                    raise  # ranks would disagree on the number of backward passes
                self.parts.optimizer.zero_grad(set_to_none=True)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                state.micro_batches *= 2
                log.warning("out of memory at batch size %d: continuing with %d micro-batches of ~%d "
                            "(gradient accumulation keeps the effective batch)", len(ok), state.micro_batches,
                            -(-len(ok) // state.micro_batches))

    def _accumulate(self, x: torch.Tensor, y: torch.Tensor, ok: torch.Tensor, pieces: int) -> torch.Tensor:
        total_weight = ok.sum().clamp_min(1.0)
        batch_loss = torch.zeros((), device=self.device)
        per = -(-len(ok) // pieces)  # images per piece; an image's tiles stay in its piece
        for xs, ys, oks in zip(x.split(per * self.tiles), y.split(per), ok.split(per)):
            with autocast(self.device, self.opts.amp, self.opts.amp_dtype):
                logits = pool_tiles(self.step_model(xs), self.tiles)
            loss = self.parts.loss_fn(logits, ys, oks) * (oks.sum().clamp_min(1.0) / total_weight if pieces > 1 else 1.0)
            self.parts.scaler.scale(loss).backward()
            batch_loss += loss.detach()
        return batch_loss

    # ------------------------------------------------------------------ validation and checkpoints
    def end_of_epoch(self, tr: dict, val: Validation | None, result: FitResult) -> dict:
        """Validate, keep best.pt and its validation probabilities; -> the epoch's history row."""
        state, opts = self.state, self.opts
        row = {"epoch": state.epoch, "train_loss": tr["loss"], "train_images": tr["images"],
               "train_s": round(tr["seconds"], 2), "lr_end": tr["lr"], "progress": round(state.progress, 4),
               "elapsed_s": round(self.clock.elapsed(), 1)}
        if self.opts.resolution is not None:
            row["train_px"] = self.train_px  # the size at the epoch's end (stage changes are logged)
        if val is None or not len(val.targets) or not tr["images"] or self.stop_reason == "signal":
            # After SIGTERM the grace is for the test prediction, not for a validation pass.
            log.info("epoch %d  loss %.4f  %s", state.epoch, tr["loss"], self.timing(tr))
            return row
        model = self.core if self.parts.ema is None else self.parts.ema.module
        small, px = self.validation_size()
        out = predict(model, val.loader, self.device, val.task, amp=opts.amp, channels_last=opts.channels_last,
                      desc="validate", pre=opts.preprocess, amp_dtype=opts.amp_dtype, size=small)
        va = score_validation(val.task, val.targets, out["probs"], opts.threshold, opts.beta, opts.min_labels,
                              opts.max_labels)
        if not small:  # the reserve plans the final, full-size validation
            self.reserve.val_ips = out["images_per_s"]
        self.reserve.observe_startup(out["startup_s"])
        row.update(val_score=va["score"], threshold=va["threshold"], val_s=round(out["seconds"], 2))
        if small:
            row["val_px"] = small
        self.learning_peak = max(self.learning_peak, va["score"])
        if px > state.best_px:
            if math.isfinite(state.best_score):
                log.info("validation now at %d px: scores at %d px are not comparable, the best checkpoint "
                         "restarts here", px, state.best_px)
            state.best_score, state.peak_score, state.best_px = -math.inf, -math.inf, px
        kept = keeps_up(va["score"], state.peak_score, len(val.targets))
        state.peak_score = max(state.peak_score, va["score"])
        if kept:
            state.best_score, state.threshold = va["score"], va["threshold"]
            result.best_val_probs = out["probs"].astype(np.float32)
            self.save(BEST, epoch_done=not tr["stopped"])
        peak = f", peak {state.peak_score:.4f}" if state.peak_score > state.best_score else ""
        log.info("epoch %d  loss %.4f  val %s %.4f%s (best %.4f%s)  thr %.2f  %s", state.epoch, tr["loss"],
                 va["metric"], va["score"], f" at {small} px" if small else "", state.best_score, peak,
                 va["threshold"], self.timing(tr))
        self.check_learning(val.prior, va["metric"], result)
        return row

    def validation_size(self) -> tuple[int, int]:
        """-> (size to downscale validation images to, 0 = none; the size validated at, 0 = img_size
        without progressive resizing). During a smaller stage validation runs at the training size:
        at img_size a network trained at half of it scores near chance for a run that learns."""
        sched = self.opts.resolution
        if sched is None:
            return 0, 0
        small = self.train_px if 0 < self.train_px < sched.full else 0
        return small, small or sched.full

    def check_learning(self, prior: float | None, metric: str, result: FitResult) -> None:
        """Once, at the first validation past `learn_check_at` of training: is the highest score (at any
        size) still at the label prior? Then warn loudly (and keep training: the submission still comes)."""
        if self.learning_checked or prior is None or self.state.progress < self.opts.learn_check_at:
            return
        self.learning_checked = True
        if at_prior(self.learning_peak, prior):
            msg = stuck_message(self.learning_peak, prior, self.state.progress, metric, self.opts.learn_hint)
            log.warning("!!! %s", msg)
            result.warnings.append(msg)

    def timing(self, tr: dict) -> str:
        """Schedule position, speed, elapsed/budget and when training will end."""
        train_left = self.deadline() - self.clock.elapsed()
        return (f"p={self.state.progress:.2f}  {tr['images_per_s']:.0f} img/s  [{self.clock.fmt()}, training ends "
                f"in {fmt_seconds(train_left)}, then ~{fmt_seconds(self.reserve.seconds())} inference]")

    def save(self, name: str, epoch_done: bool, weights: dict | None = None) -> None:
        """A failed save (full disk, I/O error) is logged and counted by the checkpointer; training goes on.
        `weights`: saved instead of the model's (and of the EMA, which would otherwise predict)."""
        self.last_save = clock_now()
        if self.saver is None:
            return
        # One line per save, on the budget clock: the cadence can be read back from the log.
        log.info("saving %s at %s (p=%.4f)", name, fmt_seconds(self.clock.elapsed()), self.state.progress)
        payload = TrainState(self.parts, self.state, self.clock).state_dict(epoch_done, weights, average=name == LAST)
        self.saver.save(name, payload)  # returns once snapshotted; failures are counted by the checkpointer
