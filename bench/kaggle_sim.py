#!/usr/bin/env python
"""A Kaggle session as a new user meets it, on this machine: a fake /kaggle/input with the
competition nested under competitions/<slug>/<subdir> (train_images/, test_images/, ids with the
extension, an `image_id,label` sample), a decoy pre-resized dataset that sorts first, an earlier
output holding demo_data/, and a Kaggle Models weights folder (timm layout, mean/std 0.5). The
kernel is built with `build_kernel.py --set` (no hand edits), run as Kaggle would (no flags), then
run again in --mode infer from the slim weights it wrote.

    python bench/kaggle_sim.py [--budget 90s] [--keep DIR]

Prints one JSON object: exit codes, the folder chosen, the statistics used, what was left in the
output folder, and whether the infer run reproduced the submission.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PALETTE = [(220, 30, 30), (30, 200, 40), (40, 60, 220)]


def image(cls: int, rng: np.random.Generator) -> Image.Image:
    base = np.array(PALETTE[cls], np.int16)
    return Image.fromarray(np.clip(base + rng.integers(-40, 41, (48, 64, 3)), 0, 255).astype(np.uint8))


def competition(root: Path, n_train: int = 300, n_test: int = 60) -> None:
    rng = np.random.default_rng(0)
    (root / "train_images").mkdir(parents=True)
    (root / "test_images").mkdir()
    rows = []
    for i in range(n_train):
        image(i % 3, rng).save(root / "train_images" / f"{100000 + i}.jpg")
        rows.append((f"{100000 + i}.jpg", i % 3))
    pd.DataFrame(rows, columns=["image_id", "label"]).to_csv(root / "train.csv", index=False)
    ids = [f"{900000 + i}.jpg" for i in range(n_test)]
    for i, t in enumerate(ids):
        image(i % 3, rng).save(root / "test_images" / t)
    pd.DataFrame({"image_id": ids, "label": 0}).to_csv(root / "sample_submission.csv", index=False)
    pd.DataFrame({"image_id": ids, "label": [i % 3 for i in range(n_test)]}).to_csv(root.parent / "answers.csv",
                                                                                  index=False)


def weights(folder: Path) -> None:
    import timm
    model = timm.create_model("resnet10t", num_classes=1000)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    timm.models.save_for_hf(model, str(folder), safe_serialization=True)


def build_tree(input_root: Path) -> Path:
    comp = input_root / "competitions" / "cassava-like" / "data"
    competition(comp)
    decoy = input_root / "aaa-resized-train" / "train"
    decoy.mkdir(parents=True)
    image(0, np.random.default_rng(1)).save(decoy / "x.jpg")
    competition(input_root / "my-earlier-output" / "demo_data", n_train=9, n_test=3)
    weights(input_root / "resnet10t" / "pytorch" / "half-mean" / "1")
    return comp


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", default="90s")
    ap.add_argument("--keep", default="")
    args = ap.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="kaggle-sim-"))
    input_root, working = work / "input", work / "working"
    comp = build_tree(input_root)
    kernel = work / "kernel.py"
    shutil.copy(ROOT / "kernel.py", kernel)
    subprocess.run([sys.executable, str(ROOT / "build_kernel.py"), "--out", str(kernel),
                    "--set", f"pretrained_path={input_root / 'resnet10t'}", "--set", f"budget={args.budget}",
                    "--set", "img_size=48"], check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(KERNELKIT_INPUT_ROOT=str(input_root), KAGGLE_KERNEL_RUN_TYPE="Batch")
    train = subprocess.run([sys.executable, str(kernel), "--out-dir", str(working)], cwd=work, env=env,
                           capture_output=True, text=True)
    (work / "train.log").write_text(train.stdout + train.stderr)
    infer = subprocess.run([sys.executable, str(kernel), "--out-dir", str(work / "infer"), "--mode", "infer",
                            "--checkpoints", str(working / "model")], cwd=work, env=env, capture_output=True, text=True)
    (work / "infer.log").write_text(infer.stdout + infer.stderr)
    log = train.stdout
    answers = pd.read_csv(comp.parent / "answers.csv")
    sub = pd.read_csv(working / "submission.csv") if (working / "submission.csv").is_file() else None
    result = {
        "train_exit": train.returncode, "infer_exit": infer.returncode,
        "competition_chosen": next((ln.split("competition: ")[1] for ln in log.splitlines()
                                    if "INFO competition: " in ln), None),
        "candidates_logged": sum("input candidate:" in ln for ln in log.splitlines()),
        "statistics": next((ln.split("INFO ")[1] for ln in log.splitlines() if "input statistics" in ln), None),
        "storage_plan": next((ln.split("INFO ")[1] for ln in log.splitlines() if "storage plan" in ln), None),
        "output_files": sorted(p.name for p in working.iterdir()),
        "cache_left_in_output": (working / "cache").exists(),
        "slim_weights_mb": round(sum(f.stat().st_size for f in (working / "model").iterdir()) / 1e6, 2)
        if (working / "model").is_dir() else None,
        "best_pt_mb": round((working / "best.pt").stat().st_size / 1e6, 2) if (working / "best.pt").is_file() else None,
        "test_accuracy": float((sub["label"].values == answers["label"].values).mean()) if sub is not None else None,
        "infer_reproduces_submission": sub is not None and (work / "infer" / "submission.csv").is_file()
        and pd.read_csv(work / "infer" / "submission.csv").equals(sub),
        "work_dir": str(work),
    }
    print(json.dumps(result, indent=1))
    return 0 if train.returncode == 0 and infer.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
