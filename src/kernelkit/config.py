"""The one typed config. Defaults < preset < CONFIG block in kernel.py < command line."""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # what to run
    mode: str = _f("train", "train: train then predict | infer: predict from saved checkpoints")
    preset: str = _f("", "named preset applied under your settings (demo, ...)")
    data_dir: str = _f("", "competition folder; empty = find it under /kaggle/input, else run the demo")
    format: str = _f("auto", "auto | multilabel_csv | single_label_csv | folder")
    out_dir: str = _f("", "outputs (checkpoints, submission.csv); empty = /kaggle/working or ./outputs")
    checkpoints: str = _f("", "infer mode: checkpoint file, folder or glob")
    # model
    model: str = _f("resnet50", "timm model name")
    pretrained_path: str = _f("", "local weights file (.pth/.safetensors/.bin); empty = random init")
    drop_rate: float = _f(0.0, "dropout before the classifier")
    head: str = _f("linear", "linear | mlp (BatchNorm, Dense head_hidden, ReLU, Dropout: the Scene-15 head)")
    head_hidden: int = _f(256, "mlp head width")
    head_dropout: float = _f(0.5, "dropout in a custom head")
    model2: str = _f("", "second backbone whose pooled features are concatenated with the first (Helsinki ensemble)")
    pretrained_path2: str = _f("", "local weights of model2")
    freeze: float = _f(0.0, "share of training with the backbone frozen (head only): 1 = linear probe, "
                            "0.3 = two-stage fine-tune")
    unfreeze_blocks: int = _f(0, "after the frozen stage train the last N backbone blocks/stages (0 = all)")
    layer_decay: float = _f(0.0, "layer-wise LR decay, e.g. 0.75 (0 = off)")
    ema: float = _f(0.0, "EMA decay of the weights, e.g. 0.999; the EMA is validated and predicts (0 = off)")
    # images
    img_size: int = _f(224, "square input size")
    pad_aspect: float = _f(2.0, "pad to square when long/short side exceeds this (0 = always resize)")
    pad_fill: int = _f(255, "grey level of the padding (iMet seed pads with white)")
    aug: str = _f("light", "none | flip | light (flip + random resized crop) | medium (+ colour jitter) | "
                           "strong (+ shift/scale/rotate, noise)")
    gpu_aug: str = _f("", "batch augmentation on the training device: '' | flip | light | medium | strong "
                          "(use with aug='none' to take the work off the CPU workers)")
    mixup: float = _f(0.0, "mixup alpha (0 = off)")
    cutmix: float = _f(0.0, "cutmix alpha (0 = off); with both, each batch picks one")
    cache_images: bool = _f(True, "decode each training image once to img_size into a uint8 cache reused every epoch")
    cache_dir: str = _f("", "image cache folder; empty = /kaggle/temp on Kaggle (not saved as output), "
                            "else <out_dir>/cache")
    cache_max_gb: float = _f(15.0, "cap on the cache; images beyond it are decoded every epoch (0 = free disk)")
    # training
    budget: str = _f("8h30m", "wall-clock budget for the whole kernel, e.g. 9h, 8h30m, 90s")
    margin: str = _f("auto", "safety margin kept free at the end of the budget; auto = 2% + 2s, at most 10m")
    epochs: int = _f(0, "0 = as many as fit the budget (schedule over time); >0 = fixed epochs")
    batch_size: int = _f(32, "")
    lr: float = _f(1e-3, "peak AdamW learning rate")
    weight_decay: float = _f(0.05, "")
    warmup: float = _f(0.05, "fraction of training spent warming up")
    clip_grad: float = _f(0.0, "clip the gradient norm to this (0 = off)")
    schedule: str = _f("linear", "decay to zero at the end of training: linear | cosine")
    val_fraction: float = _f(0.1, "held-out share of train for validation and thresholds (0 = train on all)")
    fold: int = _f(-1, "K-fold: validate on this fold (0..n_folds-1) instead of val_fraction; -1 = off")
    n_folds: int = _f(5, "K-fold: number of folds (iterative stratification for multi-label)")
    loss: str = _f("auto", "auto (bce / ce) | bce | bce_sum | focal | asl | ce | complement")
    loss_args: str = _f("", "loss parameters, e.g. 'gamma=2,reduce=sum' (focal) or 'label_smoothing=0.1'")
    class_balanced: bool = _f(False, "weight classes by effective number of samples (Cui et al. 2019)")
    balanced_sampling: float = _f(0.0, "draw images ~ 1/count(class)^this (0 = plain shuffle, 0.5 = sqrt, 1 = equal)")
    amp: bool = _f(True, "mixed precision on GPU")
    channels_last: bool = _f(True, "")
    num_workers: int = _f(-1, "-1 = all CPU cores")
    mp_context: str = _f("", "DataLoader worker start method: '' (default) | spawn | forkserver | fork")
    seed: int = _f(42, "")
    ddp_procs: int = _f(0, "data-parallel processes: 0 = one per GPU when several are visible (T4 x2), 1 = off")
    ddp_backend: str = _f("", "'' = nccl on GPU, gloo on CPU")
    checkpoint_every: str = _f("20m", "also save last.pt at this wall-clock interval")
    resume: bool = _f(True, "continue an unfinished run from out_dir/last.pt (its time counts against the budget)")
    resume_from: str = _f("", "continue from this checkpoint of an earlier session (e.g. an attached dataset); "
                              "the budget is what this session has left")
    max_train_images: int = _f(0, "use only this many training images (0 = all); for quick runs")
    # inference
    tta: int = _f(2, "test-time augmentation views: 1 = none, 2 = + horizontal flip")
    beta: float = _f(2.0, "multi-label metric: F-beta averaged per image (iMet: 2)")
    threshold: float = _f(-1.0, "multi-label threshold; <0 = search on validation")
    threshold_rule: str = _f("global", "multi-label search: global | group (by 'prefix::' of label names) | class")
    min_labels: int = _f(0, "multi-label: always emit at least this many labels per image")
    max_labels: int = _f(0, "multi-label: at most this many labels per image (0 = no cap)")
    # demo
    demo_images: int = _f(1000, "demo: number of generated training images")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def pretty(self) -> str:
        return "\n".join(f"  {k:<18} = {v!r}" for k, v in self.to_dict().items())


# One preset per seed project (shared/seeds/): what the seed did, with a current timm backbone.
# Attach ImageNet weights for the backbone and set pretrained_path; everything else is set here.
PRESETS: dict[str, dict[str, Any]] = {
    "demo": dict(
        model="resnet18", img_size=64, batch_size=32, lr=2e-3, budget="150s",
        aug="flip", pad_aspect=2.0, val_fraction=0.2, checkpoint_every="1m", tta=2, warmup=0.05,
    ),
    # iMet 2019 (seeds 000, 001): 1103 culture/tag labels, F2 per image, odd aspect ratios padded
    # to square with white, focal loss, best threshold searched on validation (here per group:
    # culture:: and tag:: labels get their own), at least one label per image, 9-hour kernel.
    "imet2019": dict(
        format="multilabel_csv", model="convnext_tiny.fb_in22k", img_size=320, batch_size=32, lr=4e-4,
        layer_decay=0.8,
        pad_aspect=2.0, pad_fill=255, aug="light", loss="focal", loss_args="gamma=2", beta=2.0,
        threshold_rule="group", min_labels=1, budget="8h45m", tta=2, val_fraction=0.1,
    ),
    # iNaturalist 2019 (seed 002): 1010 species, one label each, top-1 error, 560 px inputs,
    # complement entropy next to cross-entropy, class-balanced weights for the long tail.
    "inat2019": dict(
        format="single_label_csv", model="efficientnet_b3.ra2_in1k", img_size=560, batch_size=16, lr=3e-4,
        pad_aspect=0.0, aug="light", loss="complement", balanced_sampling=0.5, budget="8h45m", tta=2,
        val_fraction=0.05,
    ),
    # Scene-15 (seed 003): folder per class, 15 scenes, ResNet-101 transfer learning, 70/30 split,
    # shift/zoom/flip augmentation, accuracy.
    "scene15": dict(
        format="folder", model="resnet101.a1h_in1k", img_size=224, batch_size=32, lr=3e-4, aug="light",
        loss="ce", val_fraction=0.3, tta=2, budget="2h", pad_aspect=0.0,
        head="mlp", head_hidden=256, head_dropout=0.5, freeze=0.3, unfreeze_blocks=2,
    ),
    # Helsinki 14 tags (seed 004): 128 px photos with zero or more of 14 labels (half have none),
    # sum of per-label BCE with the seed's 0.99p + 0.005 clamp, F1 / precision / recall.
    "helsinki14": dict(
        format="multilabel_csv", model="resnet50.a1_in1k", img_size=128, batch_size=64, lr=1e-3, aug="light",
        loss="bce_sum", loss_args="eps=0.005", beta=1.0, min_labels=0, threshold_rule="class", tta=2,
        budget="2h", val_fraction=0.15, pad_aspect=0.0,
        model2="efficientnet_b0.ra_in1k", freeze=0.2, ema=0.999,
    ),
}


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([hms]?)")


def parse_duration(text: str | float | int) -> float:
    """'9h', '8h30m', '90s', '1.5h', '600' -> seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    s = text.strip().lower().replace(" ", "")
    if not s:
        raise ValueError("empty duration")
    pos, total = 0, 0.0
    for m in _DURATION.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * {"h": 3600, "m": 60, "s": 1, "": 1}[m.group(2)]
        pos = m.end()
    if pos != len(s):
        raise ValueError(f"cannot parse duration {text!r}; use e.g. 9h, 8h30m, 90s")
    return total


def _coerce(value: str, typ: Any) -> Any:
    if typ in (bool, "bool"):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {value!r}")
    return {"int": int, "float": float, "str": str}.get(typ, typ)(value) if isinstance(typ, str) else typ(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Kaggle image-classification kernel")
    for f in fields(Config):
        typ = f.type if not isinstance(f.type, str) else f.type
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None,
                       help=f"{f.metadata.get('help', '')} (default {f.default!r})",
                       type=lambda v, t=typ: _coerce(v, t))
    p.add_argument("--dry-run", action="store_true", help="short local run that reports throughput")
    return p


def make_config(block: dict[str, Any] | None = None, argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """Merge defaults, the named preset, the CONFIG block and command-line flags, in that order."""
    args = build_parser().parse_args(argv)
    cli = {k: v for k, v in vars(args).items() if v is not None and k in Config.__dataclass_fields__}
    block = dict(block or {})
    preset = cli.get("preset", block.get("preset", ""))
    merged: dict[str, Any] = {}
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        merged.update(PRESETS[preset])
    merged.update(block)
    merged.update(cli)
    cfg = Config.from_dict(merged)
    budget_seconds(cfg), parse_duration(cfg.checkpoint_every), parse_kwargs(cfg.loss_args)
    return cfg, args


def parse_kwargs(text: str) -> dict[str, Any]:
    """'gamma=2,reduce=sum' -> {'gamma': 2.0, 'reduce': 'sum'}."""
    out: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"cannot parse {item!r} in {text!r}; use key=value pairs separated by commas")
        value = value.strip()
        try:
            out[key.strip()] = float(value)
        except ValueError:
            out[key.strip()] = {"true": True, "false": False, "none": None}.get(value.lower(), value)
    return out


def budget_seconds(cfg: Config) -> tuple[float, float]:
    """-> (budget, margin) in seconds; the margin must leave time to work with."""
    total = parse_duration(cfg.budget)
    # Fixed costs (interpreter exit, worker teardown) dominate short runs, a share of the budget long ones.
    margin = min(600.0, 0.02 * total + 2.0) if cfg.margin == "auto" else parse_duration(cfg.margin)
    if total <= 0 or margin >= total:
        raise ValueError(f"budget {cfg.budget!r} must be positive and larger than margin {cfg.margin!r}")
    return total, margin
