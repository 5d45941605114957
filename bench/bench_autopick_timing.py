"""How much the autopick's timed batch size moves its CPU speed estimate.

autopick.measure times a few training steps on random tensors. On a CPU a from-scratch ladder times
batches of CPU_TIMED_BATCH (8) to keep a slow rung short, a fine-tune's ladder enough images for
CPU_TIMED_PIXELS (autopick.cpu_timed_images, chosen from these numbers); training runs batches of 32.
Timing the training batch instead was tried for fine-tunes (README, rejected experiments). This times the
same candidates at 8, 16 and 32 images a step, twice each (fastest step of 3, as autopick does),
side by side in one process, and reports training images/s and the 32 / 8 ratio. The fine-tune rows
are EfficientNet-Lite0 with its high-resolution stages frozen, as a fine-tune trains it.

    .venv/bin/python bench/bench_autopick_timing.py [--threads N] [--out bench/results/autopick_timing.json]
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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from pretrained import lite0_folder  # noqa: E402

from kernelkit.build import autopick  # noqa: E402
from kernelkit.build.autopick import Candidate, measure  # noqa: E402
from kernelkit.core.config import Config  # noqa: E402

BATCHES = (8, 16, 32)


def fixed_batch(images: int):
    def timed_images(*_args, **_kwargs) -> int:
        return images
    return timed_images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "autopick_timing.json"))
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    weights = str(lite0_folder(Path(tempfile.gettempdir()) / "kk_lite0" / "tf_efficientnet_lite0"))
    rows_in = [("tf_efficientnet_lite0", px, weights) for px in (96, 128, 160)] + \
              [("resnet10t", 32, ""), ("resnet10t", 64, ""), ("resnet18", 64, "")]
    device, rows = torch.device("cpu"), []
    for model, px, w in rows_in:
        cfg = Config(model=model, pretrained_path=w, batch_size=max(BATCHES))
        row = {"model": model, "img_size": px, "fine_tune": bool(w), "train_ips": {}, "infer_ips": {}}
        for b in BATCHES:
            autopick.cpu_timed_images = fixed_batch(b)  # exactly b images, fine-tune or not
            timed = [measure(Candidate(model, px, 1.0), cfg, 10, device) for _ in range(a.reps)]
            row["train_ips"][b] = round(max(t[0] for t in timed), 1)
            row["infer_ips"][b] = round(max(t[1] for t in timed), 1)
        row["ratio_32_over_8"] = round(row["train_ips"][32] / row["train_ips"][8], 2)
        print(json.dumps(row), flush=True)
        rows.append(row)
    out = {"when": time.strftime("%Y-%m-%d %H:%M"), "cpu_count": os.cpu_count(), "platform": platform.platform(),
           "torch_threads": torch.get_num_threads(), "command": " ".join(sys.argv), "rows": rows}
    Path(a.out).write_text(json.dumps(out, indent=1))
    print("| model @ px | train img/s at batch 8 / 16 / 32 | 32 / 8 |")
    print("|---|---|---|")
    for r in rows:
        ips = " / ".join(str(r["train_ips"][b]) for b in BATCHES)
        print(f"| {r['model']} @ {r['img_size']}{' (fine-tune)' if r['fine_tune'] else ''} | {ips} | {r['ratio_32_over_8']}x |")


if __name__ == "__main__":
    main()
