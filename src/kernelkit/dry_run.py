"""--dry-run: time a few training steps and TTA batches on the real data, then plan the budget."""
from __future__ import annotations

import time

import torch

from .assemble import build_training_data
from .budget import BudgetClock, InferenceReserve
from .competition import Competition
from .components import build_parts, fit_options
from .config import budget_seconds
from .context import RunContext
from .models import preprocess_of
from .predictor import probe_inference
from .plan import Plan, make_plan
from .train import Trainer

TRAIN_STEPS, INFER_BATCHES = 12, 4


def dry_run(ctx: RunContext, comp: Competition, device: torch.device) -> Plan:
    cfg = ctx.cfg
    setup_s = time.time() - ctx.t_start
    data = build_training_data(cfg, comp, device)
    parts = build_parts(cfg, comp.task, comp.num_classes, data.train_targets, device, data.gpu_aug)
    budget_s, margin_s = budget_seconds(cfg)
    trainer = Trainer(parts, fit_options(cfg, preprocess_of(parts.model), device), BudgetClock(budget_s, margin_s), InferenceReserve(0, 0, 1), device)
    tr = trainer.train_epoch(data.train_loader, max_steps=TRAIN_STEPS)
    inf = probe_inference(parts.model, cfg, comp, device, INFER_BATCHES, "dry-run")
    return make_plan(budget_s=budget_s, margin_s=margin_s, setup_s=setup_s, train_ips=tr["images_per_s"],
                     infer_ips=inf["images_per_s"], n_train=len(data.train_targets), n_val=len(data.val_targets),
                     n_test=len(comp.test_ids), tta=cfg.tta, epochs=cfg.epochs, loader_startup_s=inf["startup_s"])
