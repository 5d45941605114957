"""Blending K-fold runs by their out-of-fold predictions (numpy only).

A *member* is one model family trained over the folds: the run folders whose stored configs agree
on everything but the fold and the run-time settings (RUNTIME_KEYS). Its out-of-fold (OOF) rows
come from all its folders' `oof/oof_fold<k>_{idx,probs}.npy`, its test probabilities are the mean
of their `test_probs.npy` (each fold model predicted the whole test set). Non-negative member
weights summing to 1 are fitted by coordinate search on the competition metric over the OOF rows
every member covers; the blend of the test probabilities uses the same weights.
"""
from __future__ import annotations

import glob
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..data.folds import cover, saved_folds

log = logging.getLogger("kernelkit")

# Settings that do not change what a model learns: runs differing only in these are folds of one member.
RUNTIME_KEYS = frozenset({
    "mode", "fold", "out_dir", "data_dir", "checkpoints", "resume", "resume_from", "sessions", "budget", "margin",
    "grace", "num_workers", "mp_context", "ddp_procs", "ddp_backend", "cache_images", "cache_dir", "cache_max_gb",
    "checkpoint_every", "deterministic", "tta", "threshold", "threshold_rule", "min_labels", "max_labels",
})
MIX_CELLS = 2 ** 22  # probabilities blended at a time (16 MB of float32 temporaries)
SEARCH_ROWS = 20000  # weight search on at most this many OOF rows (seeded sample): iMet's 109k x 1103 is slow


class BlendInputError(ValueError):
    """Inputs that cannot be blended (missing or mismatched files): named, before anything is written."""


@dataclass
class Member:
    name: str
    dirs: list[Path]
    oof: np.ndarray  # (n, C) float32; rows outside `covered` are 0
    covered: np.ndarray  # (n,) bool
    folds: dict[str, np.ndarray] = field(default_factory=dict)  # "dir/oof_fold<k>" -> its row indices
    test: np.ndarray | None = None  # (n_test, C), mean over the member's folders


def find_run_dirs(spec: str) -> list[Path]:
    """Comma-separated folders or globs -> run folders, in order, each once (a matched file stands
    for its folder, so `runs/*/test_probs.npy` works too)."""
    found: list[Path] = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        matches = [Path(item)] if Path(item).exists() else [Path(p) for p in sorted(glob.glob(item))]
        if not matches:
            raise BlendInputError(f"checkpoints: {item!r} matches no folder")
        for p in matches:
            d = (p if p.is_dir() else p.parent).resolve()
            if d not in found:
                found.append(d)
    return found


def member_key(run_dir: Path) -> str:
    """What the run learned, as a string: its config without the run-time keys (the folder when it
    has no config.json)."""
    path = run_dir / "config.json"
    if not path.is_file():
        return str(run_dir)
    cfg = json.loads(path.read_text())
    return json.dumps({k: v for k, v in sorted(cfg.items()) if k not in RUNTIME_KEYS})


def group_members(dirs: list[Path]) -> list[list[Path]]:
    groups: dict[str, list[Path]] = {}
    for d in dirs:
        groups.setdefault(member_key(d), []).append(d)
    return list(groups.values())


def load_member(dirs: list[Path], n: int, num_classes: int, n_test: int) -> Member:
    """One member's OOF rows and mean test probabilities, every shape checked against the data."""
    oof, covered = np.zeros((n, num_classes), np.float32), np.zeros(n, bool)
    folds: dict[str, np.ndarray] = {}
    test_sum = None  # summed fold by fold from memory-mapped files: one (N, C) array, not one per folder
    for d in dirs:
        test_path = d / "test_probs.npy"
        try:
            files = list(saved_folds(d / "oof", n, num_classes))
            for name, idx, p in files:
                folds[f"{d.name}/{name}"] = idx
                where = f"{d / 'oof' / name} (model {', '.join(map(str, dirs))}: one folder per fold)"
                cover(oof, covered, idx, p, where)
        except ValueError as e:  # shapes or indices of another data set, a fold given twice
            raise BlendInputError(str(e)) from None
        if not files or not test_path.is_file():
            raise BlendInputError(f"{d}: a blend needs oof/oof_fold<k>_idx.npy and test_probs.npy from a run with "
                                  "fold= set (found " + ", ".join(p.name for p in d.glob("*")) + ")")
        test = np.load(test_path, mmap_mode="r")
        if test.shape != (n_test, num_classes):
            raise BlendInputError(f"{test_path}: shape {test.shape}, expected ({n_test}, {num_classes})")
        if test_sum is None:
            test_sum = np.array(test, dtype=np.float32)
        else:
            test_sum += test
    test_sum /= len(dirs)
    name = dirs[0].name if len(dirs) == 1 else f"{dirs[0].name}+{len(dirs) - 1}"
    return Member(name, dirs, oof, covered, folds, test_sum)


def mix(parts: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """The weighted sum as float32, a chunk of rows at a time: the temporaries stay chunk-sized, not (N, C)."""
    out = np.empty(parts[0].shape, np.float32)
    step = max(1, MIX_CELLS // max(out[0].size, 1)) if len(out) else 1
    for s in range(0, len(out), step):
        rows = slice(s, s + step)
        out[rows] = np.float32(weights[0]) * parts[0][rows]
        for w, p in zip(weights[1:], parts[1:]):
            out[rows] += np.float32(w) * p[rows]
    return out


def _with_weight(w: np.ndarray, i: int, value: float) -> np.ndarray:
    """w with w[i] = value, the others rescaled to share 1 - value as before (evenly if they had none)."""
    rest = np.delete(np.arange(len(w)), i)
    others = w[rest].sum()
    out = w.copy()
    out[rest] = w[rest] * (1 - value) / others if others > 0 else (1 - value) / len(rest)
    out[i] = value
    return out


def fit_weights(parts: list[np.ndarray], score: Callable[[np.ndarray], float], rounds: int = 4,
                grid: int = 21) -> tuple[np.ndarray, float]:
    """Non-negative weights summing to 1 that maximise `score(mix(parts, w))`: coordinate search from
    equal weights, each member's weight tried over a grid with the others rescaled; stops when a
    round improves nothing. -> (weights, score)."""
    w = np.full(len(parts), 1.0 / len(parts))
    best = score(mix(parts, w))
    if len(parts) == 1:
        return w, best
    for _ in range(rounds):
        improved = False
        for i in range(len(parts)):
            for value in np.linspace(0.0, 1.0, grid):
                cand = _with_weight(w, i, value)
                s = score(mix(parts, cand))
                if s > best + 1e-9:
                    best, w, improved = s, cand, True
        if not improved:
            break
    return w, best


def search_rows(rows: np.ndarray, seed: int, limit: int = SEARCH_ROWS) -> np.ndarray:
    if len(rows) <= limit:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, limit, replace=False))
