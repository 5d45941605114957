"""What a train run leaves beside its submission: history.csv and its plot, the best epoch's
validation probabilities and error analysis, the out-of-fold file under K-fold."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..core.config import Config
from ..core.fileio import atomic_write, write_npy
from ..data.folds import save_oof
from ..decide.reports import plot_history, write_error_analysis
from ..decide.thresholds import ThresholdRule
from ..engine.trainer import FitResult
from ..inputs.competition import Competition


def write_history(history: list[dict], out_dir: Path) -> None:
    if history:
        atomic_write(out_dir / "history.csv", pd.DataFrame(history).to_csv(index=False))


def validation_reports(cfg: Config, comp: Competition, data, result: FitResult, rule: ThresholdRule,
                       out_dir: Path, outcome) -> None:
    """Curves, per-label errors and worst images of the best epoch; its out-of-fold file under K-fold."""
    metric = f"F{cfg.beta:g} per image" if comp.task == "multilabel" else "accuracy"
    if (out_dir / "history.csv").is_file():
        outcome.guard("history plot", plot_history, out_dir / "history.csv", out_dir / "history.png", metric=metric)
    probs = result.best_val_probs
    if probs is None or probs.shape[0] != len(data.val_targets):
        return
    write_npy(out_dir / "val_probs.npy", probs)
    val_pred = rule.apply(probs) if comp.task == "multilabel" else probs.argmax(1)
    outcome.summary["errors"] = outcome.guard("error analysis", write_error_analysis, data.val_targets, val_pred,
                                              probs, comp.class_names, [Path(p).stem for p in data.val_paths], out_dir)
    if cfg.fold >= 0:
        save_oof(out_dir / "oof", cfg.fold, data.val_rows, probs)
