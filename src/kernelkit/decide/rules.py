"""Every decision about how probabilities become labels, in one place.

During training: the validation score and the global threshold of each epoch
(`score_validation`). After training: the rule for the submission, refined per group or class on
the best epoch's validation probabilities when asked (`refine_rule`). At inference: the rule a
checkpoint carries (`rule_from_checkpoint`) and the rule for an average of several
(`ensemble_rule`). A user's explicit `threshold` always wins.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .labels import decode_multilabel
from .metrics import accuracy, fbeta_per_image
from .thresholds import ThresholdRule, gaps_to_best, groups_from_names, search_classes, search_global, search_groups

log = logging.getLogger("kernelkit")


@dataclass(frozen=True)
class RuleSettings:
    """The user's settings for multi-label decoding (Config's threshold, threshold_rule, ...)."""
    threshold: float = -1.0  # <0: searched on validation
    kind: str = "global"
    min_labels: int = 0
    max_labels: int = 0
    beta: float = 2.0

    @classmethod
    def of(cls, cfg: Any) -> "RuleSettings":
        return cls(cfg.threshold, cfg.threshold_rule, cfg.min_labels, cfg.max_labels, cfg.beta)

    def global_rule(self, threshold: float) -> ThresholdRule:
        t = self.threshold if self.threshold >= 0 else threshold
        return ThresholdRule("global", [t], self.min_labels, self.max_labels)


def score_validation(task: str, targets: np.ndarray, probs: np.ndarray, threshold: float = -1.0,
                     beta: float = 2.0, min_labels: int = 0, max_labels: int = 0, settle: bool = True) -> dict:
    """Competition metric on validation; multi-label also picks the global threshold (settled, or the
    exact best with `settle=False`)."""
    if task == "multilabel":
        if threshold >= 0:
            s = fbeta_per_image(targets, decode_multilabel(probs, threshold, min_labels, max_labels), beta)
            t = threshold
        elif settle:
            t, s = settled_threshold(targets, probs, beta, min_labels, max_labels)
        else:
            rule, s = search_global(targets, probs, beta, min_labels=min_labels, max_labels=max_labels)
            t = rule.values[0]
        return {"score": s, "threshold": t, "metric": f"F{beta:g} per image"}
    acc = accuracy(targets, probs)
    return {"score": acc, "threshold": 0.5, "metric": "accuracy", "top1_error": 1 - acc}


# A later epoch takes best.pt unless it validates worse than the best score so far by more than this many
# standard errors of that score. The highest of a run's noisy validation scores is biased upwards (it is
# the maximum), and under a schedule that decays to zero the last epochs are the better weights: keeping
# a mid-run epoch that won by one image of 126 lost 0.005 test F2 / accuracy to a notebook that simply
# predicts with its last epoch (bench_finetune.py, digits, README fine-tuning). Two standard errors let
# a one-image difference pass at any score on a hundred images, and hold off a real drop.
NOISE_Z = 2.0
THRESHOLD_Z = 2.0  # settled_threshold: thresholds within two standard errors of the best count as ties


def score_noise(score: float, n_images: int) -> float:
    """Upper bound on the standard error of a score that is a mean of per-image values in [0, 1]
    (accuracy, F-beta per image) over `n_images`: a Bernoulli variable has the largest variance of any
    [0, 1] variable with that mean. The mean is smoothed as (k + 1) / (n + 2) (Laplace), so a perfect
    score on a hundred images still carries the noise of one image rather than none."""
    if n_images <= 0 or not math.isfinite(score):
        return 0.0
    p = (min(max(score, 0.0), 1.0) * n_images + 1.0) / (n_images + 2.0)
    return math.sqrt(p * (1.0 - p) / n_images)


def keeps_up(score: float, peak: float, n_images: int, z: float = NOISE_Z) -> bool:
    """Whether a later epoch scoring `score` replaces the best checkpoint, the run's peak being `peak`."""
    return math.isfinite(score) and (not math.isfinite(peak) or score >= peak - z * score_noise(peak, n_images))


def settled_threshold(targets: np.ndarray, probs: np.ndarray, beta: float = 2.0, min_labels: int = 0,
                      max_labels: int = 0) -> tuple[float, float]:
    """The global threshold for the submission -> (threshold, its validation score): of the thresholds
    that fall behind the best by no more than THRESHOLD_Z standard errors of the image-by-image gap
    (`thresholds.gaps_to_best`), the one nearest F*/(1 + beta^2), F* being the best score. `settle=False` in
    `score_validation` takes the exact best instead (a blend's weight search calls it hundreds of times;
    the blend's own threshold is settled).

    Why not the best alone: on a hundred validation images the F-beta curve is flat near its top and one
    image moves its peak anywhere on the plateau (0.23, 0.55 and 0.39 in three seeds of one digits run,
    whose test optimum was 0.24-0.34; the 0.55 cost 0.009 test F2). F*/(1 + beta^2) is where the
    expected F-beta of calibrated probabilities peaks (Lipton et al. 2014: F1's optimal threshold is half
    the optimal F1; proved for F over the whole set, a heuristic for F averaged per image), 0.2 for F2
    near 1, so it breaks the plateau's tie from theory, not from one image. The gap is paired, so a
    threshold that decodes many images differently is no tie, whatever the two scores: probabilities far
    from calibrated (a focal loss) keep the threshold their data put them at. A tie may lose up to ~3
    images against the best, so an epoch's score (history.csv) is up to that much below the exact best."""
    grid, scores, gap, se = gaps_to_best(targets, probs, beta, min_labels, max_labels)
    near = np.flatnonzero(gap <= THRESHOLD_Z * se + 1e-12)  # the best itself: gap 0
    j = int(near[np.argmin(np.abs(grid[near] - scores.max() / (1 + beta * beta)))])
    return float(grid[j]), float(scores[j])


def refine_rule(settings: RuleSettings, threshold: float, class_names: list[str],
                val_targets: np.ndarray | None, val_probs: np.ndarray | None) -> ThresholdRule:
    """The submission's multi-label rule: the training run's global threshold, refined per group or
    per class on the best epoch's validation probabilities when `settings.kind` asks for it."""
    rule = settings.global_rule(threshold)
    if settings.threshold >= 0 or settings.kind == "global" or val_probs is None or val_targets is None:
        return rule
    if val_probs.shape != val_targets.shape:
        log.warning("validation probabilities do not match the validation split; keeping the global threshold")
        return rule
    limits = dict(min_labels=settings.min_labels, max_labels=settings.max_labels)
    # the ascent starts from the settled global threshold, not from the exact best's one-image peak
    if settings.kind == "group":
        found, score = search_groups(val_targets, val_probs, groups_from_names(class_names), settings.beta,
                                     start=rule.values[0], **limits)
    else:
        found, score = search_classes(val_targets, val_probs, settings.beta, start=rule, show_progress=True, **limits)
    log.info("threshold rule %s: validation F%g %.4f (global %.4f)", found.kind, settings.beta, score,
             rule.score(val_targets, val_probs, settings.beta))
    return found


def rule_from_checkpoint(ckpt: dict[str, Any], settings: RuleSettings | None = None) -> ThresholdRule:
    """The rule a checkpoint was trained to use: its stored rule, else its global threshold with the
    label limits of the run that trained it. `settings` with threshold >= 0 overrides it."""
    if settings is not None and settings.threshold >= 0:
        return settings.global_rule(settings.threshold)
    if ckpt.get("threshold_rule"):
        return ThresholdRule.from_dict(ckpt["threshold_rule"])
    trained = ckpt.get("config", {})
    return ThresholdRule("global", [float(ckpt.get("threshold", 0.5))], int(trained.get("min_labels", 0)),
                         int(trained.get("max_labels", 0)))


def ensemble_rule(rules: list[ThresholdRule], settings: RuleSettings | None = None) -> ThresholdRule:
    """Global thresholds of several checkpoints average; a refined rule is taken from the first."""
    if settings is not None and settings.threshold >= 0:
        return settings.global_rule(settings.threshold)
    if len(rules) == 1:
        return rules[0]
    if all(r.kind == "global" for r in rules):
        return ThresholdRule("global", [float(np.mean([r.values[0] for r in rules]))], rules[0].min_labels,
                             rules[0].max_labels)
    log.info("using the %s threshold rule of the first checkpoint for the average", rules[0].kind)
    return rules[0]
