"""The blend job (`--mode blend`): K-fold run folders -> CV score per fold, per model and blended ->
weights and the threshold rule fitted on the out-of-fold rows -> a validated submission.

Input problems (a folder without out-of-fold files, shapes of another data set) are refusals
(exit 2) found before anything is written. Nothing is trained or predicted: the runs' saved
test probabilities are blended, so this takes seconds.
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from ..core.config import Config, ConfigError
from ..core.context import PREDICTING, RunContext
from ..core.fileio import write_json
from ..decide.ensemble import (
    BlendInputError,
    Member,
    find_run_dirs,
    fit_weights,
    group_members,
    load_member,
    mix,
    search_rows,
)
from ..decide.rules import RuleSettings, refine_rule, score_validation
from ..decide.thresholds import ThresholdRule
from ..inputs.competition import Competition
from .predictor import write_predictions

log = logging.getLogger("kernelkit")


def load_members(cfg: Config, comp: Competition) -> list[Member]:
    try:
        groups = group_members(find_run_dirs(cfg.checkpoints))
        return [load_member(g, len(comp.train_paths), comp.num_classes, len(comp.test_ids)) for g in groups]
    except BlendInputError as e:
        raise ConfigError(str(e)) from e


def scorer(cfg: Config, task: str, targets: np.ndarray) -> Callable[..., dict]:
    """(probs of `rows`, rows, settle=True) -> score_validation's answer: the competition metric, with the
    global threshold chosen (multi-label) unless the user fixed it; settle=False takes the exact best, for
    the weight search's hundreds of calls (half the cost, and a smoother objective)."""
    def score(probs: np.ndarray, rows: np.ndarray, settle: bool = True) -> dict:
        return score_validation(task, targets[rows], probs, cfg.threshold, cfg.beta, cfg.min_labels, cfg.max_labels,
                                settle=settle)
    return score


def cv_report(members: list[Member], score: Callable) -> dict:
    """Score of every fold file on its own rows, and of every member over all its rows."""
    folds = {f"{m.name}:{name}": round(score(m.oof[idx], idx)["score"], 5)
             for m in members for name, idx in m.folds.items()}
    per_member = {m.name: round(score(m.oof[m.covered], np.flatnonzero(m.covered))["score"], 5) for m in members}
    return {"folds": folds, "members": per_member}


def blend_rule(cfg: Config, comp: Competition, targets: np.ndarray, probs: np.ndarray, found: dict) -> ThresholdRule:
    settings = RuleSettings.of(cfg)
    if comp.task != "multilabel":
        return settings.global_rule(0.5)
    return refine_rule(settings, found["threshold"], comp.class_names, targets, probs)


def run_blend(ctx: RunContext, comp: Competition) -> dict:
    cfg = ctx.cfg
    members = load_members(cfg, comp)
    rows = np.flatnonzero(np.logical_and.reduce([m.covered for m in members]))
    if not len(rows):
        raise ConfigError(f"checkpoints={cfg.checkpoints!r}: the models' out-of-fold rows share no image")
    score = scorer(cfg, comp.task, comp.train_targets)
    report = cv_report(members, score)
    sample = search_rows(rows, cfg.seed)
    weights, _ = fit_weights([m.oof[sample] for m in members], lambda p: score(p, sample, settle=False)["score"])
    blended = mix([m.oof[rows] for m in members], weights)
    found = score(blended, rows)
    rule = blend_rule(cfg, comp, comp.train_targets[rows], blended, found)
    ctx.phase = PREDICTING
    test = mix([m.test for m in members], weights)
    write_predictions(comp, test, np.ones(len(test), bool), comp.task, rule, ctx.out_dir)
    report.update(weights={m.name: round(float(w), 4) for m, w in zip(members, weights)}, oof_rows=int(len(rows)),
                  blended=round(found["score"], 5), metric=found["metric"],
                  runs={m.name: [str(d) for d in m.dirs] for m in members},
                  threshold_rule=rule.to_dict() if comp.task == "multilabel" else None)
    write_json(ctx.out_dir / "blend.json", report)
    for name, s in report["folds"].items():
        log.info("CV %s %s: %.4f", found["metric"], name, s)
    for m, w in zip(members, weights):
        log.info("model %s (%d run folders): out-of-fold %.4f, weight %.3f", m.name, len(m.dirs),
                 report["members"][m.name], w)
    log.info("blend of %d model(s) on %d out-of-fold images: %s %.4f (best fold %.4f, best model %.4f)",
             len(members), len(rows), found["metric"], found["score"], max(report["folds"].values()),
             max(report["members"].values()))
    return {"mode": "blend", **{k: report[k] for k in ("weights", "members", "blended", "metric", "oof_rows")}}
