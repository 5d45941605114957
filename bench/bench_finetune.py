"""Fine-tuning from attached weights, side by side at one CPU budget (issue #20 item 5).

Tasks: the two digit tasks of bench_quality.py (single-label accuracy, 6-tag multi-label F2) and the
hard task of bench/hard_task.py (frames 1:1 to 1:5, 24-40 px objects, 24 classes; multi-label F2 and
single-label accuracy). Rows, each with the same --budget (start to submission):

* scratch   kernel.py defaults (only --data-dir, --out-dir, --budget), random init;
* lite0     kernel.py defaults + --pretrained-path <ImageNet EfficientNet-Lite0 timm folder>;
* pad, squeeze, tiles, rect   (hard tasks, not in the default --rows but pad) lite0 with the input mode forced
            (--input-mode pad | squeeze | tiles | rect), to set the automatic choice against each;
* peer      bench/peer_notebook.py: a plain timm fine-tune of the same folder, as a Kaggle notebook
            would write it (square 128 px, flip, AdamW 1e-3, cosine, ~7 epochs, flip TTA).

Rows run one at a time (two would share the CPU), task by task, the row order rotated per task so
machine load falls on every row alike; --together starts a task's rows at once instead (on a machine
other people load, every row then sees the same load). Scores are on held-out test answers. Writes
bench/results/finetune.json and prints a markdown table.

    .venv/bin/python bench/bench_finetune.py --budget 120 [--only single,multi,hard_multi,hard_single]
        [--rows scratch,lite0,pad,peer] [--seeds 0,1,2] [--threads N] [--together] [--keep DIR] [--extra '--aug flip']
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

import bench_quality as bq  # noqa: E402
from hard_task import make_hard_task, prior_score, score_submission  # noqa: E402
from pretrained import lite0_folder  # noqa: E402

from kernelkit.decide.thresholds import prior_baseline  # noqa: E402

TASKS = ("single", "multi", "hard_multi", "hard_single")
ROWS = ("scratch", "lite0", "pad", "squeeze", "tiles", "rect", "peer")  # the default --rows: scratch,lite0,pad,peer
DEFAULT_ROWS = ("scratch", "lite0", "pad", "peer")
# lite0 rows with the input mode forced (hard tasks only: on the square digits every mode is one square)
MODE_ROWS = {"pad": "pad", "squeeze": "squeeze", "tiles": "tiles", "rect": "rect"}


def make_task(name: str, work: Path) -> tuple[Path, callable, float, str]:
    """-> (competition folder, score(submission) -> float, label prior, metric)."""
    root = work / f"{name}_data"
    if name.startswith("hard"):
        task = make_hard_task(root, multilabel=name == "hard_multi")
        return root, lambda sub: score_submission(task, sub), prior_score(task), task.metric
    xtr, xte, ytr, yte = bq.digits()
    multi = name == "multi"
    bq.write_competition(root, xtr, ytr, xte, multi)
    if multi:
        prior = prior_baseline("multilabel", bq.tag_matrix(ytr), bq.tag_matrix(yte), 2.0)
        return root, lambda sub: bq.score_multi(sub, yte), prior, "F2 per image"
    return root, lambda sub: bq.score_single(sub, yte), prior_baseline("multiclass", ytr, yte), "accuracy"


def row_command(row: str, data: Path, out: Path, weights: Path, budget: int, extra: list[str],
                seed: int = 0) -> list[str]:
    """seed 0: each program's own default seed (the kernel's 42, the peer's 0); others passed as --seed."""
    seeded = ["--seed", str(seed)] if seed else []
    if row == "peer":
        return [sys.executable, str(ROOT / "bench" / "peer_notebook.py"), "--data-dir", str(data),
                "--weights", str(weights), "--out-dir", str(out), "--budget", str(budget), *seeded]
    cmd = [sys.executable, str(ROOT / "kernel.py"), "--data-dir", str(data), "--out-dir", str(out),
           "--budget", f"{budget}s", *seeded]
    if row != "scratch":
        cmd += ["--pretrained-path", str(weights)]
    if row in MODE_ROWS:
        cmd += ["--input-mode", MODE_ROWS[row]]
    return cmd + (extra if row != "scratch" else [])


def out_dir(work: Path, name: str, row: str, seed: int) -> Path:
    return work / (f"{name}_{row}" + (f"_s{seed}" if seed else ""))


def run_rows(rows: list[str], data: Path, work: Path, name: str, weights: Path, budget: int,
             together: bool, threads: int, extra: list[str], seed: int = 0) -> dict[str, tuple[dict, float]]:
    """-> {row: (summary, wall seconds)}; `together`: the rows run at the same time (one machine load for all)."""
    def start(row: str):
        out = out_dir(work, name, row, seed)
        log = open(out.with_suffix(".log"), "w")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
        return out, log, time.time(), subprocess.Popen(row_command(row, data, out, weights, budget, extra, seed), stdout=log,
                                                       stderr=subprocess.STDOUT, cwd=ROOT, env=env)

    results, running = {}, {}
    for row in rows:
        running[row] = start(row)
        if not together:
            results[row] = finish(*running.pop(row), budget)
    for row, job in running.items():
        results[row] = finish(*job, budget)
    return results


def finish(out: Path, log, t0: float, proc: subprocess.Popen, budget: int) -> tuple[dict, float]:
    try:
        proc.wait(timeout=budget * 4 + 300)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    wall = time.time() - t0
    log.close()
    text = out.with_suffix(".log").read_text().splitlines()
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    summary["exit_code"] = proc.returncode
    summary["log_tail"] = text[-3:] if proc.returncode else []
    choice = [ln.split("autopick: ", 1)[1] for ln in text if "autopick: chose" in ln]
    summary["choice"] = choice[-1] if choice else ""
    said = [ln.split("input mode", 1)[1].strip()[:100] for ln in text if "input mode" in ln]
    summary["input_mode_log"] = " / ".join(said)  # the first choice, and the autopick's fallback if any
    return summary, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=int, default=120, help="seconds per row, start to submission")
    ap.add_argument("--only", default=",".join(TASKS))
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"of {','.join(ROWS)}")
    ap.add_argument("--threads", type=int, default=0,
                    help="OMP_NUM_THREADS for every row (0 = unset). On a machine other processes oversubscribe, "
                         "torch's spinning OpenMP threads make 2 threads ~3x slower than 1 (resnet18, load 16 on 2 cores)")
    ap.add_argument("--together", action="store_true",
                    help="run a task's rows at the same time (on a machine others load, one load for all rows)")
    ap.add_argument("--extra", default="", help="kernel.py flags added to the rows with weights but the peer's, "
                    "e.g. '--aug flip'")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds, each a full set of rows (0: the programs' "
                    "default seeds); the table shows the mean over seeds")
    ap.add_argument("--keep", default="", help="work folder to keep (data, outputs, logs); default: a temp dir")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "finetune.json"))
    a = ap.parse_args()
    rows, load_before = [], os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kk_finetune_") as tmp:
        work = Path(a.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        weights = lite0_folder(work / "weights" / "tf_efficientnet_lite0")
        for t, name in enumerate(a.only.split(",")):
            data, score, prior, metric = make_task(name, work)
            wanted = [r for r in a.rows.split(",") if r not in MODE_ROWS or name.startswith("hard")]
            for k, seed in enumerate(int(x) for x in a.seeds.split(",")):
                turn = t + k
                order = wanted[turn % len(wanted):] + wanted[:turn % len(wanted)]  # rotated: load falls on all alike
                results = run_rows(order, data, work, name, weights, a.budget, a.together, a.threads, a.extra.split(),
                                   seed)
                for row in order:
                    rows.append(row_result(name, row, seed, metric, prior, score, work, results[row]))
                    print(json.dumps(rows[-1]), flush=True)
                    save(a, rows, load_before)  # after every row: a run cut short keeps what it measured
    print(table(rows))


def row_result(name: str, row: str, seed: int, metric: str, prior: float, score, work: Path,
               result: tuple[dict, float]) -> dict:
    summary, wall = result
    sub = out_dir(work, name, row, seed) / "submission.csv"
    return {"task": name, "row": row, "seed": seed, "metric": metric, "label_prior": prior,
            "score": score(sub) if sub.is_file() else None, "val_score": summary.get("val_score"),
            "model": bq.model_of(summary) if row != "peer" else "tf_efficientnet_lite0 @ 128 px",
            "choice": summary.get("choice"), "input_mode": summary.get("input_mode"), "tiles": summary.get("tiles"),
            "input_mode_log": summary.get("input_mode_log"),
            "epochs": summary.get("epochs"), "wall_s": round(wall, 1),
            "exit": summary.get("exit_code"), "warnings": summary.get("warnings", []),
            "log_tail": summary.get("log_tail"), "load_avg": os.getloadavg()[0]}


def save(a: argparse.Namespace, rows: list[dict], load_before: tuple) -> None:
    result = {"budget_s": a.budget, "cpu_count": os.cpu_count(), "platform": platform.platform(),
              "command": " ".join(sys.argv), "omp_num_threads": a.threads or None,
              "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
              "rows": rows, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))


def table(rows: list[dict]) -> str:
    """Mean score per task and row over the seeds run; with several seeds, (min-max, n) after it."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    present = [r for r in ROWS if any(x["row"] == r for x in rows)]
    lines = ["| task | metric | label prior | " + " | ".join(present) + " |",
             "|---|---|---|" + "---|" * len(present)]
    for t in tasks:
        first = next(r for r in rows if r["task"] == t)
        cells = [cell([r for r in rows if r["task"] == t and r["row"] == row]) for row in present]
        lines.append(f"| {t} | {first['metric']} | {bq.fmt(first['label_prior'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cell(runs: list[dict]) -> str:
    scores = [r["score"] if r["score"] is not None else 0.0 for r in runs]  # no submission scores 0
    if not scores:
        return "-"
    epochs = "/".join(str(r["epochs"]) for r in runs)
    if len(scores) == 1:
        return f"{bq.fmt(scores[0])} ({epochs} ep)"
    return f"{bq.fmt(sum(scores) / len(scores))} ({bq.fmt(min(scores))}-{bq.fmt(max(scores))}, n={len(scores)}; {epochs} ep)"


if __name__ == "__main__":
    main()
