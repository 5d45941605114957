"""The measured inference reserve on a run whose first epoch is longer than the whole budget.

Generates a single-label competition (4000 train JPEGs of 240-400 px, 10 classes, 1000 test images),
runs kernel.py with the old defaults (resnet50 at 224 px, named: the defaults are now `auto`) under --budget (default 5m) on this machine's
CPU, and records from outside the process: exit status, wall time, whether a valid submission was
written, and what the log says about the probe, the TTA plan and where training stopped.

    .venv/bin/python bench/bench_reserve.py [--budget 5m] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def make_competition(root: Path, n_train: int = 4000, n_test: int = 1000, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()

    def image(c: int) -> Image.Image:
        h, w = rng.integers(240, 400, 2)
        base = np.array([(c * 25) % 255, (c * 70) % 255, (c * 130) % 255], np.int16)
        return Image.fromarray(np.clip(base + rng.integers(-60, 61, (h, w, 3)), 0, 255).astype(np.uint8))

    rows = []
    for i in range(n_train):
        image(i % 10).save(root / "train" / f"t{i:05d}.jpg", quality=85)
        rows.append((f"t{i:05d}", i % 10))
    pd.DataFrame(rows, columns=["id", "label"]).to_csv(root / "train.csv", index=False)
    ids = [f"q{i:05d}" for i in range(n_test)]
    for i, t in enumerate(ids):
        image(i % 10).save(root / "test" / f"{t}.jpg", quality=85)
    pd.DataFrame({"id": ids, "label": 0}).to_csv(root / "sample_submission.csv", index=False)
    return root


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", default="5m")
    ap.add_argument("--keep", default="")
    args = ap.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-reserve-"))
    data = work / "data" if (work / "data" / "train.csv").is_file() else make_competition(work / "data")
    out = work / "out"
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / "kernel.py"), "--data-dir", str(data), "--budget", args.budget,
                           "--model", "resnet50", "--img-size", "224", "--out-dir", str(out)], capture_output=True, text=True)
    wall = time.time() - t0
    log = proc.stdout + proc.stderr
    sub = out / "submission.csv"
    valid = sub.is_file() and pd.read_csv(sub, dtype=str).id.tolist() == pd.read_csv(
        data / "sample_submission.csv", dtype=str).id.tolist()
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    result = {"budget": args.budget, "exit_status": proc.returncode, "wall_s": round(wall, 1), "valid_submission": valid,
              "steps": summary.get("steps"), "train_end_s": summary.get("train_end_s"), "tta": summary.get("tta"),
              "val_score": summary.get("val_score"),
              "probe": next(iter(re.findall(r"INFO inference probe: (\d.*)", log)), None),
              "tta_plan": next(iter(re.findall(r"inference with tta=.*", log)), None)}
    print(json.dumps(result, indent=2))
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "reserve.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
