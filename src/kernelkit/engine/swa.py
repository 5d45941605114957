"""Cheap weight averaging over the end of the schedule (SWA: Izmailov et al., "Averaging Weights
Leads to Wider Optima and Better Generalization", UAI 2018).

Over the last `swa` share of the schedule every step's weights go into a running average
(buffers included, so the average is usable even if the BatchNorm pass is skipped). The container
is `torch.optim.swa_utils.AveragedModel` (its state_dict format), but the update is ours: its
update_parameters sends integer buffers (BatchNorm's num_batches_tracked) through
`_foreach_addcdiv_` on CUDA, which raises on the second update, and reads `n_averaged` on the host
twice per step. Here floating tensors are averaged with one foreach lerp, integer ones copied, and
the count is a host integer. After training, the average's BatchNorm statistics are recomputed on a
few training batches (the averaged weights never produced the running statistics they carry), it is
validated, and it replaces best.pt only when it scores at least as well as the last and the best
weights. The BatchNorm pass and the extra validation are charged to the inference reserve up front.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel

from ..data.loaders import loader_tiles
from ..data.transforms import Preprocess, fold_tiles, normalize
from ..decide.rules import score_validation
from ..model.factory import BUCKET_NORM_MARK, FROZEN_MARK, hold_frozen_norms
from .evaluate import autocast, predict

log = logging.getLogger("kernelkit")

BN_BATCHES = 50  # enough batches for stable BatchNorm statistics; the pass costs about one forward each


class WeightAverage:
    """The running average of the weights from progress `1 - share` on."""

    def __init__(self, model: torch.nn.Module, share: float, bn_batches: int = BN_BATCHES):
        self.share, self.start, self.bn_batches = share, 1.0 - share, bn_batches
        self.avg = AveragedModel(model, use_buffers=True)
        self.count = 0  # snapshots averaged, on the host (avg.n_averaged mirrors it on the device)

    @property
    def module(self) -> torch.nn.Module:
        return self.avg.module

    @property
    def n(self) -> int:
        return self.count

    def update(self, model: torch.nn.Module, progress: float) -> None:
        if progress >= self.start:
            average_into(self.avg.module, model, self.count)
            self.count += 1
            self.avg.n_averaged.fill_(self.count)  # a device-side fill, no host read

    def state_dict(self) -> dict[str, Any]:
        return self.avg.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.avg.load_state_dict(state)
        self.count = int(self.avg.n_averaged)  # once, on resume

    def extra_images(self, train_loader: Any, n_val: int) -> tuple[int, int]:
        """-> (images, loader start-ups) the conclusion costs beyond the final validation."""
        per = train_loader.batch_size or getattr(getattr(train_loader, "batch_sampler", None), "batch_size", 1) or 1
        bn = min(len(train_loader), self.bn_batches) * per if has_batchnorm(self.module) else 0
        return bn + n_val, 1 + int(bn > 0)


@torch.no_grad()
def average_into(avg: torch.nn.Module, model: torch.nn.Module, n: int) -> None:
    """avg <- (n avg + model) / (n + 1) for floating parameters and buffers (one foreach lerp per
    device and dtype); integer buffers (num_batches_tracked) are copied, never divided."""
    groups: dict[tuple, tuple[list, list]] = {}
    pairs = zip(list(avg.parameters()) + list(avg.buffers()), list(model.parameters()) + list(model.buffers()))
    for a, m in pairs:
        a, m = a.detach(), m.detach()
        if n == 0 or not a.is_floating_point():
            a.copy_(m)
        else:
            dst, src = groups.setdefault((a.device, a.dtype), ([], []))
            dst.append(a)
            src.append(m.to(a.device, non_blocking=True))
    for dst, src in groups.values():
        torch._foreach_lerp_(dst, src, 1.0 / (n + 1))


def create_averager(model: torch.nn.Module, share: float) -> WeightAverage | None:
    return WeightAverage(model, share) if share > 0 else None


def has_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def recompute_batchnorm(model: torch.nn.Module, loader: Any, device: torch.device, channels_last: bool,
                        pre: Preprocess, max_batches: int, amp: bool = True,
                        amp_dtype: torch.dtype = torch.float16) -> int:
    """Running statistics of every BatchNorm layer from `max_batches` training batches (a cumulative
    average, as torch.optim.swa_utils.update_bn does, but on this package's uint8 batches).
    -> the number of batches used (0: the model has no BatchNorm)."""
    # Frozen stages keep the statistics they trained with; per-bucket statistics (rect) keep their averages
    # over the snapshots: one cumulative count cannot average a dozen buckets' batches.
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
              and not getattr(m, FROZEN_MARK, False) and not getattr(m, BUCKET_NORM_MARK, False)]
    if not layers:
        return 0
    momenta = {m: m.momentum for m in layers}
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches seen
    was_training, used = model.training, 0
    model.train()
    hold_frozen_norms(model)
    tiles = loader_tiles(loader)
    with torch.no_grad():
        for x, _, _ in loader:
            if used >= max_batches:
                break
            with autocast(device, amp, amp_dtype):
                model(normalize(fold_tiles(x.to(device, non_blocking=True), tiles)[0], channels_last, pre))
            used += 1
    for m, momentum in momenta.items():
        m.momentum = momentum
    model.train(was_training)
    return used


def conclude_average(avg: WeightAverage, train_loader: Any, val: Any, device: torch.device, opts: Any,
                     best_score: float, last_score: float | None) -> dict | None:
    """BatchNorm pass, validation, verdict. -> {"score", "threshold", "probs", "use"}: `use` when the
    average should predict (probs None: no validation set, so it predicts unvalidated, as SWA is
    meant to); None when there was nothing to average."""
    if avg.n < 2:
        log.info("weight average: %d snapshot(s) in the last %.0f%% of the schedule, nothing to average",
                 avg.n, 100 * avg.share)
        return None
    batches = recompute_batchnorm(avg.module, train_loader, device, opts.channels_last, opts.preprocess,
                                  avg.bn_batches, opts.amp, opts.amp_dtype)
    if val is None or not len(val.targets):
        log.info("weight average of %d snapshots (BatchNorm from %d batches); no validation set: it predicts",
                 avg.n, batches)
        return {"score": None, "threshold": None, "probs": None, "use": True}
    out = predict(avg.module, val.loader, device, val.task, amp=opts.amp, channels_last=opts.channels_last,
                  desc="validate average", pre=opts.preprocess, amp_dtype=opts.amp_dtype)
    va = score_validation(val.task, val.targets, out["probs"], opts.threshold, opts.beta, opts.min_labels,
                          opts.max_labels)
    bar = max(s for s in (best_score, last_score) if s is not None)
    use = va["score"] >= bar
    log.info("weight average of %d snapshots (BatchNorm from %d batches): val %s %.4f; last weights %s, best "
             "epoch %.4f -> %s", avg.n, batches, va["metric"], va["score"],
             "n/a" if last_score is None else f"{last_score:.4f}", best_score,
             "the average predicts" if use else "kept the trained weights")
    return {"score": va["score"], "threshold": va["threshold"], "probs": out["probs"].astype(np.float32), "use": use}
