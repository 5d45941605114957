"""Progressive resizing over the clock: same budget, same seed, score with and without.

(a) the demo (`kernel.py --preset demo`, 64 px, its own generated answers, F2 per image);
(b) scikit-learn's bundled digits as a single-label competition (bench_quality's builder), the
    images written at 96 px so that a lower-resolution stage means something; resnet18 @ 96 px
    pinned (no autopick) so both arms train the same network; accuracy on the held-out 30%.

With: `--resize-start 0.5` (default `--resize-full-at 0.75`); without: `--resize-start 0`. Runs
are interleaved (with, without, with, without) so the load of a shared machine falls on both arms
alike. Writes bench/results/progressive.json and prints a markdown table.

    .venv/bin/python bench/bench_progressive.py [--reps 2] [--demo-budget 150s] [--digits-budget 2m]
                                                [--only demo,digits] [--append]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_quality as bq  # noqa: E402

DIGITS_PX = 96


def history_sizes(out: Path) -> list:
    h = out / "history.csv"
    if not h.is_file():
        return []
    df = pd.read_csv(h)
    return df["train_px"].tolist() if "train_px" in df else []


def one(task: str, arm: str, rep: int, work: Path, args, comp: Path, yte) -> dict:
    out = work / f"{task}_{arm}_{rep}"
    flags = ["--seed", str(args.seed), "--resize-start", str(args.start) if arm == "with" else "0"]
    if task == "demo":
        summary, wall, _ = bq.run_kernel(["--preset", "demo", "--budget", args.demo_budget, *flags], out, 3600)
        score = summary.get("demo_test_score")
    else:
        summary, wall, _ = bq.run_kernel(["--data-dir", str(comp), "--model", "resnet18", "--img-size",
                                          str(DIGITS_PX), "--budget", args.digits_budget, *flags], out, 3600)
        sub = out / "submission.csv"
        score = bq.score_single(sub, yte) if sub.is_file() else None
    row = {"task": task, "arm": arm, "rep": rep, "score": score, "val_score": summary.get("val_score"),
           "epochs": summary.get("epochs"), "exit": summary.get("exit_code"), "wall_s": round(wall, 1),
           "train_px": history_sizes(out), "load_avg": os.getloadavg()[0]}
    print(json.dumps(row), flush=True)
    return row


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        for arm in ("without", "with"):
            rs = [r for r in rows if r["task"] == task and r["arm"] == arm]
            scores = [r["score"] for r in rs if r["score"] is not None]
            out.append({"task": task, "arm": arm, "mean": float(np.mean(scores)) if scores else None,
                        "scores": scores, "epochs": [r["epochs"] for r in rs]})
    return out


def table(summary: list[dict], metric: dict[str, str]) -> str:
    lines = ["| task | metric | progressive resizing | mean | runs | epochs |", "|---|---|---|---|---|---|"]
    for s in summary:
        runs = ", ".join(f"{v:.3f}" for v in s["scores"])
        mean = "-" if s["mean"] is None else f"{s['mean']:.3f}"
        lines.append(f"| {s['task']} | {metric[s['task']]} | {s['arm']} | {mean} | {runs} | "
                     f"{', '.join(map(str, s['epochs']))} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--start", type=float, default=0.5, help="--resize-start of the 'with' arm")
    ap.add_argument("--demo-budget", default="150s")
    ap.add_argument("--digits-budget", default="2m")
    ap.add_argument("--only", default="demo,digits")
    ap.add_argument("--keep", default="")
    ap.add_argument("--append", action="store_true", help="add reps to the rows already in --out")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "progressive.json"))
    a = ap.parse_args()
    bq.SIZE = DIGITS_PX  # bench_quality's to_image writes at its module-level SIZE
    xtr, xte, ytr, yte = bq.digits()
    load_before = os.getloadavg()
    old = json.loads(Path(a.out).read_text()) if a.append and Path(a.out).is_file() else {}
    rows: list[dict] = old.get("rows", [])
    first = 1 + max((r["rep"] for r in rows), default=-1)
    load_before = old.get("load_avg_before", load_before)
    with tempfile.TemporaryDirectory(prefix="kk_progressive_") as tmp:
        work = Path(a.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        comp = work / "digits_data"
        if not comp.is_dir():
            bq.write_competition(comp, xtr, ytr, xte, multilabel=False)
        for rep in range(first, first + a.reps):
            for task in a.only.split(","):
                for arm in ("with", "without"):
                    rows.append(one(task, arm, rep, work, a, comp, yte))
    summary = summarise(rows)
    result = {"what": "same budget and seed, with and without --resize-start", "start": a.start,
              "full_at": 0.75, "seed": a.seed, "budgets": {"demo": a.demo_budget, "digits": a.digits_budget},
              "digits": f"sklearn digits, {DIGITS_PX} px PNGs, resnet18 @ {DIGITS_PX} px, 70/30 split",
              "cpu_count": os.cpu_count(), "platform": platform.platform(), "device": "cpu",
              "note": "CPU numbers on a 2-core machine shared with other workers (see load_avg)",
              "load_avg_before": load_before, "load_avg_after": os.getloadavg(), "summary": summary, "rows": rows,
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(table(summary, {"demo": "F2 per image", "digits": "accuracy"}))


if __name__ == "__main__":
    main()
