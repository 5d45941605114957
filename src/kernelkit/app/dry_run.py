"""--dry-run: time a few training steps and TTA batches on the real data, then plan the budget."""
from __future__ import annotations

import dataclasses
import logging

import torch

from ..build.assemble import build_training_data
from ..build.components import build_parts, fit_options
from ..core.clock import now as clock_now
from ..core.context import RunContext
from ..engine.budget import BudgetClock, InferenceReserve, budget_seconds
from ..engine.plan import Plan, make_plan
from ..engine.resolution import ResolutionSchedule, effective_ips, fmt_ips
from ..engine.trainer import Trainer
from ..inputs.competition import Competition
from ..model.factory import preprocess_of
from .predictor import probe_inference
from .train_job import new_reserve

TRAIN_STEPS, INFER_BATCHES = 12, 4
STAGE_STEPS = 5  # per stage size with progressive resizing (the first is not timed)

log = logging.getLogger("kernelkit")


def dry_run(ctx: RunContext, comp: Competition, device: torch.device) -> Plan:
    cfg = ctx.cfg
    setup_s = clock_now() - ctx.t_start
    data = build_training_data(cfg, comp, device)
    t_build = clock_now()
    parts = build_parts(cfg, comp.task, comp.num_classes, data.train_targets, device, data.gpu_aug)
    build_s = clock_now() - t_build
    budget_s, margin_s = budget_seconds(cfg)
    opts = fit_options(cfg, preprocess_of(parts.model), device)
    sched = opts.resolution
    ips_at = {}
    # Each stage size timed on its own (a constant schedule at that size): the plan is the
    # time-weighted sum over the stages, not the speed of the first one.
    for size in sorted(set(sched.sizes())) if sched is not None else [cfg.img_size]:
        fixed = dataclasses.replace(opts, resolution=ResolutionSchedule(size) if sched is not None else None)
        trainer = Trainer(parts, fixed, BudgetClock(budget_s, margin_s), InferenceReserve(0, 0, 1), device)
        tr = trainer.train_epoch(data.train_loader, max_steps=STAGE_STEPS if sched is not None else TRAIN_STEPS)
        ips_at[size] = tr["images_per_s"]
    train_ips = effective_ips(ips_at, sched, over_clock=not cfg.epochs)
    if sched is not None:
        log.info("progressive resizing: %s; training throughput %s -> %.1f img/s over the schedule",
                 sched.describe(), fmt_ips(ips_at), train_ips)
    inf = probe_inference(parts.model, cfg, comp, device, INFER_BATCHES, "dry-run")
    reserve = new_reserve(cfg, comp, data, parts, build_s)  # the very reserve training will keep back
    reserve.observe_probe(inf)
    return make_plan(budget_s=budget_s, margin_s=margin_s, setup_s=setup_s, train_ips=train_ips, reserve=reserve,
                     n_train=len(data.train_targets), epochs=cfg.epochs)
