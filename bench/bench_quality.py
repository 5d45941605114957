"""Does kernel.py with its defaults learn a real task? Scored against a held-out test set.

Source: scikit-learn's bundled 8x8 handwritten digits (1797 images, offline), upscaled to 32 px
grey PNGs and written as Kaggle competitions (train.csv + train/ + test/ + sample_submission.csv):

* single-label: the digit (10 classes), metric accuracy;
* multi-label: tags derived from the digit (even, greater than four, prime, has a closed loop,
  has a straight stroke, is zero), metric F2 per image.

The same stratified 70/30 split makes both. Each is scored for:

* kernel.py with defaults (only --data-dir, --out-dir, --budget), as a subprocess;
* logistic regression on the raw pixels (multi-label: one per tag, the global threshold that
  maximises F2 on a 20% slice of train, as kernelkit does on its validation set);
* the label prior (majority class / the best constant tag set);

plus the demo (`--preset demo`, its own generated data and answers). Writes
bench/results/quality.json and prints a markdown table.

    .venv/bin/python bench/bench_quality.py [--budget 5m] [--quick] [--only single,multi,demo] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from kernelkit.decide.metrics import fbeta_per_image  # noqa: E402
from kernelkit.decide.thresholds import prior_baseline  # noqa: E402

SIZE = 32
TAGS = {  # digit -> does it have the tag
    "even": lambda d: d % 2 == 0,
    "gt4": lambda d: d > 4,
    "prime": lambda d: d in (2, 3, 5, 7),
    "loop": lambda d: d in (0, 4, 6, 8, 9),
    "straight": lambda d: d in (1, 4, 7),
    "zero": lambda d: d == 0,
}


def digits():
    """-> (x_train, x_test, y_train, y_test). KK_DIGITS_NPZ: the same split saved by `save_digits`, for a
    machine without scikit-learn (the device machine)."""
    if os.environ.get("KK_DIGITS_NPZ"):
        d = np.load(os.environ["KK_DIGITS_NPZ"])
        return d["xtr"], d["xte"], d["ytr"], d["yte"]
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    x, y = load_digits(return_X_y=True)
    return train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)


def save_digits(path: str) -> None:
    xtr, xte, ytr, yte = digits()
    np.savez_compressed(path, xtr=xtr, xte=xte, ytr=ytr, yte=yte)


def tag_matrix(y: np.ndarray) -> np.ndarray:
    return np.array([[int(f(int(d))) for f in TAGS.values()] for d in y], np.int64)


def to_image(row: np.ndarray) -> Image.Image:
    img = (255 - row.reshape(8, 8) * 255 / 16).clip(0, 255).astype(np.uint8)  # dark ink on white, like a scan
    return Image.fromarray(img).resize((SIZE, SIZE), Image.BICUBIC).convert("RGB")


def write_competition(root: Path, xtr, ytr, xte, multilabel: bool) -> None:
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    label = "attribute_ids" if multilabel else "label"
    rows = []
    for i, (row, d) in enumerate(zip(xtr, ytr)):
        to_image(row).save(root / "train" / f"tr{i:05d}.png")
        tags = " ".join(str(k) for k, f in enumerate(TAGS.values()) if f(int(d)))
        rows.append((f"tr{i:05d}", tags if multilabel else str(int(d))))
    pd.DataFrame(rows, columns=["id", label]).to_csv(root / "train.csv", index=False)
    ids = [f"te{i:05d}" for i in range(len(xte))]
    for t, row in zip(ids, xte):
        to_image(row).save(root / "test" / f"{t}.png")
    pd.DataFrame({"id": ids, label: "0"}).to_csv(root / "sample_submission.csv", index=False)
    if multilabel:
        pd.DataFrame({"attribute_id": range(len(TAGS)), "attribute_name": list(TAGS)}).to_csv(
            root / "labels.csv", index=False)


def pixels(x: np.ndarray) -> np.ndarray:
    """What the kernel sees, as a flat vector: the 32 px grey image."""
    return np.stack([np.asarray(to_image(r).convert("L"), np.float32).ravel() / 255 for r in x])


def logistic_single(xtr, ytr, xte, yte) -> float:
    from sklearn.linear_model import LogisticRegression
    clf = LogisticRegression(max_iter=3000).fit(pixels(xtr), ytr)
    return float((clf.predict(pixels(xte)) == yte).mean())


def logistic_multi(xtr, ytr, xte, yte, beta: float = 2.0) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    ttr, tte = tag_matrix(ytr), tag_matrix(yte)
    ptr, pte = pixels(xtr), pixels(xte)
    a, b, ta, tb = train_test_split(ptr, ttr, test_size=0.2, random_state=0)
    fit = [LogisticRegression(max_iter=3000).fit(a, ta[:, k]) for k in range(ttr.shape[1])]
    pb = np.stack([m.predict_proba(b)[:, 1] for m in fit], 1)
    thr = max(np.linspace(0.05, 0.95, 19), key=lambda t: fbeta_per_image(tb, pb >= t, beta))
    fit = [LogisticRegression(max_iter=3000).fit(ptr, ttr[:, k]) for k in range(ttr.shape[1])]
    pt = np.stack([m.predict_proba(pte)[:, 1] for m in fit], 1)
    return float(fbeta_per_image(tte, pt >= thr, beta))


def run_kernel(args: list[str], out_dir: Path, timeout: float) -> tuple[dict, float, str]:
    """-> (summary.json, wall seconds from outside, the autopick decision line or '')."""
    t0 = time.time()
    log = out_dir.with_suffix(".log")
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, str(ROOT / "kernel.py"), "--out-dir", str(out_dir), *args],
                              stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT)
    wall = time.time() - t0
    summary = json.loads((out_dir / "summary.json").read_text()) if (out_dir / "summary.json").is_file() else {}
    summary["exit_code"] = proc.returncode
    choice = [ln.split("autopick: ", 1)[1] for ln in log.read_text().splitlines() if "autopick: chose" in ln]
    return summary, wall, choice[-1] if choice else ""


def score_single(sub: Path, yte) -> float:
    df = pd.read_csv(sub)
    pred = df.iloc[:, 1].astype(int).to_numpy()
    return float((pred == yte).mean())


def score_multi(sub: Path, yte, beta: float = 2.0) -> float:
    df = pd.read_csv(sub, keep_default_na=False)
    pred = np.zeros((len(df), len(TAGS)), bool)
    for i, cell in enumerate(df.iloc[:, 1].astype(str)):
        for t in cell.split():
            pred[i, int(t)] = True
    return float(fbeta_per_image(tag_matrix(yte), pred, beta))


def task_row(name: str, work: Path, data, budget: str, extra: list[str]) -> dict:
    xtr, xte, ytr, yte = data
    multi = name == "multi"
    comp = work / f"{name}_data"
    write_competition(comp, xtr, ytr, xte, multi)
    out = work / f"{name}_out"
    summary, wall, choice = run_kernel(["--data-dir", str(comp), "--budget", budget, *extra], out,
                                       timeout=3 * 3600)
    sub = out / "submission.csv"
    kernel = (score_multi(sub, yte) if multi else score_single(sub, yte)) if sub.is_file() else None
    if multi:
        prior = prior_baseline("multilabel", tag_matrix(ytr), tag_matrix(yte), 2.0)
        logreg = logistic_multi(xtr, ytr, xte, yte)
    else:
        prior = prior_baseline("multiclass", ytr, yte)
        logreg = logistic_single(xtr, ytr, xte, yte)
    return {"task": name, "metric": "F2 per image" if multi else "accuracy", "n_train": len(xtr),
            "n_test": len(xte), "kernel": kernel, "logistic_regression": logreg, "label_prior": prior,
            "kernel_model": model_of(summary), "kernel_choice": choice, "kernel_val_score": summary.get("val_score"),
            "kernel_epochs": summary.get("epochs"), "kernel_wall_s": round(wall, 1),
            "kernel_exit": summary.get("exit_code"), "kernel_warnings": summary.get("warnings", [])}


def demo_row(work: Path, extra: list[str]) -> dict:
    out = work / "demo_out"
    summary, wall, choice = run_kernel(["--preset", "demo", *extra], out, timeout=3600)
    return {"task": "demo", "metric": "F2 per image", "kernel": summary.get("demo_test_score"),
            "kernel_val_score": summary.get("val_score"), "label_prior": summary.get("baseline"),
            "kernel_model": model_of(summary), "kernel_choice": choice, "kernel_epochs": summary.get("epochs"),
            "kernel_wall_s": round(wall, 1), "kernel_exit": summary.get("exit_code")}


def model_of(summary: dict) -> str:
    return f"{summary['model']} @ {summary['img_size']} px" if summary.get("model") else "-"


def fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def table(rows: list[dict]) -> str:
    lines = ["| task | metric | kernel.py | logistic regression (pixels) | label prior | model | "
             "epochs | wall |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['metric']} | {fmt(r['kernel'])} | {fmt(r.get('logistic_regression'))} | "
                     f"{fmt(r['label_prior'])} | {r['kernel_model']} | {r['kernel_epochs']} | "
                     f"{r['kernel_wall_s']:.0f}s |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default="5m")
    ap.add_argument("--quick", action="store_true", help="1-minute budgets, to check the script")
    ap.add_argument("--only", default="single,multi,demo")
    ap.add_argument("--extra", default="", help="more kernel.py flags for the two digit tasks")
    ap.add_argument("--keep", default="", help="work folder to keep (data, outputs, logs); default: a temp dir")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality.json"))
    a = ap.parse_args()
    budget = "1m" if a.quick else a.budget
    data = digits()
    rows = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kk_quality_") as tmp:
        work = Path(a.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in a.only.split(","):
            if name == "demo":
                rows.append(demo_row(work, ["--budget", budget] if a.quick else []))
            else:
                rows.append(task_row(name, work, data, budget, a.extra.split()))
            print(json.dumps(rows[-1]), flush=True)
    result = {"budget": budget, "cpu_count": os.cpu_count(), "platform": platform.platform(),
              "load_avg_before": load_before, "load_avg_after": os.getloadavg(), "rows": rows,
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if not a.quick:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
