"""Losses that accept a per-sample weight (0 for unreadable images)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bce_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    per_sample = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none").mean(1)
    return (per_sample * weight).sum() / weight.sum().clamp_min(1.0)


def ce_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    per_sample = F.cross_entropy(logits.float(), targets, reduction="none")
    return (per_sample * weight).sum() / weight.sum().clamp_min(1.0)


def get_loss(name: str, task: str):
    name = {"auto": "bce" if task == "multilabel" else "ce"}.get(name, name)
    losses = {"bce": bce_loss, "ce": ce_loss}
    if name not in losses:
        raise ValueError(f"unknown loss {name!r}; choose from {sorted(losses)}")
    if task == "multilabel" and name == "ce" or task == "multiclass" and name == "bce":
        raise ValueError(f"loss {name!r} does not fit a {task} task")
    return losses[name]
