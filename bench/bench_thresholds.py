"""Multi-label threshold rules replayed on kept runs: the test F2 each rule would have scored.

bench_finetune.py --keep DIR leaves every row's output folder (val_probs.npy, test_probs.npy,
summary.json, model/kernelkit.json) beside the generated competition (<task>_data). This rebuilds the
row's validation split (the kernel's own `split_indices`, the run's seed) and the held-out test answers
(bench_quality.py's digit split, bench/hard_task.py's task), then scores on the test answers the global
threshold each rule takes from the same validation probabilities:

* best      the exact best on validation, ties to the lowest (`thresholds.search_global`);
* settled   the kernel's rule (`rules.settled_threshold`): of the thresholds within two paired standard
            errors of the best, the one nearest F*/(1 + beta^2);
* theory    F*/(1 + beta^2) alone, whatever validation says of it;

plus the test optimum (the best any global threshold could do). Multi-label rows only.

    .venv/bin/python bench/bench_thresholds.py DIR/multi_lite0 DIR/multi_lite0_s1 ... [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import bench_quality as bq  # noqa: E402
from hard_task import make_hard_task  # noqa: E402

from kernelkit.data.loaders import split_indices  # noqa: E402
from kernelkit.decide.rules import settled_threshold  # noqa: E402
from kernelkit.decide.thresholds import search_global, threshold_curve  # noqa: E402

_HARD: dict[str, object] = {}


def targets(cells: pd.Series, classes: list[str]) -> np.ndarray:
    out = np.zeros((len(cells), len(classes)), bool)
    index = {c: k for k, c in enumerate(classes)}
    for i, cell in enumerate(cells):
        for tok in cell.split():
            out[i, index[tok]] = True
    return out


def answers(run: Path, classes: list[str]) -> np.ndarray:
    """(test images, classes) held-out truth of the task `run` was a row of, in the run's class order."""
    task = run.name.split("_")[0] if not run.name.startswith("hard") else "hard_multi"
    if task == "hard_multi":
        if "task" not in _HARD:  # the generator is seeded: the same task bench_finetune made
            _HARD["task"] = make_hard_task(Path(tempfile.mkdtemp()) / "hard", multilabel=True)
        return _HARD["task"].answers[:, [int(c) for c in classes]]
    tags = bq.tag_matrix(bq.digits()[3]).astype(bool)
    return tags[:, [int(c) for c in classes]]


def replay(run: Path) -> dict:
    meta = json.loads((run / "model" / "kernelkit.json").read_text())
    cfg = meta["config"]
    beta, limits = float(cfg.get("beta", 2.0)), (int(cfg.get("min_labels", 0)), int(cfg.get("max_labels", 0)))
    classes, seed = [str(c) for c in meta["classes"]], json.loads((run / "summary.json").read_text())["seed"]
    data = run.parent / f"{'hard_multi' if run.name.startswith('hard') else 'multi'}_data"
    train = pd.read_csv(data / "train.csv", dtype=str, keep_default_na=False)
    train_y = targets(train.iloc[:, 1], classes)
    _, val = split_indices(train_y, float(meta["config"].get("val_fraction", 0.1)), int(seed))
    vp, tp = np.load(run / "val_probs.npy"), np.load(run / "test_probs.npy")
    if len(vp) != len(val):
        raise SystemExit(f"{run}: {len(vp)} validation rows, the split has {len(val)}")
    truth = answers(run, classes)
    rule, best_v = search_global(train_y[val], vp, beta, min_labels=limits[0], max_labels=limits[1])
    settled_t, _ = settled_threshold(train_y[val], vp, beta, *limits)
    rules = {"best": rule.values[0], "settled": settled_t, "theory": best_v / (1 + beta * beta)}
    grid, test_curve = threshold_curve(truth, tp, beta, min_labels=limits[0], max_labels=limits[1])
    row = {"run": f"{run.parent.name}/{run.name}", "seed": seed, "val_images": len(val), "val_best": round(best_v, 4)}
    for name, t in rules.items():
        test = threshold_curve(truth, tp, beta, np.array([t]), *limits)[1][0]
        row[name] = {"threshold": round(float(t), 3), "test": round(float(test), 4)}
    row["test_optimum"] = {"threshold": float(grid[int(np.argmax(test_curve))]), "test": round(float(test_curve.max()), 4)}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    rows = [replay(Path(r)) for r in a.runs]
    print("| run | seed | best (thr: test F2) | settled | theory | test optimum |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r[k]['threshold']:.2f}: {r[k]['test']:.4f}" for k in ("best", "settled", "theory", "test_optimum")]
        print(f"| {r['run']} | {r['seed']} | " + " | ".join(cells) + " |")
    means = {k: round(float(np.mean([r[k]["test"] for r in rows])), 4) for k in ("best", "settled", "theory", "test_optimum")}
    print("means:", means)
    if a.out:
        Path(a.out).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows, "means": means}, indent=1))


if __name__ == "__main__":
    main()
