"""Pad-to-square vs tiles on the hard task (bench/hard_task.py), side by side.

Each row is kernel.py on the same generated competition with one input setting, scored on the
held-out test answers. Two ways to hold the cost fixed:

* `--compute N` (default): fixed epochs, so every row processes the same number of img_size
  squares (pad: N epochs; tiles xT: N / T epochs; pad at 2 x img_size: N / 4 epochs). Independent
  of how busy the machine is, which matters on a shared CPU.
* `--budget 5m`: the same wall-clock budget for every row (epochs=0, what a user gets), rows
  interleaved over `--repeats` rounds so load changes hit every row alike.

    .venv/bin/python bench/bench_input_mode.py [--task multi,single] [--compute 12] [--budget 5m]
        [--rows pad,tiles2,tiles3,tiles4,pad128,auto] [--model resnet10t] [--img-size 64] [--kernel kernel.py]

Writes bench/results/input_mode.json (or --out) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hard_task import make_hard_task, prior_score, score_submission  # noqa: E402

ROWS = {  # name -> (flags, squares per image relative to pad at img_size)
    "pad": (["--input-mode", "pad"], 1),
    "tiles2": (["--input-mode", "tiles", "--tiles", "2"], 2),
    "tiles3": (["--input-mode", "tiles", "--tiles", "3"], 3),
    "tiles4": (["--input-mode", "tiles", "--tiles", "4"], 4),
    "pad128": (["--input-mode", "pad", "--img-size", "128"], 4),
    "auto": ([], 0),  # whatever input_mode=auto picks (cost unknown up front: same epochs as tiles3)
}


def run(kernel: Path, data: Path, out: Path, flags: list[str], timeout: float) -> tuple[int, float, str]:
    t0 = time.time()
    log = out.with_suffix(".log")
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, str(kernel), "--data-dir", str(data), "--out-dir", str(out), *flags],
                            stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT).returncode
    mode = [ln.split("INFO ", 1)[1][:80] for ln in log.read_text().splitlines() if "INFO input mode:" in ln]
    return rc, time.time() - t0, mode[-1] if mode else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="multi")
    ap.add_argument("--rows", default="pad,tiles2,tiles3,tiles4,pad128")
    ap.add_argument("--compute", type=float, default=12, help="pad-equivalent epochs per row (0: use --budget)")
    ap.add_argument("--budget", default="5m")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--model", default="resnet10t")
    ap.add_argument("--img-size", default="64")
    ap.add_argument("--extra", default="", help="more kernel.py flags for every row")
    ap.add_argument("--kernel", default=str(ROOT / "kernel.py"))
    ap.add_argument("--n-train", type=int, default=1200)
    ap.add_argument("--keep", default="")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "input_mode.json"))
    a = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="kk_inputmode_") as tmp:
        work = Path(a.keep or tmp)
        tasks = {t: make_hard_task(work / f"data_{t}", t == "multi", n_train=a.n_train) for t in a.task.split(",")}
        for rep in range(a.repeats):
            for tname, task in tasks.items():
                for row in a.rows.split(","):
                    flags, cost = ROWS[row]
                    base = ["--img-size", a.img_size] if "--img-size" not in flags else []
                    if a.model:
                        base += ["--model", a.model]
                    if a.compute:
                        epochs = max(1, round(a.compute / (cost or 3)))
                        base += ["--epochs", str(epochs), "--budget", "3h"]
                    else:
                        base += ["--budget", a.budget]
                    out = work / f"{tname}_{row}_{rep}"
                    rc, wall, mode = run(Path(a.kernel), task.root, out, [*base, *flags, *a.extra.split()],
                                         timeout=4 * 3600)
                    sub = out / "submission.csv"
                    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
                    r = {"task": tname, "metric": task.metric, "row": row, "repeat": rep, "exit": rc,
                         "score": score_submission(task, sub) if sub.is_file() else None,
                         "prior": prior_score(task), "val_score": summary.get("val_score"),
                         "epochs": summary.get("epochs"), "wall_s": round(wall, 1), "input_mode": mode,
                         "model": summary.get("model"), "img_size": summary.get("img_size"),
                         "flags": [*base, *flags, *a.extra.split()]}
                    results.append(r)
                    print(json.dumps(r), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                       "cpu_count": os.cpu_count(), "load_avg_end": os.getloadavg(),
                                       "args": vars(a), "rows": results}, indent=1))
    print("| task | row | score | val | epochs | wall | input mode |\n|---|---|---|---|---|---|---|")
    for r in results:
        s = "-" if r["score"] is None else f"{r['score']:.3f}"
        v = "-" if r["val_score"] is None else f"{r['val_score']:.3f}"
        print(f"| {r['task']} | {r['row']} | {s} | {v} | {r['epochs']} | {r['wall_s']:.0f}s | {r['input_mode']} |")


if __name__ == "__main__":
    main()
