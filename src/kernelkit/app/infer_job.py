"""The infer job: average the TTA probabilities of one or more checkpoints and write the submission.

Each checkpoint rebuilds its own model, input size and threshold rule (predictor.load_predictor,
the same path the train job predicts with). The first checkpoint's measured speed decides how
many TTA views the others can afford; one that cannot fit even one view is skipped, so a
submission is always written in time.
"""
from __future__ import annotations

import glob
import logging
from pathlib import Path

import numpy as np
import torch

from ..core.config import ConfigError, parse_duration
from ..core.context import PREDICTING, RunContext
from ..core.fileio import write_npy
from ..decide.rules import RuleSettings, ensemble_rule
from ..engine.budget import BudgetClock, affordable_tta
from ..engine.checkpoint import INFERENCE_DIR, INFERENCE_META
from ..inputs.competition import Competition
from .predictor import load_predictor, plan_tta, predict_test, write_predictions

log = logging.getLogger("kernelkit")


def find_checkpoints(spec: str) -> list[Path]:
    """A checkpoint file, an inference folder (INFERENCE_DIR), a run's folder (its best*.pt, else
    any *.pt, else its inference folder) or a glob of those."""
    p = Path(spec)
    if (p / INFERENCE_META).is_file():
        found = [p]
    elif p.is_dir():
        found = (sorted(p.glob("best*.pt")) or sorted(p.glob("*.pt"))
                 or [d for d in [p / INFERENCE_DIR] if (d / INFERENCE_META).is_file()])
    elif p.is_file():
        found = [p]
    else:
        found = sorted(Path(x) for x in glob.glob(spec))
    if not found:
        raise ConfigError(f"checkpoints={spec!r}: no checkpoint file matches")
    return found


def views_for(i: int, n: int, wanted: int, seconds_per_view: float | None, clock: BudgetClock) -> int:
    """TTA views for checkpoint i of n: its share of the time left; 0 = skip it."""
    if seconds_per_view is None:
        return wanted
    share = clock.remaining() / (n - i)
    if share < seconds_per_view:
        return 0
    return affordable_tta(wanted, 1, 1.0 / seconds_per_view, share)


def run_infer(ctx: RunContext, comp: Competition, device: torch.device, clock: BudgetClock) -> dict:
    cfg, settings = ctx.cfg, RuleSettings.of(ctx.cfg)
    paths = find_checkpoints(cfg.checkpoints)
    probs_sum, ok, rules, used = None, None, [], []
    seconds_per_view: float | None = None
    for i, path in enumerate(paths):
        if used and ctx.stop.requested:
            log.warning("stop requested: averaging the %d checkpoint(s) predicted so far", len(used))
            break
        tta = views_for(i, len(paths), cfg.tta, seconds_per_view, clock)
        if tta == 0:
            log.warning("no time left for %s and %d more checkpoint(s); skipped", path, len(paths) - i - 1)
            break
        pred = load_predictor(path, device, settings, cfg.channels_last)
        if pred.classes != comp.classes:
            raise ConfigError(f"{path}: trained on a different label set than the {comp.format} data in {ctx.data_dir}")
        ctx.phase = PREDICTING  # from here on a failure is not the user's setting: no refusal
        if seconds_per_view is None:
            tta = plan_tta(cfg.tta, 1, None, clock.remaining(), ctx.stop, parse_duration(cfg.grace))
        elif tta < cfg.tta:
            log.warning("%s: %d TTA views instead of %d to stay inside the budget", path.name, tta, cfg.tta)
        out = predict_test(pred, comp, cfg, device, tta, ctx.stop)
        seconds_per_view = out["seconds_per_view"]
        write_npy(ctx.out_dir / f"test_probs_{path.stem}.npy", np.asarray(out["probs"], np.float32))
        if probs_sum is None:
            probs_sum = out["probs"]
        else:
            probs_sum += out["probs"]  # in place: one (N, C) sum whatever the number of checkpoints
        ok = out["ok"]
        rules.append(pred.rule)
        used.append({"checkpoint": str(path), "model": pred.config.model, "tta": tta, "val_score": pred.val_score})
        log.info("%s: %s, val score %s, %d TTA views", path, pred.config.model, pred.val_score, tta)
    rule = ensemble_rule(rules, settings)
    probs_sum /= len(used)
    write_predictions(comp, probs_sum, ok, comp.task, rule, ctx.out_dir)
    return {"checkpoints": used, "threshold_rule": rule.to_dict(), "wall_s": round(clock.elapsed(), 1)}
