"""The train job: competition -> training -> a submission from the best checkpoint.

Before training, everything that can be checked is (the data, the sample submission, the resume
checkpoint, the time left after the measured inference reserve): a problem there is a refusal
(ConfigError, exit 2). Once training starts, whatever fails, a submission is still written from
the best weights available, and the failure is logged loudly and recorded in summary.json.
"""
from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import distributed
from .assemble import TrainingData, build_training_data, test_loader
from .budget import BudgetClock, InferenceReserve, fmt_seconds
from .checkpoint import BEST, LAST, Checkpointer, load_checkpoint, set_rng_state
from .competition import Competition
from .components import build_parts, fit_options, seed_everything
from .config import Config, ConfigError, budget_seconds, parse_duration
from .context import RunContext
from .decide import RuleSettings, refine_rule
from .distributed import DistInfo
from .fileio import write_npy
from .folds import save_oof
from .infer import predict
from .predictor import Predictor, load_predictor, plan_tta, predict_test, write_predictions
from .reports import plot_history, write_error_analysis
from .session import begin_run
from .thresholds import ThresholdRule, prior_baseline
from .train import FitResult, FitState, TrainParts, Trainer, Validation
from .transforms import tta_views

log = logging.getLogger("kernelkit")

PROBE_BATCHES = 3


@dataclass
class Outcome:
    """What the job reports: summary.json's content, and whether a valid submission exists."""
    summary: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    submitted: bool = False

    def problem(self, what: str) -> None:
        """Something failed after training started: loud in the log, recorded in the summary."""
        log.error("!!! %s\n%s", what, traceback.format_exc())
        self.problems.append(what)


def guarded(outcome: Outcome, what: str, fn: Callable, *args, **kwargs) -> Any:
    """Run a step that must not cost the submission; None when it fails."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        outcome.problem(f"{what} failed: {type(e).__name__}: {e}")
        return None


def resume_state(ctx: RunContext, path: Path | None, comp: Competition, parts: TrainParts,
                 explicit: bool) -> FitState:
    """The schedule position of the checkpoint we continue from; a finished schedule given as
    resume_from is refused now rather than re-trained at learning rate 0."""
    cfg = ctx.cfg
    if path is None:
        return FitState()
    ckpt = load_checkpoint(path)
    if ckpt.get("classes") != comp.classes or ckpt.get("config", {}).get("model") != cfg.model:
        if explicit:
            raise ConfigError(f"resume_from {path}: trained a different model or label set "
                              f"({ckpt.get('config', {}).get('model')!r}, {len(ckpt.get('classes', []))} classes)")
        log.warning("%s belongs to a different model or label set; starting fresh", path)
        return FitState()
    state = FitState(epoch=ckpt["epoch"], step=ckpt["step"], progress=ckpt["progress"],
                     best_score=ckpt["best_score"], threshold=ckpt["threshold"])
    finished = (state.epoch >= cfg.epochs) if cfg.epochs else state.progress >= 0.999
    if finished and explicit:
        raise ConfigError(
            f"resume_from {path}: its schedule already finished (epoch {state.epoch}, progress {state.progress:.3f}); "
            f"training on would run at learning rate 0. To predict with it use --mode infer --checkpoints {path}; "
            "to train more, start a new schedule (leave resume_from empty, or raise epochs)")
    parts.model.load_state_dict(ckpt["model"])
    if parts.ema is not None and "ema" in ckpt:
        parts.ema.module.load_state_dict(ckpt["ema"])
    parts.optimizer.load_state_dict(ckpt["optimizer"])
    parts.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    log.info("resumed from %s: epoch %d, step %d, progress %.2f", path, state.epoch, state.step, state.progress)
    return state


def measure_reserve(cfg: Config, comp: Competition, model: torch.nn.Module, device: torch.device,
                    reserve: InferenceReserve) -> None:
    """Before the first step: predict a few batches of real test images (real eval transform, real
    batch size, every TTA view), so the reserve is measured, not guessed, from the first epoch on."""
    n = min(len(comp.test_paths), PROBE_BATCHES * 2 * cfg.batch_size)
    if n == 0:
        return
    out = predict(model, test_loader(cfg, comp, device, limit=n), device, comp.task, tta_views(cfg.tta), cfg.amp,
                  cfg.channels_last, desc="inference probe")
    reserve.test_ips = out["images_per_s"]
    reserve.observe_startup(out["first_batch_s"])
    log.info("inference probe: %.1f image-views/s, loader start-up %.1fs -> reserve %s for %d test images x %d "
             "views + %d validation images", out["images_per_s"], out["first_batch_s"],
             fmt_seconds(reserve.seconds()), reserve.n_test, reserve.tta, reserve.n_val)


def refuse_without_training_time(clock: BudgetClock, reserve: InferenceReserve, cfg: Config) -> None:
    left = clock.total_s - clock.margin_s - reserve.seconds() - clock.elapsed()
    if left <= 0:
        raise ConfigError(
            f"budget={cfg.budget!r} leaves no time to train: {fmt_seconds(clock.elapsed())} already used by start-up, "
            f"inference needs ~{fmt_seconds(reserve.seconds())} (measured), margin {fmt_seconds(clock.margin_s)}. "
            "Raise budget, or lower tta / img_size")


def prepare(ctx: RunContext, comp: Competition, info: DistInfo) -> tuple:
    """Everything before the first step. Raises ConfigError for what the user must change."""
    cfg, out_dir = ctx.cfg, ctx.out_dir
    device = info.device()
    seed_everything(cfg.seed + info.rank, cfg.deterministic)
    run_start, resume_path = begin_run(out_dir, cfg.resume, ctx.t_start) if info.is_main else (0.0, None)
    run_start, resume_path = distributed.broadcast_object(info, (run_start, resume_path))
    explicit = resume_path is None and bool(cfg.resume_from)
    resume_path = resume_path or (Path(cfg.resume_from) if cfg.resume_from else None)
    clock = BudgetClock(*budget_seconds(cfg), start_time=run_start)
    data = build_training_data(cfg, comp, device, info, ctx.stop)
    parts = build_parts(cfg, comp.task, comp.num_classes, data.train_targets, device)
    if info.enabled and cfg.freeze > 0:
        raise ConfigError("freeze is not supported with data-parallel training yet; set ddp_procs=1")
    state = resume_state(ctx, resume_path, comp, parts, explicit)
    reserve = InferenceReserve(len(comp.test_ids), len(data.val_targets), cfg.tta)
    if info.is_main:
        measure_reserve(cfg, comp, parts.model, device, reserve)
        if resume_path is None and not ctx.stop.requested:
            refuse_without_training_time(clock, reserve, cfg)
    return device, clock, data, parts, state, reserve


def run_train(ctx: RunContext, comp: Competition, info: DistInfo) -> Outcome:
    cfg = ctx.cfg
    device, clock, data, parts, state, reserve = prepare(ctx, comp, info)
    saver = Checkpointer(ctx.out_dir, {"config": cfg.to_dict(), "classes": comp.classes, "task": comp.task,
                                       "seed": cfg.seed})
    outcome = Outcome({"train_images": len(data.train_targets), "val_images": len(data.val_targets),
                       "train_start_s": round(clock.elapsed(), 1), "seed": cfg.seed})
    ctx.phase = "training"
    model = distributed.wrap(parts.model, info)
    trainer = Trainer(TrainParts(model, parts.optimizer, parts.scaler, parts.loss_fn, parts.ema, parts.batch_aug),
                      fit_options(cfg), clock, reserve, device, saver if info.is_main else None, info, ctx.stop, state)
    val = Validation(data.val_loader, data.val_targets, comp.task) if data.val_loader is not None else None
    result = guarded(outcome, "training", trainer.fit, data.train_loader, val) or FitResult(trainer.state,
                                                                                           stop_reason="error")
    outcome.summary.update(stop_reason=result.stop_reason, epochs=len(result.history), steps=trainer.state.step,
                           bad_train_images=trainer.state.bad_images, nonfinite_steps=trainer.state.nonfinite_steps,
                           failed_saves=saver.failures, micro_batches=trainer.state.micro_batches,
                           train_end_s=round(clock.elapsed(), 1))
    if trainer.state.step == 0:
        log.warning("no training step was taken (%s); predicting with the initial weights", result.stop_reason)
    if info.is_main:
        ctx.phase = "predicting"
        finish(ctx, comp, data, result, saver, parts.model, clock, reserve, outcome, device)
    return outcome


def finish(ctx: RunContext, comp: Competition, data: TrainingData, result: FitResult, saver: Checkpointer,
           model: torch.nn.Module, clock: BudgetClock, reserve: InferenceReserve, outcome: Outcome,
           device: torch.device) -> None:
    """Rule, reports, prediction and submission; each step guarded, so a failing one costs only itself."""
    cfg, settings = ctx.cfg, RuleSettings.of(ctx.cfg)
    guarded(outcome, "writing history.csv", write_history, result.history, ctx.out_dir)
    rule = settings.global_rule(result.state.threshold)
    if comp.task == "multilabel":
        rule = guarded(outcome, "threshold rule search", refine_rule, settings, result.state.threshold,
                       comp.class_names, data.val_targets, result.best_val_probs) or rule
        if rule.kind != "global":  # stored so offline inference decodes the same way
            saver.update(BEST, threshold_rule=rule.to_dict())
    outcome.summary["threshold_rule"] = rule.to_dict() if comp.task == "multilabel" else None
    if len(data.val_targets):
        outcome.summary["baseline"] = guarded(outcome, "baseline", prior_baseline, comp.task, data.train_targets,
                                              data.val_targets, cfg.beta)
    guarded(outcome, "validation reports", validation_reports, cfg, comp, data, result, rule, ctx.out_dir, outcome)
    submit(ctx, comp, saver, model, rule, clock, reserve, outcome, device)


def predictor_in_memory(model: torch.nn.Module, cfg: Config, comp: Competition, rule: ThresholdRule,
                        device: torch.device) -> Predictor:
    model.to(device).eval()
    return Predictor("in-memory model", model, cfg, comp.task, comp.classes, rule)


def submit(ctx: RunContext, comp: Competition, saver: Checkpointer, model: torch.nn.Module, rule: ThresholdRule,
           clock: BudgetClock, reserve: InferenceReserve, outcome: Outcome, device: torch.device) -> None:
    """Predict with the best checkpoint; should that fail, with last.pt, then with the model in memory."""
    cfg = ctx.cfg
    for path in [p for p in (saver.path(BEST), saver.path(LAST)) if p.is_file()] + [None]:
        if path is None:
            pred = predictor_in_memory(model, cfg, comp, rule, device)
        else:
            pred = guarded(outcome, f"loading {path.name}", load_predictor, path, device, RuleSettings.of(cfg),
                           cfg.channels_last)
        if pred is None:
            continue
        if comp.task == "multilabel" and path in (None, saver.path(BEST)):
            pred.rule = rule  # decided on this checkpoint's validation probabilities just now
        tta = plan_tta(cfg.tta, len(comp.test_ids), reserve.test_ips or reserve.val_ips,
                       clock.remaining() - reserve.startup_s, ctx.stop, parse_duration(cfg.grace))
        out = guarded(outcome, f"prediction with {pred.name}", predict_test, pred, comp, cfg, device, tta, ctx.stop)
        if out is None:
            continue
        if guarded(outcome, "writing the submission", write_predictions, comp, out["probs"], out["ok"], comp.task,
                   pred.rule, ctx.out_dir) is not None:
            outcome.submitted = True
            outcome.summary.update(checkpoint=path.name if path else pred.name, val_score=pred.val_score, tta=tta,
                                   infer_images_per_s=round(out["images_per_s"], 1))
            return


def write_history(history: list[dict], out_dir: Path) -> None:
    import pandas as pd
    from .fileio import atomic_write
    if history:
        atomic_write(out_dir / "history.csv", pd.DataFrame(history).to_csv(index=False))


def validation_reports(cfg: Config, comp: Competition, data: TrainingData, result: FitResult, rule: ThresholdRule,
                       out_dir: Path, outcome: Outcome) -> None:
    """Curves, per-label errors and worst images of the best epoch; its out-of-fold file under K-fold."""
    metric = f"F{cfg.beta:g} per image" if comp.task == "multilabel" else "accuracy"
    if (out_dir / "history.csv").is_file():
        guarded(outcome, "history plot", plot_history, out_dir / "history.csv", out_dir / "history.png", metric=metric)
    probs = result.best_val_probs
    if probs is None or probs.shape[0] != len(data.val_targets):
        return
    write_npy(out_dir / "val_probs.npy", probs)
    val_pred = rule.apply(probs) if comp.task == "multilabel" else probs.argmax(1)
    outcome.summary["errors"] = guarded(outcome, "error analysis", write_error_analysis, data.val_targets, val_pred,
                                        probs, comp.class_names, [Path(p).stem for p in data.val_paths], out_dir)
    if cfg.fold >= 0:
        save_oof(out_dir / "oof", cfg.fold, data.val_rows, probs)
