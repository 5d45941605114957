"""The train job: competition -> training -> a submission from the best checkpoint.

Before training, everything that can be checked is (the data, the sample submission, the resume
checkpoint, the time left after the measured inference reserve): a problem there is a refusal
(ConfigError, exit 2). Once training starts, whatever fails, a submission is still written from
the best weights available, and the failure is logged loudly and recorded in summary.json.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..build.assemble import TrainingData, build_training_data, fit_outputs
from ..build.components import build_parts, compile_step_model, count_parameters, fit_options, seed_everything
from ..core import distributed
from ..core.clock import now as clock_now
from ..core.config import Config, ConfigError, parse_duration
from ..core.context import PREDICTING, TRAINING, RunContext
from ..core.distributed import DistInfo
from ..decide.reports import write_label_statistics
from ..decide.rules import RuleSettings, refine_rule
from ..decide.thresholds import ThresholdRule, prior_baseline
from ..engine.budget import BudgetClock, InferenceReserve, budget_seconds, fmt_seconds
from ..engine.checkpoint import BEST, Checkpointer
from ..engine.resume import check_resume, restore
from ..engine.run_state import begin_run
from ..engine.trainer import FitResult, FitState, Trainer, TrainParts, Validation
from ..inputs.competition import Competition
from ..model.factory import preprocess_of
from .failure import Outcome, prediction_sources
from .outputs import export_seconds, finish_outputs
from .predictor import Predictor, load_predictor, plan_tta, predict_test, probe_inference, write_predictions
from .train_reports import validation_reports, write_history

log = logging.getLogger("kernelkit")

PROBE_BATCHES = 3  # the first batch carries loader start-up; two more give the steady speed with prefetch
MIN_TRAIN_SHARE = 0.25
CACHE_SHARE = 0.25  # of the time left at start that building the image cache may take


def measure_reserve(cfg: Config, comp: Competition, model: torch.nn.Module, device: torch.device,
                    reserve: InferenceReserve) -> None:
    """Before the first step: predict a few batches of real test images (real eval transform, real
    batch size, every TTA view), so the reserve is measured, not guessed, from the first epoch on."""
    if not comp.test_paths:
        return
    if device.type != "cuda":  # a CPU's image-views/s do not depend on the view: one view, half the probe's time
        cfg = dataclasses.replace(cfg, tta=1)
    out = probe_inference(model, cfg, comp, device, PROBE_BATCHES, "inference probe")
    reserve.observe_probe(out)
    log.info("inference probe: %.1f image-views/s, loader start-up %.1fs -> reserve %s for %d test images x %d "
             "views + %d validation images", out["images_per_s"], out["startup_s"],
             fmt_seconds(reserve.seconds()), reserve.n_test, reserve.tta, reserve.n_val)


def new_reserve(cfg: Config, comp: Competition, data: TrainingData, parts: TrainParts,
                build_s: float) -> InferenceReserve:
    """The time to keep for everything after training, before it is measured: the final validation and
    test prediction, the inference weights written after the submission, the model built again to
    load best.pt for the prediction (`build_s`), the weight average's work."""
    reserve = InferenceReserve(len(comp.test_ids), len(data.val_targets), cfg.tta)
    reserve.overhead_s += export_seconds(parts.model, cfg.ema > 0) + build_s
    if parts.swa is not None:
        reserve.extra_images, reserve.extra_loaders = parts.swa.extra_images(data.train_loader, reserve.n_val)
    return reserve


def fit_reserve_to_budget(clock: BudgetClock, reserve: InferenceReserve, cfg: Config) -> None:
    """Leave training at least MIN_TRAIN_SHARE of what is left: fewer TTA views first (said loudly),
    and when even one view leaves no time to train, refuse before training (exit 2)."""
    def train_left() -> float:
        return clock.total_s - clock.margin_s - reserve.seconds() - clock.elapsed()

    while reserve.tta > 1 and train_left() < MIN_TRAIN_SHARE * clock.remaining():
        reserve.tta -= 1
        log.warning("!!! inference with tta=%d would leave too little time to train: planning %d view(s) "
                    "(reserve now %s)", cfg.tta, reserve.tta, fmt_seconds(reserve.seconds()))
    if train_left() <= 0:
        raise ConfigError(
            f"budget={cfg.budget!r} leaves no time to train: {fmt_seconds(clock.elapsed())} already used by start-up, "
            f"inference needs ~{fmt_seconds(reserve.seconds())} (measured, {reserve.tta} view), margin "
            f"{fmt_seconds(clock.margin_s)}. Raise budget, or lower img_size / pick a faster model")


@dataclass
class TrainRun:
    """What `prepare` builds before the first step, and what the steps after training read: the
    prediction (`submit`) and everything around it (`finish`). `saver` and `result` come with training."""
    device: torch.device
    clock: BudgetClock
    data: TrainingData
    parts: TrainParts  # parts.model: the plain module (not the data-parallel wrapper)
    state: FitState
    reserve: InferenceReserve
    saver: Checkpointer | None = None
    result: FitResult | None = None


def prepare(ctx: RunContext, comp: Competition, info: DistInfo) -> TrainRun:
    """Everything before the first step. Raises ConfigError for what the user must change."""
    cfg, out_dir = ctx.cfg, ctx.out_dir
    if info.enabled and (cfg.freeze > 0 or cfg.balanced_sampling > 0):
        raise ConfigError("freeze and balanced_sampling are not supported with data-parallel training yet; "
                          "set ddp_procs=1")
    device = info.device()
    seed_everything(cfg.seed + info.rank, cfg.deterministic)
    run_start, resume_path = begin_run(out_dir, cfg.resume, ctx.t_start) if info.is_main else (0.0, None)
    run_start, resume_path = distributed.broadcast_object(info, (run_start, resume_path))
    explicit = resume_path is None and bool(cfg.resume_from)
    resume_path = resume_path or (Path(cfg.resume_from) if cfg.resume_from else None)
    ckpt = check_resume(cfg, resume_path, comp, explicit)
    clock = BudgetClock(*budget_seconds(cfg), start_time=run_start)
    data_cfg = fit_outputs(cfg, comp, out_dir, count_parameters(cfg, comp.num_classes)) if info.is_main else cfg
    data = build_training_data(data_cfg, comp, device, info, ctx.stop,
                               cache_deadline=clock_now() + CACHE_SHARE * max(clock.remaining(), 0.0))
    t_build = clock_now()
    parts = build_parts(cfg, comp.task, comp.num_classes, data.train_targets, device, data.gpu_aug)
    build_s = clock_now() - t_build
    state = restore(ckpt, parts, resume_path, cfg, explicit)
    if cfg.compile and info.enabled:
        log.warning("!!! compile=true is not supported with data-parallel training yet: training eagerly "
                    "(set ddp_procs=1 to compile on one GPU)")
    elif cfg.compile:
        compile_step_model(cfg, parts, comp.task, comp.num_classes, device, preprocess_of(parts.model))
    reserve = new_reserve(cfg, comp, data, parts, build_s)
    if info.is_main:
        measure_reserve(cfg, comp, parts.model, device, reserve)
        if (resume_path is None or explicit) and not ctx.stop.requested:  # a restart may have little time left
            fit_reserve_to_budget(clock, reserve, cfg)
    distributed.main_done(info, clock.start_time + clock.total_s)  # the probe ran on rank 0 alone
    return TrainRun(device, clock, data, parts, state, reserve)


def run_train(ctx: RunContext, comp: Competition, info: DistInfo) -> Outcome:
    run = prepare(ctx, comp, info)
    cfg, device, clock, data, parts = ctx.cfg, run.device, run.clock, run.data, run.parts
    pre = preprocess_of(parts.model)
    log.info("input statistics of %s: mean %s, std %s", cfg.model, pre.mean, pre.std)
    saver = run.saver = Checkpointer(ctx.out_dir, {"config": cfg.to_dict(), "classes": comp.classes, "task": comp.task,
                                       "seed": cfg.seed, "preprocess": pre.to_dict()})
    outcome = Outcome({"train_images": len(data.train_targets), "val_images": len(data.val_targets),
                       "train_start_s": round(clock.elapsed(), 1), "seed": cfg.seed})
    if info.is_main:
        outcome.guard("label statistics", write_label_statistics, comp.train_targets, comp.class_names,
                      comp.train_paths, comp.task, ctx.out_dir)
    ctx.phase = TRAINING
    model = distributed.wrap(parts.model, info)
    trainer = Trainer(dataclasses.replace(parts, model=model), fit_options(cfg, pre, device), clock, run.reserve,
                      device, saver if info.is_main else None, info, ctx.stop, run.state)
    val = (Validation(data.val_loader, data.val_targets, comp.task, prior_baseline(
        comp.task, data.train_targets, data.val_targets, cfg.beta)) if data.val_loader is not None else None)
    if info.enabled:  # a rank that fails must die, so the launcher stops its peers instead of them hanging
        trainer.fit(data.train_loader, val)
    elif outcome.guard("training", trainer.fit, data.train_loader, val) is None:
        trainer.result.stop_reason = "error"  # what was learned before the failure is kept
    distributed.release(info)  # no collective after training: a peer that dies now costs nothing
    result = run.result = trainer.result
    outcome.summary.update(saver.finish())  # every queued checkpoint on disk before anything reads one
    outcome.summary.update(stop_reason=result.stop_reason, epochs=len(result.history), steps=trainer.state.step,
                           warnings=result.warnings,
                           bad_train_images=trainer.state.bad_images, nonfinite_steps=trainer.state.nonfinite_steps,
                           failed_saves=saver.failures, micro_batches=trainer.state.micro_batches,
                           train_end_s=round(clock.elapsed(), 1), session=trainer.state.session,
                           sessions=cfg.sessions, progress=round(trainer.state.progress, 4), swa=result.average,
                           compile=parts.compiled and {"seconds": round(parts.compiled.seconds, 1),
                                                       "error": parts.compiled.error})
    if trainer.state.step == 0:
        log.warning("no training step was taken (%s); predicting with the initial weights", result.stop_reason)
    if info.is_main:
        ctx.phase = PREDICTING
        finish(ctx, comp, run, outcome)
    return outcome


def finish(ctx: RunContext, comp: Competition, run: TrainRun, outcome: Outcome) -> None:
    """Rule, prediction and submission, the inference weights, then the reports; each step guarded, so a
    failing one costs only itself."""
    cfg, settings, data, result, saver = ctx.cfg, RuleSettings.of(ctx.cfg), run.data, run.result, run.saver
    outcome.guard("writing history.csv", write_history, result.history, ctx.out_dir)
    rule = settings.global_rule(result.state.threshold)
    if comp.task == "multilabel":
        rule = outcome.guard("threshold rule search", refine_rule, settings, result.state.threshold,
                             comp.class_names, data.val_targets, result.best_val_probs) or rule
        if rule.kind != "global":  # stored so offline inference decodes the same way
            saver.update(BEST, threshold_rule=rule.to_dict())
    outcome.summary["threshold_rule"] = rule.to_dict() if comp.task == "multilabel" else None
    if len(data.val_targets):
        outcome.summary["baseline"] = outcome.guard("baseline", prior_baseline, comp.task, data.train_targets,
                                                    data.val_targets, cfg.beta)
    submit(ctx, comp, run, rule, outcome)
    # The inference weights have their seconds in the reserve; the reports come after them, on what is
    # left: they are not reserved (the history plot alone took ~2 s on the GPU rows), and before this
    # order they used up the export's seconds on every short GPU run.
    finish_outputs(ctx, saver, outcome, run.clock)
    outcome.guard("validation reports", validation_reports, cfg, comp, data, result, rule, ctx.out_dir, outcome)


def predictor_in_memory(model: torch.nn.Module, cfg: Config, comp: Competition, rule: ThresholdRule,
                        device: torch.device) -> Predictor:
    model.to(device).eval()
    return Predictor("in-memory model", model, cfg, comp.task, comp.classes, rule, preprocess=preprocess_of(model))


def submit(ctx: RunContext, comp: Competition, run: TrainRun, rule: ThresholdRule, outcome: Outcome) -> None:
    """Predict with the best checkpoint; should that fail, with last.pt, then with the model in memory."""
    cfg, saver, clock, reserve, device = ctx.cfg, run.saver, run.clock, run.reserve, run.device
    for path in prediction_sources(saver.out_dir) + [None]:
        if path is None:
            pred = predictor_in_memory(run.parts.model, cfg, comp, rule, device)
        else:
            pred = outcome.guard(f"loading {path.name}", load_predictor, path, device, RuleSettings.of(cfg),
                                 cfg.channels_last)
        if pred is None:
            continue
        if comp.task == "multilabel" and path in (None, saver.path(BEST)):
            pred.rule = rule  # decided on this checkpoint's validation probabilities just now
        tta = plan_tta(cfg.tta, len(comp.test_ids), reserve.test_ips or reserve.val_ips,
                       clock.remaining() - reserve.startup_s, ctx.stop, parse_duration(cfg.grace))
        out = outcome.guard(f"prediction with {pred.name}", predict_test, pred, comp, cfg, device, tta, ctx.stop)
        if out is None and clock.remaining() <= 0:
            log.error("no time left to try another model after the failed prediction")
            return
        if out is None:
            continue
        if outcome.guard("writing the submission", write_predictions, comp, out["probs"], out["ok"], comp.task,
                         pred.rule, ctx.out_dir) is not None:
            outcome.submitted = True
            outcome.summary.update(checkpoint=path.name if path else pred.name, val_score=pred.val_score, tta=tta,
                                   infer_images_per_s=round(out["images_per_s"], 1),
                                   submitted_at_s=round(clock.elapsed(), 1))
            return
