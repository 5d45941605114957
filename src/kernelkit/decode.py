"""Probabilities -> class indices."""
from __future__ import annotations

import numpy as np


def decode_multilabel(probs: np.ndarray, threshold: float, min_labels: int = 0) -> np.ndarray:
    """Boolean (N, C): probs above threshold, plus the top `min_labels` of each image."""
    pred = probs > threshold
    if min_labels > 0:
        top = np.argsort(-probs, axis=1)[:, :min_labels]
        np.put_along_axis(pred, top, True, axis=1)
    return pred


def decode(task: str, probs: np.ndarray, threshold: float = 0.5, min_labels: int = 0) -> list:
    if task == "multilabel":
        return [np.flatnonzero(row).tolist() for row in decode_multilabel(probs, threshold, min_labels)]
    return probs.argmax(1).tolist()
