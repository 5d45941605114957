"""Class-balanced sampling for long-tailed data (iNaturalist seed)."""
from __future__ import annotations

import numpy as np
import torch


def balanced_sample_weights(targets: np.ndarray, power: float = 0.5) -> np.ndarray:
    """Per-image sampling weight ~ 1 / count(class) ** power.

    power=1 draws every class equally often, 0 is plain shuffling; 0.5 (square-root sampling) is
    the usual compromise that lifts rare classes without repeating them to overfitting. For
    multi-label targets an image counts as its rarest label; images with no label get the
    weight of the most common label, so they are not dropped.
    """
    if targets.ndim == 1:
        counts = np.bincount(targets).astype(np.float64)
        w = 1.0 / np.maximum(counts[targets], 1.0) ** power
    else:
        counts = targets.sum(0).astype(np.float64)
        per_label = np.where(targets > 0, 1.0 / np.maximum(counts, 1.0) ** power, 0.0)
        w = per_label.max(1)
        w[w == 0] = 1.0 / max(counts.max(), 1.0) ** power
    return w / w.sum()


def balanced_sampler(targets: np.ndarray, power: float = 0.5, seed: int = 0) -> torch.utils.data.Sampler:
    g = torch.Generator()
    g.manual_seed(seed)
    weights = torch.as_tensor(balanced_sample_weights(targets, power), dtype=torch.double)
    return torch.utils.data.WeightedRandomSampler(weights, num_samples=len(targets), replacement=True, generator=g)
