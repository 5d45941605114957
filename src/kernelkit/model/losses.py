"""Losses that accept a per-sample weight (0 for unreadable images).

Every loss has the signature ``loss(logits, targets, weight) -> scalar``: multi-label losses take
(N, C) 0/1 float targets, multi-class losses (N,) class indices. The result is the weighted mean
over samples, ``sum(w_i * l_i) / max(sum(w_i), 1)``, so a weight-0 image contributes nothing and
an all-unreadable batch gives 0 rather than NaN. ``get_loss(name, task, **params)`` binds the
parameters and checks that the loss fits the task.
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

MULTILABEL = "multilabel"
MULTICLASS = "multiclass"


def weighted_mean(per_sample: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean over samples with 0/1 weights; the clamp keeps an all-zero batch at 0, not NaN."""
    return (per_sample * weight).sum() / weight.sum().clamp_min(1.0)


def _reduce_labels(per_label: torch.Tensor, reduce: str) -> torch.Tensor:
    """(N, C) -> (N,): 'mean' keeps the scale independent of C; 'sum' is what the seeds wrote."""
    if reduce == "mean":
        return per_label.mean(1)
    if reduce == "sum":
        return per_label.sum(1)
    raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")


class ClassWeights:
    """Class weights held on the host and copied to each device once: `get_loss` binds them like
    this, because a per-call upload is a blocking host-to-device copy every training step."""

    def __init__(self, values: Sequence[float] | torch.Tensor):
        self.host = torch.as_tensor(values, dtype=torch.float32).detach().cpu()
        self._on: dict[torch.device, torch.Tensor] = {}

    def on(self, device: torch.device) -> torch.Tensor:
        if device not in self._on:
            self._on[device] = self.host.to(device)
        return self._on[device]


def _class_weights(class_weights, like: torch.Tensor) -> torch.Tensor | None:
    if class_weights is None:
        return None
    if isinstance(class_weights, ClassWeights):
        return class_weights.on(like.device)
    return torch.as_tensor(class_weights, dtype=torch.float32, device=like.device)


def class_balanced_weights(counts: Sequence[float] | torch.Tensor, beta: float = 0.999) -> torch.Tensor:
    """Class-balanced weights of Cui et al. 2019, from the effective number of samples.

    w_c = (1 - beta) / (1 - beta ** n_c), rescaled to sum to C so that the loss keeps its usual
    magnitude (and the learning rate its meaning). beta=0 gives equal weights, beta -> 1 inverse
    frequency. Classes with no samples get the weight of a class with one sample instead of
    infinity: they then only ever appear as negatives.
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    n = torch.as_tensor(counts, dtype=torch.float64).clamp_min(1.0)
    effective = (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n)) / (1.0 - beta)
    w = 1.0 / effective
    return (w * len(w) / w.sum()).float()


# ------------------------------------------------------------------------------- multi-label


def bce_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
             class_weights: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy, mean over labels; class_weights (C,) scale each label's column."""
    per_label = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    cw = _class_weights(class_weights, logits)
    if cw is not None:
        per_label = per_label * cw
    return weighted_mean(per_label.mean(1), weight)


def bce_sum_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, eps: float = 0.0,
                 class_weights: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """Sum over labels of per-label BCE (Helsinki seed), optionally on clamped probabilities.

    With eps > 0 the probability is squeezed to s(p) = (1 - 2 eps) p + eps, so it lies in
    [eps, 1 - eps] (the seed used eps=0.005: s = 0.99 p + 0.005) and no label can cost more than
    -log(eps). The logs are taken with logaddexp from logsigmoid, so the gradient stays exact
    where sigmoid itself would round to 0 or 1 in float32.
    """
    x, y = logits.float(), targets.float()
    if eps == 0.0:
        per_label = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    else:
        if not 0.0 < eps < 0.5:
            raise ValueError(f"eps must be in [0, 0.5), got {eps}")
        log_eps, log_scale = math.log(eps), math.log1p(-2.0 * eps)
        log_s = torch.logaddexp(torch.full_like(x, log_eps), log_scale + F.logsigmoid(x))
        log_1ms = torch.logaddexp(torch.full_like(x, log_eps), log_scale + F.logsigmoid(-x))
        per_label = -(y * log_s + (1.0 - y) * log_1ms)
    cw = _class_weights(class_weights, logits)
    if cw is not None:
        per_label = per_label * cw
    return weighted_mean(per_label.sum(1), weight)


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, gamma: float = 2.0,
               alpha: float | None = None, reduce: str = "mean",
               class_weights: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017), the iMet seed's loss: -alpha_t (1 - p_t)^gamma log p_t.

    reduce='mean' over labels makes gamma=0 (and alpha=None) exactly `bce_loss`; the seed summed
    over labels (reduce='sum'), which under Adam only rescales the loss. The modulating factor is
    computed as exp(gamma * log(1 - p_t)) so its gradient stays finite for 0 < gamma < 1 where
    1 - p_t rounds to 0.
    """
    x, y = logits.float(), targets.float()
    ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    if gamma != 0.0:
        # 1 - p_t = y (1 - p) + (1 - y) p, in log space; also right for soft targets.
        log_1m_pt = torch.logaddexp(torch.log(y) + F.logsigmoid(-x), torch.log1p(-y) + F.logsigmoid(x))
        ce = torch.exp(gamma * log_1m_pt) * ce
    if alpha is not None:
        ce = (alpha * y + (1.0 - alpha) * (1.0 - y)) * ce
    cw = _class_weights(class_weights, logits)
    if cw is not None:
        ce = ce * cw
    return weighted_mean(_reduce_labels(ce, reduce), weight)


def asl_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, gamma_pos: float = 0.0,
             gamma_neg: float = 4.0, clip: float = 0.05, reduce: str = "mean") -> torch.Tensor:
    """Asymmetric loss (Ridnik et al. 2021) for many-label data where negatives dominate.

    Positives: -(1 - p)^gamma_pos log p. Negatives use the shifted probability p_m = max(p - clip, 0):
    -p_m^gamma_neg log(1 - p_m), so easy negatives (p < clip) cost nothing and the rest are
    down-weighted more strongly than positives. With gamma_pos = gamma_neg = gamma and clip = 0
    it is `focal_loss(gamma)`; with all three 0 it is `bce_loss`. Defaults are the paper's.
    """
    x, y = logits.float(), targets.float()
    log_p = F.logsigmoid(x)
    if clip > 0:
        # 1 - p_m = min(1 - p + clip, 1) >= clip, so the log is safe without logsigmoid.
        one_m_pm = (torch.sigmoid(-x) + clip).clamp(max=1.0)
        log_1m_pm, pm = torch.log(one_m_pm), 1.0 - one_m_pm
    else:
        log_1m_pm, pm = F.logsigmoid(-x), torch.sigmoid(x)
    pos = log_p if gamma_pos == 0 else torch.exp(gamma_pos * F.logsigmoid(-x)) * log_p
    # clamp: a fractional gamma_neg would give 0 ** (gamma - 1) = inf times the clamp's zero gradient.
    neg = log_1m_pm if gamma_neg == 0 else pm.clamp_min(1e-12).pow(gamma_neg) * log_1m_pm
    per_label = -(y * pos + (1.0 - y) * neg)
    return weighted_mean(_reduce_labels(per_label, reduce), weight)


# ------------------------------------------------------------------------------- multi-class


def ce_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, label_smoothing: float = 0.0,
            class_weights: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """Softmax cross-entropy with optional label smoothing.

    class_weights scale each sample by the weight of its true class (Cui et al.'s class-balanced
    softmax loss); the mean is still over images, not over summed class weights as
    F.cross_entropy(weight=...) would do, so rare-class images really count more.
    """
    soft = targets.is_floating_point() and targets.ndim == 2  # mixup/cutmix give class probabilities
    per_sample = F.cross_entropy(logits.float(), targets.float() if soft else targets.long(), reduction="none",
                                 label_smoothing=label_smoothing)
    cw = _class_weights(class_weights, logits)
    if cw is not None:
        per_sample = per_sample * ((targets.float() * cw).sum(1) if soft else cw[targets.long()])
    return weighted_mean(per_sample, weight)


def complement_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N,) entropy of the predicted distribution over the non-target classes, divided by log(C-1).

    q_j = p_j / (1 - p_target) for j != target is exactly the softmax of the logits with the
    target's logit removed, so it is computed by masking that logit to -inf (no 1 - p division).
    Normalised to [0, 1]: 1 means the wrong classes are perfectly flat.
    """
    x = logits.float()
    c = x.shape[1]
    if c < 3:
        raise ValueError("complement entropy needs at least 3 classes (2 complement classes)")
    target_mask = F.one_hot(targets.long(), c).bool()
    log_q = torch.log_softmax(x.masked_fill(target_mask, float("-inf")), dim=1)
    # 0 * log 0 := 0 on the target column (q = 0 there, log_q = -inf).
    ent = -(log_q.exp() * log_q.masked_fill(target_mask, 0.0)).sum(1)
    return ent / math.log(c - 1)


def complement_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, coef: float = 1.0,
                    label_smoothing: float = 0.0) -> torch.Tensor:
    """Complement objective (COT, Chen et al. 2019; iNat seed): CE - coef * complement entropy.

    COT alternates a CE step with a step that maximises the complement entropy, "neutralising"
    the wrong classes. Here both go into one loss: minimising it raises the true class's
    likelihood and flattens the rest. The entropy is normalised by log(C-1), so coef=1 puts it on
    a 0..1 scale next to CE whatever the number of classes.
    """
    ce = F.cross_entropy(logits.float(), targets.long(), reduction="none", label_smoothing=label_smoothing)
    return weighted_mean(ce - coef * complement_entropy(logits, targets), weight)


# ------------------------------------------------------------------------------- selection

LOSSES: dict[str, tuple[LossFn, str]] = {
    "bce": (bce_loss, MULTILABEL),
    "bce_sum": (bce_sum_loss, MULTILABEL),
    "focal": (focal_loss, MULTILABEL),
    "asl": (asl_loss, MULTILABEL),
    "ce": (ce_loss, MULTICLASS),
    "complement": (complement_loss, MULTICLASS),
}


def get_loss(name: str, task: str, class_counts: Sequence[float] | None = None, cb_beta: float = 0.999,
             **params) -> LossFn:
    """Loss `name` for `task` ('multilabel' | 'multiclass') with its parameters bound.

    name 'auto' is 'bce' for multi-label and 'ce' for multi-class. `class_counts` (training
    examples per class) turn on class-balanced weights with `cb_beta` (losses taking
    class_weights only). Unknown names, parameters or a loss of the other task raise ValueError
    here, not at the first training step.
    """
    if task not in (MULTILABEL, MULTICLASS):
        raise ValueError(f"unknown task {task!r}; expected {MULTILABEL!r} or {MULTICLASS!r}")
    name = {"auto": "bce" if task == MULTILABEL else "ce"}.get(name, name)
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {sorted(LOSSES)} or 'auto'")
    fn, loss_task = LOSSES[name]
    if loss_task != task:
        fits = sorted(n for n, (_, t) in LOSSES.items() if t == task)
        raise ValueError(f"loss {name!r} does not fit a {task} task (it is {loss_task}); use one of {fits}")
    accepted = [p for p in inspect.signature(fn).parameters][3:]
    if class_counts is not None:
        if "class_weights" not in accepted:
            raise ValueError(f"loss {name!r} does not take class-balanced weights")
        if "class_weights" in params:
            raise ValueError("give class_counts or class_weights, not both")
        params["class_weights"] = class_balanced_weights(class_counts, cb_beta)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"loss {name!r} got unknown parameters {unknown}; it accepts {accepted}")
    if params.get("class_weights") is not None:
        params["class_weights"] = ClassWeights(params["class_weights"])
    return functools.partial(fn, **params) if params else fn
