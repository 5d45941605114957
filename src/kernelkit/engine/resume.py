"""Continuing a schedule: after a kill in the same out_dir, or in a later Kaggle session.

A Kaggle GPU session lasts at most 9 hours, so one learning-rate schedule can be laid over
`sessions` of them. Session k trains its slice of the schedule and saves; the next session, given
the earlier output as `resume_from=.../last.pt`, continues where the schedule stopped, with its own
budget, inference reserve and submission.

Slices. With a wall-clock schedule (epochs=0) session k covers progress [(k-1)/N, k/N] over its
own training time: the progress left is shared evenly by the sessions left, so a session that
stopped early (a SIGTERM, a crash) hands the rest of its slice to the ones after it. With fixed
epochs, the epochs are split the same way (epoch boundaries, at least one per session). A restart
of the same session after a kill keeps the slice stored in its checkpoint.

Refused at start (exit 2), before any data is read: a finished schedule (it would train at LR 0;
predict with --mode infer instead), and a checkpoint whose schedule, model or data split differ
from this run's (SCHEDULE_KEYS), e.g. another `sessions` value.
"""
from __future__ import annotations

import logging
import math
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..core.checks import MAX_TILES
from ..core.config import Config, ConfigError
from ..inputs.competition import Competition
from .checkpoint import load_checkpoint
from .trainer import FitState, TrainParts, TrainState

log = logging.getLogger("kernelkit")

# What must not change between the sessions of one schedule: the schedule itself, the model, and
# the validation split (another split would validate on images the model trained on).
SCHEDULE_KEYS = ("sessions", "epochs", "schedule", "warmup", "lr", "swa", "freeze", "frozen_stages", "model", "model2",
                 "head", "fold", "n_folds", "val_fraction", "seed", "max_train_images")


def config_differences(trained: dict[str, Any], cfg: Config) -> list[str]:
    """'key: checkpoint X, now Y' for every schedule-defining option that differs (batch_size too with
    fixed epochs: it sets the number of steps). A key older checkpoints lack counts as its default."""
    defaults = {f.name: f.default for f in fields(Config)}
    keys = SCHEDULE_KEYS + (("batch_size",) if cfg.epochs else ())
    return [f"{k}: checkpoint {trained.get(k, defaults[k])!r}, now {getattr(cfg, k)!r}" for k in keys
            if trained.get(k, defaults[k]) != getattr(cfg, k)]


def stored_input_mode(config: dict[str, Any]) -> tuple[str, int] | None:
    """(mode, tiles) a saved config trained with: pad, squeeze, rect (tiles 0) or tiles with its count; a config
    from before the option trained on pad. None for a damaged one."""
    try:
        mode, tiles = str(config.get("input_mode", "pad")), int(config.get("tiles", 0) or 0)
    except (TypeError, ValueError):
        return None
    if mode == "tiles":
        return (mode, tiles) if 2 <= tiles <= MAX_TILES else None
    return (mode, 0) if mode in ("pad", "squeeze", "rect") else None


def describe_input_mode(mode_tiles: tuple[str, int] | None) -> str:
    if mode_tiles is None:
        return "an unreadable mode"
    mode, tiles = mode_tiles
    return f"tiles x{tiles}" if mode == "tiles" else mode


def same_model(ckpt: dict[str, Any], cfg: Config, classes: list) -> bool:
    return ckpt.get("classes") == classes and ckpt.get("config", {}).get("model") == cfg.model


def continues(ckpt: dict[str, Any], cfg: Config, classes: list) -> bool:
    """Whether check_resume takes `ckpt` for this run rather than refusing it or starting fresh."""
    return same_model(ckpt, cfg, classes) and not config_differences(ckpt.get("config", {}), cfg)


def check_resume(cfg: Config, path: Path | None, comp: Competition, explicit: bool) -> dict[str, Any] | None:
    """The checkpoint to continue from, checked before anything slow: one of another model, label set
    or schedule, or a finished schedule given as resume_from, is refused now (not re-trained at LR 0).
    A restart in the same out_dir (not `explicit`) with a changed config starts fresh instead."""
    if path is None:
        return None
    ckpt = load_checkpoint(path)
    trained = ckpt.get("config", {})
    if not same_model(ckpt, cfg, comp.classes):
        if explicit:
            raise ConfigError(f"resume_from {path}: trained a different model or label set "
                              f"({trained.get('model')!r}, {len(ckpt.get('classes', []))} classes)")
        log.warning("%s belongs to a different model or label set; starting fresh", path)
        return None
    differ = config_differences(trained, cfg)
    if differ and explicit:
        raise ConfigError(f"resume_from {path}: its schedule was made with other settings ({'; '.join(differ)}). "
                          "Every session of one schedule needs the same values: set them as the checkpoint has "
                          "them, or start a new schedule (leave resume_from empty)")
    if differ:
        log.warning("%s was trained with other settings (%s); starting fresh", path, "; ".join(differ))
        return None
    was, now = stored_input_mode(trained), stored_input_mode(cfg.to_dict())
    if was != now:  # allowed (the weights take any size), but the model has not seen images this way
        log.warning("!!! %s trained on input_mode %s; this run feeds it %s (input_mode set). Leave input_mode "
                    "auto to keep the checkpoint's", path, describe_input_mode(was), describe_input_mode(now))
    finished = (ckpt["epoch"] >= cfg.epochs) if cfg.epochs else ckpt["progress"] >= 0.999
    if finished and explicit:
        raise ConfigError(
            f"resume_from {path}: its schedule already finished (session {ckpt.get('session', 1)} of "
            f"{trained.get('sessions', 1)}, epoch {ckpt['epoch']}, progress {ckpt['progress']:.3f}); training on "
            f"would run at learning rate 0. To predict with it use --mode infer --checkpoints {path}; to train "
            "more, start a new schedule (leave resume_from empty)")
    return ckpt


def first_slice(sessions: int, epochs: int) -> float:
    if epochs:
        return max(1, round(epochs / sessions)) / epochs
    return 1.0 / sessions


def next_slice(ckpt: dict[str, Any], sessions: int, epochs: int) -> tuple[int, float]:
    """-> (this session's number, progress at which its slice ends) after the checkpoint's session."""
    done = int(ckpt.get("session", 1))
    left = sessions - done
    if left < 1:
        log.warning("the checkpoint is from session %d of %d but its schedule is not finished (progress %.3f): "
                    "this extra session trains the rest", done, sessions, ckpt["progress"])
        left = 1
    if epochs:
        e0 = int(ckpt["epoch"])
        return done + 1, min(epochs, max(e0 + 1, e0 + round((epochs - e0) / left))) / epochs
    p0 = float(ckpt["progress"])
    return done + 1, p0 + (1.0 - p0) / left


def restore(ckpt: dict[str, Any] | None, parts: TrainParts, path: Path | None, cfg: Config,
            new_session: bool) -> FitState:
    """Weights, optimizer, RNG and schedule position from `ckpt`, and this session's slice. A new
    session selects its own best epoch (its output folder stands alone: best.pt, val_probs, rule)."""
    if ckpt is None:
        state = FitState(session=1, session_end=first_slice(cfg.sessions, cfg.epochs))
    else:
        state = FitState()
        TrainState(parts, state).load_state_dict(ckpt)
        if new_session:
            state.session, state.session_end = next_slice(ckpt, cfg.sessions, cfg.epochs)
            state.best_score = state.peak_score = -math.inf
        log.info("resumed from %s: epoch %d, step %d, progress %.3f", path, state.epoch, state.step, state.progress)
    if cfg.sessions > 1:
        log.info("session %d of %d: this session trains the schedule from progress %.3f to %.3f", state.session,
                 cfg.sessions, state.progress, state.session_end)
    return state
