"""Checking a config: every option at once, so one run shows every mistake (`validate`), the type
of each CONFIG-block or preset value, unknown keys with the closest known one, the budget against
the margin, and the weights files against the model they are for. `checked_config` is the one way
from user input (a dict) to a Config that passed. Raises ConfigError (exit 2) naming each option."""
from __future__ import annotations

import difflib
from dataclasses import fields
from pathlib import Path
from typing import Any

from .config import (
    AUTO_ZERO,
    CHOICES,
    DURATIONS,
    PRESETS,
    TYPE_WORDS,
    Config,
    ConfigError,
    field_types,
    parse_duration,
    parse_kwargs,
)
from .weights import fixed_size_architecture, resolve_weights, same_architecture, weights_given


def checked_config(d: dict[str, Any], where: str = "config", check_paths: bool = True) -> Config:
    """A config from user input: unknown keys, wrong types and out-of-range values are refused.
    check_paths=False skips the files that only exist where the kernel runs (build time)."""
    refuse_unknown_keys(d, where)
    cfg = Config(**{k: _normalise(k, v) for k, v in d.items()})
    fill_architecture(cfg)
    validate(cfg, check_paths=check_paths)
    return cfg


def refuse_unknown_keys(d: dict[str, Any], where: str) -> None:
    known = [f.name for f in fields(Config)]
    problems = []
    for key in sorted(set(d) - set(known)):
        close = difflib.get_close_matches(str(key), known, n=2)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        problems.append(f"unknown {where} key {key!r}{hint}")
    if problems:
        raise ConfigError("; ".join(problems) + f". Known keys: {', '.join(known)}")


def _normalise(key: str, value: Any) -> Any:
    """Type check of one CONFIG-block or preset value: ints stay ints, a string is never a number."""
    typ = field_types()[key]
    if key in AUTO_ZERO and value == "auto":
        return 0
    if typ == "bool" and isinstance(value, bool):
        return value
    if typ == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if typ == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if typ == "str" and isinstance(value, str):
        return value
    if typ == "str" and key in DURATIONS and isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value}s"  # budget=3600 means seconds
    raise ConfigError(f"{key}={value!r}: expected {TYPE_WORDS[typ]}, got {type(value).__name__}")


def _range_problems(c: Config) -> list[str]:
    """(condition that must hold, what the user is told) for every numeric option."""
    rules = [
        (c.batch_size >= 1, f"batch_size={c.batch_size}: must be >= 1"),
        (c.img_size == 0 or 8 <= c.img_size <= 4096,
         f"img_size={c.img_size}: must be 0 (auto) or between 8 and 4096 pixels"),
        (c.auto_min_epochs >= 1, f"auto_min_epochs={c.auto_min_epochs}: must be >= 1"),
        (not (c.model == "auto" and weights_given(c.pretrained_path)),
         "pretrained_path is a weights file of one architecture: set model= to it (model='auto' picks by speed; "
         "a timm folder with config.json names its architecture itself)"),
        (1 <= c.tta <= 4, f"tta={c.tta}: must be 1 (no TTA), 2 (+ flip), 3 or 4 views"),
        (c.epochs >= 0, f"epochs={c.epochs}: must be >= 0 (0 = as many as fit the budget)"),
        (c.n_folds >= 2, f"n_folds={c.n_folds}: must be >= 2"),
        (-1 <= c.fold < c.n_folds, f"fold={c.fold}: must be -1 (off) or 0..{c.n_folds - 1} (n_folds={c.n_folds})"),
        (0 <= c.val_fraction < 1, f"val_fraction={c.val_fraction}: must be in [0, 1) (0 = train on everything)"),
        (c.threshold == -1 or 0 <= c.threshold <= 1, f"threshold={c.threshold}: must be -1 (search) or in [0, 1]"),
        (0 <= c.warmup < 1, f"warmup={c.warmup}: a share of training, in [0, 1)"),
        (c.label_smoothing == -1 or 0 <= c.label_smoothing < 1,
         f"label_smoothing={c.label_smoothing}: -1 (auto) or in [0, 1)"),
        (c.lr > 0, f"lr={c.lr}: must be > 0"),
        (c.weight_decay >= 0, f"weight_decay={c.weight_decay}: must be >= 0"),
        (0 <= c.drop_rate < 1 and 0 <= c.head_dropout < 1, "drop_rate and head_dropout must be in [0, 1)"),
        (0 <= c.freeze <= 1, f"freeze={c.freeze}: a share of training, in [0, 1]"),
        (0 <= c.layer_decay <= 1, f"layer_decay={c.layer_decay}: 0 (off) or in (0, 1]"),
        (0 <= c.ema < 1, f"ema={c.ema}: 0 (off) or a decay in (0, 1), e.g. 0.999"),
        (0 <= c.swa < 1, f"swa={c.swa}: 0 (off) or the share of the schedule to average over, in (0, 1), e.g. 0.25"),
        (1 <= c.sessions <= 100, f"sessions={c.sessions}: must be between 1 and 100"),
        (not c.epochs or c.epochs >= c.sessions,
         f"epochs={c.epochs} cannot be split over sessions={c.sessions}: need epochs >= sessions (or epochs=0)"),
        (c.pad_aspect == 0 or c.pad_aspect >= 1, f"pad_aspect={c.pad_aspect}: 0 (always resize) or >= 1"),
        (0 <= c.pad_fill <= 255, f"pad_fill={c.pad_fill}: a grey level in 0..255"),
        (c.resize_start == 0 or 0.25 <= c.resize_start < 1,
         f"resize_start={c.resize_start}: 0 (off) or a fraction of img_size in [0.25, 1), e.g. 0.5"),
        (0 < c.resize_full_at <= 1, f"resize_full_at={c.resize_full_at}: a share of the schedule in (0, 1]"),
        (c.mixup >= 0 and c.cutmix >= 0, "mixup and cutmix alphas must be >= 0"),
        (c.clip_grad >= 0, f"clip_grad={c.clip_grad}: must be >= 0 (0 = off)"),
        (0 <= c.balanced_sampling <= 1, f"balanced_sampling={c.balanced_sampling}: must be in [0, 1]"),
        (c.cache_max_gb >= 0, f"cache_max_gb={c.cache_max_gb}: must be >= 0"),
        (c.output_cap_gb >= -1, f"output_cap_gb={c.output_cap_gb}: -1 (auto), 0 (none) or a size in GB"),
        (c.num_workers >= -1, f"num_workers={c.num_workers}: -1 (all cores) or >= 0"),
        (c.ddp_procs >= 0, f"ddp_procs={c.ddp_procs}: must be >= 0"),
        (c.min_labels >= 0 and c.max_labels >= 0, "min_labels and max_labels must be >= 0"),
        (not c.max_labels or c.min_labels <= c.max_labels,
         f"min_labels={c.min_labels} > max_labels={c.max_labels}"),
        (c.beta > 0, f"beta={c.beta}: must be > 0"),
        (c.head_hidden >= 1 and c.unfreeze_blocks >= 0, "head_hidden must be >= 1 and unfreeze_blocks >= 0"),
        (c.frozen_stages >= -1, f"frozen_stages={c.frozen_stages}: a number of stages (0 = none, -1 = auto)"),
        (c.demo_images >= 20, f"demo_images={c.demo_images}: must be >= 20"),
        (c.max_train_images >= 0, f"max_train_images={c.max_train_images}: must be >= 0"),
        (c.mode != "infer" or bool(c.checkpoints), "mode='infer' needs checkpoints= (a file, folder or glob)"),
        (c.mode != "blend" or bool(c.checkpoints),
         "mode='blend' needs checkpoints= (run output folders, comma-separated or a glob)"),
        (not ((c.mixup or c.cutmix) and c.loss == "complement"),
         "mixup/cutmix give soft targets, which loss='complement' does not take"),
    ]
    return [msg for ok, msg in rules if not ok]


def _input_mode_problems(c: Config) -> list[str]:
    """What tiles and rect cannot be combined with."""
    rules = [
        (c.tiles == 0 or 2 <= c.tiles <= MAX_TILES,
         f"tiles={c.tiles}: 0 (auto) or 2..{MAX_TILES} squares along the long side"),
        (c.input_mode != "tiles" or not (c.mixup or c.cutmix),
         "input_mode=tiles cannot be combined with mixup/cutmix (each image is several tiles); set one of them off"),
        (c.input_mode != "rect" or not any(fixed_size_architecture(m) for m in (c.model, c.model2)),
         f"input_mode=rect feeds each image in its own shape, but {c.model!r}"
         f"{f' or {c.model2!r}' if c.model2 else ''} takes only its own input size; "
         "set input_mode=pad or tiles, or a convolutional model"),
        (c.input_mode != "rect" or not c.compile,
         "input_mode=rect cannot be combined with compile=true (a static graph per batch shape: rect has a dozen); "
         "set one of them off"),
    ]
    return [msg for ok, msg in rules if not ok]


def _choice_problems(c: Config) -> list[str]:
    out = []
    for key, allowed in CHOICES.items():
        value = getattr(c, key)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            out.append(f"{key}={value!r} is not one of {' | '.join(repr(a) for a in allowed)}{hint}")
    if c.preset and c.preset not in PRESETS:
        out.append(f"preset={c.preset!r} is not one of {' | '.join(sorted(PRESETS))}")
    return out


def _parse_problems(c: Config) -> list[str]:
    out = []
    for key in ("checkpoint_every", "grace"):
        try:
            if parse_duration(getattr(c, key)) <= 0:
                out.append(f"{key}={getattr(c, key)!r}: must be longer than 0 s")
        except ValueError as e:
            out.append(f"{key}: {e}")
    try:
        budget_and_margin(c.budget, c.margin, c.mode)
    except ValueError as e:
        out.append(f"budget={c.budget!r} / margin={c.margin!r}: {e}")
    try:
        parse_kwargs(c.loss_args)
    except ValueError as e:
        out.append(f"loss_args={c.loss_args!r}: {e}")
    return out


def _path_problems(c: Config) -> list[str]:
    """Files the run will need: a typo here would otherwise surface hours later, or never."""
    checks = [("data_dir", c.data_dir, "is_dir"), ("resume_from", c.resume_from, "is_file")]
    return [f"{key}={value!r} does not exist" for key, value, test in checks
            if value and not getattr(Path(value), test)()] + _weights_problems(c)


MAX_TILES = 6  # squares along an image's long side: each costs a forward pass
WEIGHTS_OF = (("model", "pretrained_path"), ("model2", "pretrained_path2"))  # each backbone and its weights


def _weights_problems(c: Config) -> list[str]:
    out = []
    for model_key, path_key in WEIGHTS_OF:
        model, path = getattr(c, model_key), getattr(c, path_key)
        if not weights_given(path):
            continue
        try:
            src = resolve_weights(path)
        except ValueError as e:
            out.append(str(e))
            continue
        if src.architecture and model not in MODEL_FROM_WEIGHTS and not same_architecture(model, src.architecture):
            out.append(f"{path_key} holds {src.architecture!r} weights (its config.json) but {model_key}={model!r}; "
                       f"set {model_key}={src.architecture!r} or leave it empty")
    if not c.model:
        out.append("model is empty: set model= to a timm model name, or point pretrained_path at a timm folder "
                   "(config.json + weights) to take the architecture from it")
    return out


MODEL_FROM_WEIGHTS = ("", "auto")  # model values that mean "whatever the weights folder holds"


def fill_architecture(cfg: Config) -> None:
    """An empty or 'auto' model (model2: empty) takes the architecture of its weights folder's
    config.json, so the config printed, saved and stored in checkpoints names the model that was built."""
    for model_key, path_key in WEIGHTS_OF:
        if getattr(cfg, model_key) not in MODEL_FROM_WEIGHTS or not weights_given(getattr(cfg, path_key)):
            continue
        try:
            arch = resolve_weights(getattr(cfg, path_key)).architecture
        except ValueError:
            continue  # validate() reports it with the other problems
        setattr(cfg, model_key, arch)


def validate(cfg: Config, check_paths: bool = True) -> None:
    """Every option at once, so one run shows every mistake; raises ConfigError naming each option."""
    problems = _choice_problems(cfg) + _range_problems(cfg) + _input_mode_problems(cfg) + _parse_problems(cfg)
    if check_paths:
        problems += _path_problems(cfg)
    if problems:
        raise ConfigError("invalid settings:\n  " + "\n  ".join(problems))


MIN_TRAIN_BUDGET_S = 20.0


def fmt(seconds: float) -> str:
    return f"{seconds:g}s"


def budget_and_margin(budget: str, margin: str, mode: str) -> tuple[float, float]:
    """-> (budget, margin) in seconds; the margin must leave time to work with. The budget clock
    (engine.budget.budget_seconds) takes its numbers from here, so the check and the clock agree."""
    total = parse_duration(budget)
    # Fixed costs (interpreter exit, worker teardown) dominate short runs, a share of the budget long ones.
    margin_s = min(600.0, 0.02 * total + 2.0) if margin == "auto" else parse_duration(margin)
    if total <= 0 or margin_s >= total:
        raise ValueError(f"budget {budget!r} must be positive and larger than margin {margin!r}")
    if mode == "train" and total - margin_s < MIN_TRAIN_BUDGET_S:
        raise ValueError(f"budget {budget!r} (margin {fmt(margin_s)}) leaves under {MIN_TRAIN_BUDGET_S:.0f} s: "
                         "start-up alone (imports, data index, model) takes seconds; give at least 1m")
    return total, margin_s
