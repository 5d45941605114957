"""Competition metrics on numpy arrays.

Multi-label metrics take (N, C) 0/1 or bool arrays of truth and prediction (for single-label data
use `one_hot`). They follow scikit-learn's definitions (tests compare them with sklearn.metrics):

- per image ('samples'), per class ('macro') or pooled ('micro') counts tp, fp, fn;
- precision = tp / (tp + fp), recall = tp / (tp + fn),
  F-beta = (1 + b^2) tp / ((1 + b^2) tp + b^2 fn + fp);
- a ratio whose denominator is 0 is `zero_division`, 1 by default (sklearn's zero_division=1):
  an image (or class) with no true and no predicted label scores F = 1, as in iMet's F2
  (`fbeta_per_image`); one with true labels but nothing predicted has precision 1, recall 0, F 0.
"""
from __future__ import annotations

import numpy as np


def fbeta_per_image(truth: np.ndarray, pred: np.ndarray, beta: float = 2.0) -> float:
    """F-beta of each image's label set, averaged over images (iMet 2019's F2).

    An image with no true and no predicted labels scores 1 (sklearn's zero_division=1).
    """
    truth, pred = truth.astype(bool), pred.astype(bool)
    tp = (truth & pred).sum(1).astype(np.float64)
    p, t = pred.sum(1), truth.sum(1)
    b2 = beta * beta
    denom = b2 * t + p
    score = np.where(denom > 0, (1 + b2) * tp / np.maximum(denom, 1), 1.0)
    return float(score.mean()) if len(score) else 0.0


def accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    """Single-label accuracy of the argmax: labels (N,) class indices, probs (N, C)."""
    return float((probs.argmax(1) == labels).mean()) if len(labels) else 0.0


def top_k_error(labels: np.ndarray, probs: np.ndarray, k: int = 1) -> float:
    """Share of images whose label is not among the k most probable classes (iNat's top-1 error)."""
    top = np.argsort(-probs, axis=1)[:, :k]
    return float(1.0 - (top == labels[:, None]).any(1).mean()) if len(labels) else 1.0


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(N,) class indices -> (N, C) bool indicator."""
    out = np.zeros((len(labels), num_classes), dtype=bool)
    out[np.arange(len(labels)), labels] = True
    return out


def _bool2d(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    truth, pred = np.asarray(truth).astype(bool), np.asarray(pred).astype(bool)
    if truth.shape != pred.shape or truth.ndim != 2:
        raise ValueError(f"truth {truth.shape} and pred {pred.shape} must be the same (N, C) shape")
    return truth, pred


def _ratio(num: np.ndarray, den: np.ndarray, zero_division: float) -> np.ndarray:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.where(den > 0, num / np.maximum(den, 1e-300), zero_division)


AVERAGES = ("micro", "macro", "samples")


def precision_recall_fbeta(truth: np.ndarray, pred: np.ndarray, beta: float = 1.0, average: str = "micro",
                           zero_division: float = 1.0) -> tuple[float, float, float]:
    """(precision, recall, F-beta) averaged 'micro' | 'macro' | 'samples', as
    sklearn.metrics.precision_recall_fscore_support(..., average=average, zero_division=...)."""
    truth, pred = _bool2d(truth, pred)
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
    axis = {"micro": None, "macro": 0, "samples": 1}[average]
    tp = (truth & pred).sum(axis)
    fp = (~truth & pred).sum(axis)
    fn = (truth & ~pred).sum(axis)
    b2 = beta * beta
    p, r = _ratio(tp, tp + fp, zero_division), _ratio(tp, tp + fn, zero_division)
    f = _ratio((1 + b2) * tp, (1 + b2) * tp + b2 * fn + fp, zero_division)
    if np.ndim(f) and not np.size(f):
        return 0.0, 0.0, 0.0  # no images (samples) or no classes (macro): nothing to average
    return float(np.mean(p)), float(np.mean(r)), float(np.mean(f))


def precision_score(truth: np.ndarray, pred: np.ndarray, average: str = "micro", zero_division: float = 1.0) -> float:
    return precision_recall_fbeta(truth, pred, 1.0, average, zero_division)[0]


def recall_score(truth: np.ndarray, pred: np.ndarray, average: str = "micro", zero_division: float = 1.0) -> float:
    return precision_recall_fbeta(truth, pred, 1.0, average, zero_division)[1]


def fbeta_score(truth: np.ndarray, pred: np.ndarray, beta: float = 1.0, average: str = "micro",
                zero_division: float = 1.0) -> float:
    """F-beta; average='samples' with zero_division=1 is `fbeta_per_image`."""
    return precision_recall_fbeta(truth, pred, beta, average, zero_division)[2]


def f1_score(truth: np.ndarray, pred: np.ndarray, average: str = "micro", zero_division: float = 1.0) -> float:
    return precision_recall_fbeta(truth, pred, 1.0, average, zero_division)[2]


def subset_accuracy(truth: np.ndarray, pred: np.ndarray) -> float:
    """Share of images whose label set is exactly right (sklearn accuracy_score on indicators)."""
    truth, pred = _bool2d(truth, pred)
    return float((truth == pred).all(1).mean()) if len(truth) else 0.0


def label_accuracy(truth: np.ndarray, pred: np.ndarray) -> float:
    """Share of correct (image, label) decisions, 1 - sklearn's hamming_loss (Helsinki's 'accuracy')."""
    truth, pred = _bool2d(truth, pred)
    return float((truth == pred).mean()) if truth.size else 0.0


def per_class_report(truth: np.ndarray, pred: np.ndarray, beta: float = 1.0,
                     zero_division: float = 1.0) -> dict[str, np.ndarray]:
    """Per-class arrays for error analysis: support, tp, fp, fn, errors (fp + fn), precision,
    recall, fbeta (sklearn's average=None)."""
    truth, pred = _bool2d(truth, pred)
    tp, fp, fn = (truth & pred).sum(0), (~truth & pred).sum(0), (truth & ~pred).sum(0)
    b2 = beta * beta
    return {"support": truth.sum(0), "tp": tp, "fp": fp, "fn": fn, "errors": fp + fn,
            "precision": _ratio(tp, tp + fp, zero_division), "recall": _ratio(tp, tp + fn, zero_division),
            "fbeta": _ratio((1 + b2) * tp, (1 + b2) * tp + b2 * fn + fp, zero_division)}
