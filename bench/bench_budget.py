"""How well kernel.py uses a wall-clock budget: it must never overrun, and should train for most of it.

Runs kernel.py (the built artifact, copied alone to a temp dir) on the generated demo competition
for several budgets and reports, per budget: the wall time of the whole process measured from
outside, and the share of the budget spent in the training phase (training steps plus the
per-epoch validation that picks the checkpoint and threshold).

    .venv/bin/python bench/bench_budget.py [--budgets 60 180 600] [--model resnet18]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_once(workdir: Path, budget_s: int, extra: list[str]) -> dict:
    out = workdir / f"out_{budget_s}"
    cmd = [sys.executable, "kernel.py", "--budget", f"{budget_s}s", "--out-dir", str(out), *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"kernel.py failed for budget {budget_s}s:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    s = json.loads((out / "summary.json").read_text())
    return {
        "budget_s": budget_s, "process_wall_s": round(wall, 1), "kernel_wall_s": s["wall_s"],
        "train_phase_s": round(s["train_end_s"] - s["train_start_s"], 1),
        "train_share": round((s["train_end_s"] - s["train_start_s"]) / budget_s, 3),
        "epochs": s["epochs"], "steps": s["steps"], "val_f2": round(s["val_score"], 4),
        "within_budget": wall <= budget_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", type=int, nargs="+", default=[60, 180, 600])
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "budget.json")
    args, extra = ap.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.copy(ROOT / "kernel.py", work / "kernel.py")
        subprocess.run([sys.executable, "kernel.py", "--budget", "30s", "--dry-run", "--out-dir", str(work / "warm"),
                        *extra], cwd=work, capture_output=True)  # generate the demo data and warm the disk cache
        for d in ("demo_data",):
            src = work / "warm" / d
            rows = []
            for b in args.budgets:
                (work / f"out_{b}").mkdir()
                shutil.copytree(src, work / f"out_{b}" / d)
                rows.append(run_once(work, b, extra))
                print(json.dumps(rows[-1]), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print("\n| budget | process wall time | within budget | training phase | share of budget | epochs | val F2 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['budget_s']} s | {r['process_wall_s']} s | {'yes' if r['within_budget'] else 'NO'} | "
              f"{r['train_phase_s']} s | {r['train_share']:.1%} | {r['epochs']} | {r['val_f2']} |")


if __name__ == "__main__":
    main()
