"""Reports written beside the outputs: training curves, label statistics, error analysis.

- `plot_history`: loss and validation-score curves from history.csv (the Scene-15 seed's plots).
  matplotlib is optional (Kaggle images have it, the pinned local set does not): without it the
  plot is skipped with a log line.
- `label_statistics`: labels per class and per image, unlabelled images, image sizes read from
  file headers (the iMet EDA: 1103 labels, odd aspect ratios; Helsinki: half the images unlabelled).
- `error_analysis`: per-label error counts and the images with the most wrong labels (the
  Helsinki seed's error analysis); for single-label tasks the most frequent confusions.

Each analysis returns {"summary": JSON-ready dict, <table name>: DataFrame, ...}; the write_*
functions save the tables as CSV and the summary as JSON in out_dir and return the summary.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ..core.fileio import atomic_write, write_json
from .metrics import one_hot, per_class_report

log = logging.getLogger("kernelkit")

SEP = "; "  # between label names in one cell: iMet names contain spaces ("tag::writing implements")
HIST_CAP = 10  # wrong labels per image: 10 and more share one bin, the JSON stays small


# ----------------------------------------------------------------------------- training curves

def plot_history(history_csv: Path, out_png: Path, metric: str = "validation score") -> Path | None:
    """Training loss, validation score and learning rate per epoch from history.csv -> out_png,
    or None when matplotlib is missing or there is nothing to plot."""
    try:
        from matplotlib.figure import Figure  # pyplot is not needed and would pick a GUI backend
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        log.info("matplotlib is not installed; skipping %s", Path(out_png).name)
        return None
    history_csv, out_png = Path(history_csv), Path(out_png)
    if not history_csv.is_file() or history_csv.stat().st_size == 0:
        log.info("no %s yet; skipping %s", history_csv.name, out_png.name)
        return None
    h = pd.read_csv(history_csv)
    if h.empty or "train_loss" not in h:
        log.info("%s has no training rows; skipping %s", history_csv.name, out_png.name)
        return None
    x = h["epoch"] if "epoch" in h else pd.Series(range(len(h)))
    has_val = "val_score" in h and h["val_score"].notna().any()
    has_lr = "lr_end" in h
    panels = 1 + has_val + has_lr
    fig = Figure(figsize=(4.5 * panels, 3.6), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    ax = axes[0]
    ax.plot(x, h["train_loss"], marker="o", label="train")
    if "val_loss" in h and h["val_loss"].notna().any():
        ax.plot(x, h["val_loss"], marker="o", label="validation")
    ax.set(title="loss", xlabel="epoch")
    ax.legend()
    if has_val:
        ax = axes[1]
        v = h["val_score"]
        ax.plot(x, v, marker="o", color="tab:green")
        best = int(v.idxmax())
        ax.scatter([x[best]], [v[best]], s=120, facecolors="none", edgecolors="tab:red",
                   label=f"best {v[best]:.4f} (epoch {x[best]})")
        ax.set(title=metric, xlabel="epoch")
        ax.legend()
    if has_lr:
        ax = axes[-1]
        ax.plot(x, h["lr_end"], marker="o", color="tab:gray")
        ax.set(title="learning rate at epoch end", xlabel="epoch")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    out_png.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_png, lambda f: fig.savefig(f, format="png", dpi=100))
    return out_png


# ----------------------------------------------------------------------------- label statistics

def image_sizes(paths: list[str], sample: int, seed: int, extreme_aspect: float) -> dict:
    """Width/height from file headers only (PIL reads the size without decoding the pixels)."""
    paths = [p for p in paths if p]  # "" marks a missing file (competition.py)
    rng = np.random.default_rng(seed)
    if len(paths) > sample:
        paths = [paths[i] for i in rng.choice(len(paths), sample, replace=False)]
    sizes, unreadable = [], 0
    for p in paths:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # no pixels are decoded
                with Image.open(p) as im:
                    sizes.append(im.size)
        except (OSError, ValueError, Image.DecompressionBombError):
            unreadable += 1
    out: dict = {"sampled": len(paths), "unreadable": unreadable}
    if not sizes:
        return out
    wh = np.array(sizes, dtype=np.float64)
    aspect = np.maximum(wh[:, 0] / wh[:, 1], wh[:, 1] / wh[:, 0])
    for name, col in (("width", wh[:, 0]), ("height", wh[:, 1])):
        out[name] = {"min": int(col.min()), "median": float(np.median(col)), "max": int(col.max())}
    out["extreme_aspect"] = extreme_aspect
    out["extreme_aspect_share"] = round(float((aspect > extreme_aspect).mean()), 4)
    out["max_aspect"] = round(float(aspect.max()), 2)
    out["aspect_quantiles"] = {f"p{q}": round(float(np.percentile(aspect, q)), 2) for q in (50, 75, 90)}
    out["short_side_median"] = float(np.median(wh.min(1)))
    out["long_side_median"] = float(np.median(wh.max(1)))
    return out


def label_statistics(targets: np.ndarray, class_names: list[str], image_paths: list[str] | None, task: str,
                     sample_sizes: int = 2000, seed: int = 0, extreme_aspect: float = 2.0, top: int = 10) -> dict:
    """-> {"summary": dict, "per_class": DataFrame(index, name, count, share)}.

    targets: (N, C) 0/1 for task "multilabel", (N,) class indices otherwise. share = count / images.
    The summary holds the labels-per-image histogram, images with no label, the `top` rarest and
    most common classes, and image sizes from the headers of at most `sample_sizes` random paths.
    """
    targets = np.asarray(targets)
    n, c = len(targets), len(class_names)
    multilabel = task == "multilabel"
    if multilabel:
        counts = targets.astype(bool).sum(0)
        per_image = targets.astype(bool).sum(1)
    else:
        counts = np.bincount(targets.astype(np.int64), minlength=c)
        per_image = np.ones(n, np.int64)
    if len(counts) != c:
        raise ValueError(f"targets have {len(counts)} classes, class_names {c}")
    share = counts / max(n, 1)
    per_class = pd.DataFrame({"index": np.arange(c), "name": class_names, "count": counts,
                              "share": share.round(6)})
    order = np.lexsort((np.arange(c), counts))  # rarest first, ties by class index
    nonzero = counts[counts > 0]
    summary: dict = {
        "task": task, "images": n, "classes": c,
        "label_occurrences": int(counts.sum()),
        "classes_without_images": int((counts == 0).sum()),
        # Most / least frequent class with images: how much a loss or sampler may need rebalancing.
        "imbalance_ratio": round(float(nonzero.max() / nonzero.min()), 1) if len(nonzero) else None,
        "rarest": [[class_names[i], int(counts[i])] for i in order[:top]],
        "most_common": [[class_names[i], int(counts[i])] for i in order[::-1][:top]],
    }
    if multilabel:
        hist = np.bincount(per_image) if n else np.zeros(1, np.int64)
        summary.update(
            labels_per_image={"mean": round(float(per_image.mean()), 3) if n else 0.0,
                              "max": int(per_image.max()) if n else 0,
                              "histogram": {str(k): int(v) for k, v in enumerate(hist) if v}},
            images_without_label=int((per_image == 0).sum()),
            images_without_label_share=round(float((per_image == 0).mean()), 4) if n else 0.0)
    if image_paths is not None:
        summary["image_sizes"] = image_sizes(list(image_paths), sample_sizes, seed, extreme_aspect)
    return {"summary": summary, "per_class": per_class}


def write_label_statistics(targets: np.ndarray, class_names: list[str], image_paths: list[str] | None,
                           task: str, out_dir: Path, sample_sizes: int = 2000, seed: int = 0) -> dict:
    """label_stats.csv (per class) and label_stats.json (summary) in out_dir -> the summary."""
    stats = label_statistics(targets, class_names, image_paths, task, sample_sizes, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "label_stats.csv", stats["per_class"].to_csv(index=False))
    s = stats["summary"]
    write_json(out_dir / "label_stats.json", s)
    line = f"labels: {s['images']} images, {s['classes']} classes, imbalance {s['imbalance_ratio']}x"
    if "labels_per_image" in s:
        line += (f", {s['labels_per_image']['mean']:.2f} labels per image (max {s['labels_per_image']['max']}), "
                 f"{s['images_without_label']} images without a label")
    sizes = s.get("image_sizes", {})
    if "width" in sizes:
        line += (f"; sizes w {sizes['width']['min']}-{sizes['width']['max']} h {sizes['height']['min']}-"
                 f"{sizes['height']['max']}, {sizes['extreme_aspect_share']:.1%} with aspect > "
                 f"{sizes['extreme_aspect']:g} ({sizes['sampled']} sampled)")
    log.info("%s", line)
    return s


# ----------------------------------------------------------------------------- error analysis

def _top_probs(probs: np.ndarray, class_names: list[str], k: int) -> list[str]:
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [SEP.join(f"{class_names[j]} {p[j]:.3f}" for j in row) for p, row in zip(probs, order)]


def _names(mask_rows: np.ndarray, class_names: list[str]) -> list[str]:
    return [SEP.join(class_names[j] for j in np.flatnonzero(r)) for r in mask_rows]


def _per_label(truth: np.ndarray, pred: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    r = per_class_report(truth, pred, beta=1.0)
    df = pd.DataFrame({"index": np.arange(len(class_names)), "name": class_names, "support": r["support"],
                       "predicted": r["tp"] + r["fp"], "tp": r["tp"], "fp": r["fp"], "fn": r["fn"],
                       "errors": r["errors"], "precision": r["precision"].round(4),
                       "recall": r["recall"].round(4), "f1": r["fbeta"].round(4)})
    return df.sort_values(["errors", "index"], ascending=[False, True], kind="stable").reset_index(drop=True)


def _multilabel_errors(truth: np.ndarray, pred: np.ndarray, probs: np.ndarray | None, class_names: list[str],
                       ids: list[str], top: int) -> dict:
    truth, pred = truth.astype(bool), pred.astype(bool)
    fn, fp = truth & ~pred, ~truth & pred
    wrong = fn.sum(1) + fp.sum(1)
    # Among equally wrong images, the more confidently wrong first.
    # Summed over the wrong cells only (no (N, C) float temporaries).
    err_rows, err_cols = np.nonzero(fn | fp)
    confidence = np.zeros(len(truth)) if probs is None else np.bincount(
        err_rows, weights=np.abs(probs[err_rows, err_cols] - truth[err_rows, err_cols]), minlength=len(truth))
    worst = np.lexsort((np.arange(len(truth)), -confidence, -wrong))[:top]
    worst = worst[wrong[worst] > 0]
    table = pd.DataFrame({"id": [ids[i] for i in worst], "n_wrong": wrong[worst],
                          "n_true": truth[worst].sum(1), "n_pred": pred[worst].sum(1),
                          "missing": _names(fn[worst], class_names), "extra": _names(fp[worst], class_names)})
    if probs is not None:
        table["top_probs"] = _top_probs(probs[worst], class_names, 5)
    # Confident false positives: often a label the annotators left out (Helsinki: a river in view
    # but no 'river' label, unlabelled images given reasonable labels).
    rows, cols = np.nonzero(fp)
    if probs is not None:
        p = probs[rows, cols]
        pick = np.lexsort((cols, rows, -p))[:top]
    else:
        p, pick = np.full(len(rows), np.nan), np.arange(min(top, len(rows)))
    candidates = pd.DataFrame({"id": [ids[i] for i in rows[pick]], "label": [class_names[j] for j in cols[pick]],
                               "prob": np.round(p[pick], 4), "n_true": truth[rows[pick]].sum(1)})
    unlabelled = ~truth.any(1)
    hist = np.bincount(np.minimum(wrong, HIST_CAP), minlength=HIST_CAP + 1)
    summary = {
        "task": "multilabel", "images": len(truth),
        "wrong_labels": int(wrong.sum()), "false_positives": int(fp.sum()), "false_negatives": int(fn.sum()),
        "images_with_errors": int((wrong > 0).sum()),
        # Helsinki: most images had one wrong label at most, four or more were rare.
        "wrong_labels_per_image": {(str(k) if k < HIST_CAP else f"{k}+"): int(v) for k, v in enumerate(hist) if v},
        "images_without_label": int(unlabelled.sum()),
        "unlabelled_images_given_labels": int((unlabelled & pred.any(1)).sum()),
    }
    return {"summary": summary, "worst_images": table, "missing_label_candidates": candidates}


def _multiclass_errors(truth: np.ndarray, pred: np.ndarray, probs: np.ndarray | None, class_names: list[str],
                       ids: list[str], top: int) -> dict:
    c = len(class_names)
    truth, pred = truth.astype(np.int64), pred.astype(np.int64)
    wrong = truth != pred
    support = np.bincount(truth, minlength=c)
    pairs, counts = np.unique(truth[wrong] * c + pred[wrong], return_counts=True)
    order = np.lexsort((pairs, -counts))[:top]
    t, p = pairs[order] // c, pairs[order] % c
    confusions = pd.DataFrame({"true": [class_names[i] for i in t], "pred": [class_names[i] for i in p],
                               "count": counts[order], "share_of_true": np.round(counts[order] / support[t], 4)})
    if probs is not None:
        p_true = probs[np.arange(len(truth)), truth]
        worst = np.lexsort((np.arange(len(truth)), p_true))[:top]  # least probability on the truth first
    else:
        worst = np.flatnonzero(wrong)[:top]
    table = pd.DataFrame({"id": [ids[i] for i in worst], "true": [class_names[i] for i in truth[worst]],
                          "pred": [class_names[i] for i in pred[worst]], "correct": ~wrong[worst]})
    if probs is not None:
        table["p_true"] = np.round(p_true[worst], 4)
        table["p_pred"] = np.round(probs[worst, pred[worst]], 4)
        table["top_probs"] = _top_probs(probs[worst], class_names, 3)
    summary = {"task": "multiclass", "images": len(truth), "errors": int(wrong.sum()),
               "accuracy": round(float(1 - wrong.mean()), 4) if len(truth) else 0.0,
               "top_confusions": [[a, b, int(n)] for a, b, n in
                                  zip(confusions["true"][:5], confusions["pred"][:5], confusions["count"][:5])]}
    return {"summary": summary, "worst_images": table, "confusion_pairs": confusions}


def error_analysis(truth: np.ndarray, pred: np.ndarray, probs: np.ndarray | None, class_names: list[str],
                   ids: list[str], top: int = 20) -> dict:
    """Where a model goes wrong on validation images.

    Multi-label: truth and pred (N, C) bool -> tables per_label (fp, fn, precision, recall, F1,
    most errors first), worst_images (most wrong labels: the missing and extra label names, top
    probabilities) and missing_label_candidates (the most confident false positives).
    Single-label: truth and pred (N,) class indices -> per_label, confusion_pairs (most frequent
    true -> predicted mistakes) and worst_images (least probability on the true class).
    probs (N, C) may be None: the probability columns are left out. Returns {"summary": dict, tables...}.
    """
    truth, pred = np.asarray(truth), np.asarray(pred)
    if truth.shape != pred.shape or len(ids) != len(truth):
        raise ValueError(f"truth {truth.shape}, pred {pred.shape} and {len(ids)} ids must match")
    if probs is not None:
        probs = np.asarray(probs, dtype=np.float32)  # no float64 copy: (N, C) is large at 15,000 classes
        if probs.shape != (len(truth), len(class_names)):
            raise ValueError(f"probs {probs.shape} must be ({len(truth)}, {len(class_names)})")
    if truth.ndim == 2:
        if truth.shape[1] != len(class_names):
            raise ValueError(f"{truth.shape[1]} label columns, {len(class_names)} class names")
        out = _multilabel_errors(truth, pred, probs, class_names, ids, top)
        out["per_label"] = _per_label(truth, pred, class_names)
    else:
        out = _multiclass_errors(truth, pred, probs, class_names, ids, top)
        c = len(class_names)
        out["per_label"] = _per_label(one_hot(truth.astype(np.int64), c), one_hot(pred.astype(np.int64), c),
                                      class_names)
    per_label = out["per_label"]
    worst = per_label[per_label["errors"] > 0][:5]
    out["summary"]["most_errors"] = [[n, int(e)] for n, e in zip(worst["name"], worst["errors"])]
    return out


def write_error_analysis(truth: np.ndarray, pred: np.ndarray, probs: np.ndarray | None, class_names: list[str],
                         ids: list[str], out_dir: Path, top: int = 20) -> dict:
    """errors_per_label.csv, worst_images.csv, confusion_pairs.csv (single-label) or
    missing_label_candidates.csv (multi-label), error_summary.json in out_dir -> the summary."""
    result = error_analysis(truth, pred, probs, class_names, ids, top)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "errors_per_label.csv", result["per_label"].to_csv(index=False))
    for name in ("worst_images", "confusion_pairs", "missing_label_candidates"):
        if name in result:
            atomic_write(out_dir / f"{name}.csv", result[name].to_csv(index=False))
    s = result["summary"]
    write_json(out_dir / "error_summary.json", s)
    most = ", ".join(f"{n} ({e})" for n, e in s["most_errors"][:3])
    if s["task"] == "multilabel":
        log.info("error analysis: %d of %d validation images have a wrong label (%d missing, %d extra); "
                 "most errors: %s", s["images_with_errors"], s["images"], s["false_negatives"],
                 s["false_positives"], most)
    else:
        top_pair = s["top_confusions"][0] if s["top_confusions"] else None
        log.info("error analysis: %d of %d validation images wrong; most errors: %s%s", s["errors"], s["images"],
                 most, f"; most frequent confusion {top_pair[0]} -> {top_pair[1]} ({top_pair[2]})" if top_pair else "")
    return s
