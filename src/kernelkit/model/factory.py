"""timm models by name, optional custom heads and feature concatenation, freezing by blocks.

Pretrained weights only ever come from a local file.
"""
from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from torch import nn

from ..core import env  # noqa: F401  (sets HF_HUB_OFFLINE before timm is imported)
from ..core.weights import resolve_weights, weights_given
from ..data.images import RECT_ASPECTS, rect_bucket
from ..data.transforms import Preprocess

log = logging.getLogger("kernelkit")

HEADS = ("linear", "mlp")


def create_model(name: str, num_classes: int, pretrained_path: str = "", drop_rate: float = 0.0) -> nn.Module:
    """Build `name` with a fresh `num_classes` head (num_classes=0: pooled features only).

    With `pretrained_path`, timm loads that file through `pretrained_cfg_overlay` and drops the
    classifier when its size differs, so ImageNet weights give a new head for our classes.
    """
    if name not in timm.list_models() and not timm.is_model(name):
        raise ValueError(f"timm has no model {name!r} (timm {timm.__version__})")
    kwargs = dict(num_classes=num_classes, drop_rate=drop_rate)
    if weights_given(pretrained_path):
        if not Path(pretrained_path).exists():
            raise FileNotFoundError(
                f"pretrained_path {pretrained_path} not found; attach the weights as a Kaggle dataset and point to the file")
        src = resolve_weights(pretrained_path)
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=src.overlay(), **kwargs)
        log.info("loaded pretrained weights from %s%s", src.file,
                 f" ({src.architecture}, {src.num_classes} classes)" if src.architecture else "")
    else:
        model = timm.create_model(name, pretrained=False, **kwargs)
    return model


def preprocess_of(model: nn.Module) -> Preprocess:
    """The input statistics the model's weights expect (timm's data config: 0.5/0.5 for many ViTs,
    the CLIP mean for CLIP weights, ImageNet's for most CNNs); the first backbone's for a feature-head model."""
    from timm.data import resolve_data_config
    backbone = model.backbones[0] if isinstance(model, FeatureHeadModel) else model
    dc = resolve_data_config({}, model=backbone)
    return Preprocess(tuple(float(v) for v in dc["mean"]), tuple(float(v) for v in dc["std"]),
                      str(dc.get("interpolation", "bilinear")))


class FeatureHeadModel(nn.Module):
    """Pooled features of one or more backbones, concatenated, under one trained head.

    head 'mlp' is the Scene-15 seed's BatchNorm -> Dense(hidden) -> ReLU -> Dropout -> Dense;
    two backbones are the Helsinki seed's ensemble of concatenated transfer features.
    """

    def __init__(self, backbones: list[nn.Module], num_classes: int, head: str = "linear", hidden: int = 256,
                 dropout: float = 0.5):
        super().__init__()
        self.backbones = nn.ModuleList(backbones)
        dim = sum(b.num_features for b in backbones)
        if head == "linear":
            self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, num_classes))
        elif head == "mlp":
            self.head = nn.Sequential(nn.BatchNorm1d(dim), nn.Linear(dim, hidden), nn.ReLU(inplace=True),
                                      nn.Dropout(dropout), nn.Linear(hidden, num_classes))
        else:
            raise ValueError(f"unknown head {head!r}; choose from {HEADS}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([b(x) for b in self.backbones], dim=1))


def build_model(name: str, num_classes: int, pretrained_path: str = "", drop_rate: float = 0.0,
                head: str = "linear", head_hidden: int = 256, head_dropout: float = 0.5,
                second_model: str = "", second_pretrained_path: str = "") -> nn.Module:
    """The plain timm model when that is all that is asked, else a FeatureHeadModel."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose from {HEADS}")
    if head == "linear" and not second_model:
        return create_model(name, num_classes, pretrained_path, drop_rate)
    backbones = [create_model(name, 0, pretrained_path)]
    if second_model:
        backbones.append(create_model(second_model, 0, second_pretrained_path))
    return FeatureHeadModel(backbones, num_classes, head, head_hidden, head_dropout)


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    if isinstance(model, FeatureHeadModel):
        return list(model.head.parameters())
    return list(model.get_classifier().parameters())


def backbone_blocks(model: nn.Module) -> list[list[nn.Parameter]]:
    """Backbone parameters in timm's coarse groups (stem, stage 1, ..., last stage), input first.

    With several backbones the i-th group from the end of each one is merged, so "the last N
    blocks" means the last N of every backbone.
    """
    from timm.models import group_parameters
    backbones = model.backbones if isinstance(model, FeatureHeadModel) else [model]
    head_ids = {id(p) for p in head_parameters(model)}
    per_backbone = []
    for b in backbones:
        groups = group_parameters(b, b.group_matcher(coarse=True))
        blocks = [[b.get_parameter(n) for n in names] for _, names in sorted(groups.items())]
        per_backbone.append([[p for p in blk if id(p) not in head_ids] for blk in blocks])
    depth = max(len(g) for g in per_backbone)
    merged = []
    for i in range(depth, 0, -1):  # align from the output end
        merged.append([p for g in per_backbone if len(g) >= i for p in g[-i]])
    return [blk for blk in merged if blk]


FROZEN_MARK = "kernelkit_frozen"  # an attribute, so copies of the model (EMA, SWA) keep it


HIGH_RESOLUTION = -1  # freeze_early: the stem and every stage at stride <= 4 (frozen_stages=auto with weights)


def high_resolution_parameters(model: nn.Module, max_stride: int = 4) -> list[nn.Parameter]:
    """Parameters from the input up to the last stage whose output stride is <= `max_stride` (timm's
    feature_info): lite0's stem + 2 stages, a ResNet's stem + layer1 (mmdetection's frozen_stages=1),
    a ConvNeXt's stem + stage 0, nothing for a ViT (stride 16 from its first layer)."""
    info = getattr(model, "feature_info", None)
    try:
        last = [f["module"] for f in info if f["reduction"] <= max_stride][-1] if info else None
    except (TypeError, KeyError, IndexError):
        return []
    named = list(model.named_parameters())
    inside = [i for i, (n, _) in enumerate(named) if n.startswith(f"{last}.")] if last else []
    if not inside or inside[-1] >= len(named) - 1:
        return []
    return [p for _, p in named[:inside[-1] + 1]]


def freeze_early(model: nn.Module, stages: int) -> int:
    """Freeze the stem and the first `stages` backbone stages (HIGH_RESOLUTION: those at stride <= 4)
    for the whole run (the last stage always trains); their BatchNorm layers are marked to keep the
    pretrained statistics (`hold_frozen_norms`). Why: the early stages run at the highest resolution,
    so their backward pass is much of a step's cost (lite0 at 160 px on 2 CPU cores, stem + 2 stages
    frozen, 16k of its 3.4M parameters: 83 against 50 images/s in training), while their features (edges, colours)
    transfer as they are. -> parameters frozen."""
    if stages == HIGH_RESOLUTION:
        frozen = {id(p) for p in high_resolution_parameters(model)}
    elif stages > 0:
        groups = backbone_blocks(model)
        frozen = {id(p) for blk in groups[:min(stages + 1, len(groups) - 1)] for p in blk}
    else:
        return 0
    for p in model.parameters():
        if id(p) in frozen:
            p.requires_grad_(False)
            setattr(p, FROZEN_MARK, True)
    for m in model.modules():
        own = list(m.parameters(recurse=False))
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and own and all(id(p) in frozen for p in own):
            setattr(m, FROZEN_MARK, True)
    return sum(p.numel() for p in model.parameters() if id(p) in frozen)


# input_mode rect: a batch holds one aspect bucket, so in training BatchNorm normalises with that bucket's
# statistics (a batch of crowded square frames unlike a batch of sparse strips), while one running
# average of all buckets served every image at evaluation. Measured on the hard task (lite0, 192 px, a
# rect run's best.pt): statistics recomputed per bucket lifted its square frames from 0.870 to 0.943 F2,
# the 1:5 strips from 0.948 to 0.984. So each BatchNorm layer keeps running statistics per bucket of its
# input's shape, as buffers (checkpoints, EMA and resume carry them), used in training and evaluation alike.
BUCKET_NORM_MARK = "kernelkit_bucket_norms"
BUCKET_COUNTS, BUCKET_MOMENTUM = "kernelkit_bucket_counts", "kernelkit_bn_momentum"


def _slot(bucket: int, what: str) -> str:
    return f"rect_{what}_{'p' if bucket < 0 else ''}{abs(bucket)}"  # (buffer names cannot hold '-')


BUCKETS = range(-(len(RECT_ASPECTS) - 1), len(RECT_ASPECTS))  # images.rect_bucket's values, portrait < 0


def bucket_norms(model: nn.Module) -> nn.Module:
    """Every tracking BatchNorm layer of `model` with running statistics per rect bucket (each starting
    from the layer's own), chosen by the shape of the layer's input. -> model (changed in place)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None:
            for b in BUCKETS:
                m.register_buffer(_slot(b, "mean"), m.running_mean.detach().clone())
                m.register_buffer(_slot(b, "var"), m.running_var.detach().clone())
            m.register_forward_pre_hook(_load_bucket_stats)
            m.register_forward_hook(_keep_bucket_stats)
            setattr(m, BUCKET_NORM_MARK, True)
    return model


def _bucket_of(x: torch.Tensor) -> int:
    return rect_bucket(x.shape[-1], x.shape[-2])  # shapes only: nothing read from the device


@torch.no_grad()
def _load_bucket_stats(m: nn.Module, args: tuple) -> None:
    b = _bucket_of(args[0])
    m.running_mean.copy_(m._buffers[_slot(b, "mean")])
    m.running_var.copy_(m._buffers[_slot(b, "var")])
    if m.training and m.momentum is not None:
        # A bucket sees a few batches an epoch: at the usual 0.1 a rare one would keep a tenth of the
        # weights' ImageNet statistics to the end of a short run (one 300 s run: its 1:3-1:5 strips scored
        # 0.945 F2, 0.98 with one average). Its first batches are averaged (momentum 1/n), then 0.1.
        counts = m.__dict__.setdefault(BUCKET_COUNTS, {})  # per process: a resumed run re-averages its first
        counts[b] = n = counts.get(b, 0) + 1
        base = m.__dict__.setdefault(BUCKET_MOMENTUM, m.momentum)  # (kept if a failed forward left it set)
        m.momentum = max(base, 1.0 / n)


@torch.no_grad()
def _keep_bucket_stats(m: nn.Module, args: tuple, out) -> None:
    if m.training:  # this step updated the running statistics: they are its bucket's
        b = _bucket_of(args[0])
        m._buffers[_slot(b, "mean")].copy_(m.running_mean)
        m._buffers[_slot(b, "var")].copy_(m.running_var)
        m.momentum = m.__dict__.pop(BUCKET_MOMENTUM, m.momentum)


def merge_bucket_norms(model: nn.Module, copies: tuple[nn.Module, ...], sum_over_ranks) -> None:
    """Data-parallel ranks keep per-bucket statistics of their own batches (buffers are not synced each
    step), and a rare bucket's one batch an epoch lands on one rank: every rank takes, per layer and
    bucket, the average over the ranks that trained on it, weighted by their batch counts (a rank that
    never saw the bucket still holds the weights' statistics there, which must not count), in `model`
    and in `copies` (the EMA) alike. `sum_over_ranks(tensor) -> tensor`: the collective; every rank
    calls this at the same point. Device tensors only: nothing is read back to the host."""
    slots = [(b, _slot(b, "mean"), _slot(b, "var")) for b in BUCKETS]
    pieces = []  # (layer, its statistics (buckets, 2, C), this rank's batches per bucket (buckets, 1, 1))
    for name, m in model.named_modules():
        if getattr(m, BUCKET_NORM_MARK, False):
            counts = m.__dict__.get(BUCKET_COUNTS, {})
            for layer in (m, *(other.get_submodule(name) for other in copies)):
                stats = torch.stack([torch.stack([layer._buffers[mean], layer._buffers[var]]) for _, mean, var in slots])
                weight = torch.tensor([float(counts.get(b, 0)) for b, _, _ in slots], device=stats.device)
                pieces.append((layer, stats.float(), weight[:, None, None]))
    if not pieces:
        return
    summed = sum_over_ranks(torch.cat([torch.cat([(s * w).flatten(), w.flatten()]) for _, s, w in pieces]))
    at = 0
    for layer, stats, weight in pieces:
        total = summed[at:at + stats.numel()].view_as(stats)
        at += stats.numel()
        weights = summed[at:at + weight.numel()].view_as(weight)
        at += weight.numel()
        merged = torch.where(weights > 0, total / weights.clamp_min(1e-12), stats)
        for (_, mean, var), (new_mean, new_var) in zip(slots, merged):
            layer._buffers[mean].copy_(new_mean)
            layer._buffers[var].copy_(new_var)


def hold_frozen_norms(model: nn.Module) -> None:
    """After `model.train()`: frozen BatchNorm layers normalise with their stored statistics and do not
    update them (a frozen stage whose statistics drift would feed the later stages inputs they were
    not trained on, and small batches make the drift large)."""
    for m in model.modules():
        if getattr(m, FROZEN_MARK, False):
            m.eval()


def set_trainable(model: nn.Module, blocks: int | None) -> int:
    """Train the head plus the last `blocks` backbone blocks (None: everything, 0: head only,
    i.e. a linear probe); what `freeze_early` froze stays frozen. -> number of trainable parameters."""
    early = {id(p) for p in model.parameters() if getattr(p, FROZEN_MARK, False)}
    for p in model.parameters():
        p.requires_grad_(blocks is None and id(p) not in early)
    if blocks is not None:
        for p in head_parameters(model):
            p.requires_grad_(True)
        for blk in backbone_blocks(model)[len(backbone_blocks(model)) - blocks:] if blocks else []:
            for p in blk:
                p.requires_grad_(id(p) not in early)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def create_optimizer(model: nn.Module, lr: float, weight_decay: float, layer_decay: float = 0.0):
    """AdamW without weight decay on norms and biases; layer_decay < 1 scales each block's LR by
    layer_decay ** (depth from the top), stored as the group's `lr_scale`.

    On a GPU the fused AdamW kernel: one launch for all parameters instead of several per tensor,
    and with a GradScaler it skips an overflowing step on the device, without the host sync (and
    the GPU idle time) that checking found_inf on the CPU costs every step."""
    import timm.optim
    if layer_decay and isinstance(model, FeatureHeadModel):
        raise ValueError("layer_decay needs the plain timm model (head='linear', no second backbone)")
    kwargs = dict(opt="adamw", lr=lr, weight_decay=weight_decay, layer_decay=layer_decay or None)
    params = list(model.parameters())
    if params and all(p.is_cuda and p.is_floating_point() for p in params):
        try:
            return timm.optim.create_optimizer_v2(model, fused=True, **kwargs)
        except (TypeError, RuntimeError, ValueError) as e:  # an older torch without fused AdamW
            log.info("fused AdamW unavailable (%s); using the default implementation", e)
    return timm.optim.create_optimizer_v2(model, **kwargs)


def ema_decay(target: float, updates: int) -> float:
    """The decay after `updates` updates: (1 + n) / (10 + n), capped at the target. With a fixed 0.999
    a run of a few hundred steps keeps an average of mostly the random initial weights, and that
    average is what validates and predicts (the helsinki14 preset stayed at the label prior)."""
    return min(target, (1.0 + updates) / (10.0 + updates))


def create_ema(model: nn.Module, decay: float):
    """Exponential moving average of the weights (timm's), decay warmed up by `ema_decay`, or None
    when decay is 0. `updates` counts the updates (restored from the step on resume)."""
    if not decay:
        return None
    from timm.utils import ModelEmaV2
    base = getattr(timm.utils, "ModelEmaV3", ModelEmaV2)

    class WarmupEma(base):  # the base class depends on the timm version (V3 appeared in 1.0)
        def __init__(self, model: nn.Module, target: float):
            super().__init__(model, decay=target)
            self.target, self.updates = target, 0

        @torch.no_grad()
        def update(self, model: nn.Module, *args, **kwargs) -> None:
            # timm's own warmup (V3 only) needs a step argument our loop does not pass
            self.decay = ema_decay(self.target, self.updates)
            super().update(model)
            self.updates += 1

    return WarmupEma(model, decay)
