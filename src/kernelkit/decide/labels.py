"""Probabilities -> class indices."""
from __future__ import annotations

from typing import Protocol

import numpy as np

DECODE_CELLS = 2 ** 22  # probabilities decoded at a time: masks and label sorts (8 bytes a cell) stay ~32 MB

class Rule(Protocol):
    """What decode needs of a thresholds.ThresholdRule (named here so decode stays a leaf)."""

    def apply(self, probs: np.ndarray) -> np.ndarray: ...


def order_and_ranks(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image: class indices by falling probability, and each class's place in that order."""
    order = np.argsort(-probs, axis=1, kind="stable")  # stable: ties go to the lower class index
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(probs.shape[1]), probs.shape), axis=1)
    return order, ranks


def limit_labels(pred: np.ndarray, order: np.ndarray, ranks: np.ndarray, min_labels: int = 0,
                 max_labels: int = 0) -> np.ndarray:
    """New (N, C) bool: `pred` plus each image's top `min_labels`, then (max_labels > 0) only the
    `max_labels` most probable predicted labels kept. order/ranks from `order_and_ranks`, passed in
    so that a search trying many limits sorts once."""
    if max_labels > 0 and min_labels > max_labels:
        raise ValueError(f"min_labels ({min_labels}) > max_labels ({max_labels})")
    pred = pred | (ranks < min_labels) if min_labels > 0 else pred.copy()
    if max_labels > 0:
        # Rank among the predicted labels only: count them along each image's falling order.
        kept = np.cumsum(np.take_along_axis(pred, order, axis=1), axis=1) <= max_labels
        cap = np.empty_like(kept)
        np.put_along_axis(cap, order, kept, axis=1)
        pred &= cap
    return pred


def apply_thresholds(probs: np.ndarray, thresholds: float | np.ndarray, min_labels: int = 0,
                     max_labels: int = 0) -> np.ndarray:
    """Boolean (N, C): probs above the threshold(s) (a scalar or one per class), then per image
    the top `min_labels` added and, when max_labels > 0, only the `max_labels` most probable of
    the predicted labels kept. Both go by probability, so a per-class rule and a global one force
    or drop the same labels.
    """
    pred = probs > np.asarray(thresholds)
    if min_labels <= 0 and max_labels <= 0:
        return pred
    return limit_labels(pred, *order_and_ranks(probs), min_labels, max_labels)


def decode_multilabel(probs: np.ndarray, threshold: float, min_labels: int = 0, max_labels: int = 0) -> np.ndarray:
    """Boolean (N, C): probs above threshold, plus the top `min_labels` of each image, at most
    `max_labels` (0: no cap) of each image."""
    return apply_thresholds(probs, threshold, min_labels, max_labels)


def decode(task: str, probs: np.ndarray, threshold: float = 0.5, min_labels: int = 0,
           rule: Rule | None = None) -> list:
    """Per image: the list of label indices (multi-label) or the class index (multi-class).

    A `rule` (kernelkit.decide.thresholds.ThresholdRule) replaces `threshold` and `min_labels`.
    """
    if task == "multilabel":
        out: list = []
        rows = max(1, DECODE_CELLS // max(probs.shape[1], 1))
        for s in range(0, len(probs), rows):  # the (rows, C) masks and sorts stay chunk-sized
            chunk = probs[s:s + rows]
            pred = rule.apply(chunk) if rule is not None else decode_multilabel(chunk, threshold, min_labels)
            out.extend(np.flatnonzero(row).tolist() for row in pred)
        return out
    return probs.argmax(1).tolist()
