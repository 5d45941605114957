"""Competition metrics on numpy arrays."""
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
    return float((probs.argmax(1) == labels).mean()) if len(labels) else 0.0


def top_k_error(labels: np.ndarray, probs: np.ndarray, k: int = 1) -> float:
    top = np.argsort(-probs, axis=1)[:, :k]
    return float(1.0 - (top == labels[:, None]).any(1).mean()) if len(labels) else 1.0


def search_threshold(truth: np.ndarray, probs: np.ndarray, beta: float = 2.0, min_labels: int = 0,
                     grid: np.ndarray | None = None) -> tuple[float, float]:
    """Best single global threshold on validation probabilities -> (threshold, score)."""
    from .decode import decode_multilabel
    grid = np.round(np.arange(0.02, 0.96, 0.01), 2) if grid is None else grid
    best_t, best_s = 0.5, -1.0
    for t in grid:
        s = fbeta_per_image(truth, decode_multilabel(probs, float(t), min_labels), beta)
        if s > best_s:
            best_t, best_s = float(t), s
    return best_t, best_s


def prior_baseline(task: str, train_targets: np.ndarray, val_targets: np.ndarray, beta: float = 2.0) -> float:
    """Score of the best constant prediction from training label frequencies: the bar to beat."""
    if task == "multiclass":
        majority = np.bincount(train_targets).argmax() if len(train_targets) else 0
        return float((val_targets == majority).mean()) if len(val_targets) else 0.0
    freq = train_targets.mean(0)
    probs = np.broadcast_to(freq, val_targets.shape)
    return search_threshold(val_targets, probs, beta, grid=np.unique(np.concatenate([[0.0], freq])))[1]
