"""A small iMet-style competition generated on the fly, so the kernel runs with no data attached.

Tags are things a CNN can learn in a couple of CPU minutes: background colour ("culture") and
shapes ("tag"). Sizes and aspect ratios vary like iMet's, some images have no label, some are PNG.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from ..decide.metrics import fbeta_per_image
from ..inputs.competition import Competition
from ..inputs.submission import cells_to_onehot

log = logging.getLogger("kernelkit")

LABELS = ["culture::crimson", "culture::azure", "tag::circle", "tag::square", "tag::triangle",
          "tag::cross", "tag::stripes", "tag::dots"]
_BACKGROUND = {0: (200, 40, 50), 1: (40, 90, 210)}


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, w: int, h: int, rng: random.Random) -> None:
    s = max(8, int(min(w, h) * rng.uniform(0.35, 0.6)))
    x, y = rng.randint(0, w - s), rng.randint(0, h - s)
    color = tuple(rng.randint(0, 60) if rng.random() < 0.5 else rng.randint(200, 255) for _ in range(3))
    if kind == "circle":
        draw.ellipse([x, y, x + s, y + s], fill=color)
    elif kind == "square":
        draw.rectangle([x, y, x + s, y + s], fill=color)
    elif kind == "triangle":
        draw.polygon([(x + s // 2, y), (x, y + s), (x + s, y + s)], fill=color)
    elif kind == "cross":
        t = max(2, s // 5)
        draw.rectangle([x + s // 2 - t, y, x + s // 2 + t, y + s], fill=color)
        draw.rectangle([x, y + s // 2 - t, x + s, y + s // 2 + t], fill=color)


def _make_image(labels: set[int], rng: random.Random) -> Image.Image:
    if rng.random() < 0.15:  # iMet has strips up to ~1:5
        long, short = rng.randint(200, 320), rng.randint(48, 70)
        w, h = (long, short) if rng.random() < 0.5 else (short, long)
    else:
        w, h = rng.randint(80, 200), rng.randint(80, 200)
    bg = next((_BACKGROUND[k] for k in (0, 1) if k in labels),
              tuple(rng.randint(110, 170) for _ in range(3)))
    arr = np.clip(np.array(bg, np.int16) + np.random.default_rng(rng.randrange(2**32)).integers(
        -25, 26, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    if 6 in labels:  # stripes across the whole image
        step = max(6, min(w, h) // 6)
        for yy in range(0, h, step):
            draw.rectangle([0, yy, w, yy + step // 3], fill=(250, 250, 250))
    if 7 in labels:
        for _ in range(12):
            cx, cy, r = rng.randint(0, w), rng.randint(0, h), max(2, min(w, h) // 25)
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(20, 20, 20))
    for k, kind in ((2, "circle"), (3, "square"), (4, "triangle"), (5, "cross")):
        if k in labels:
            _draw_shape(draw, kind, w, h, rng)
    return img


def _random_labels(rng: random.Random) -> set[int]:
    labels = set()
    u = rng.random()
    if u < 0.3:
        labels.add(0)
    elif u < 0.6:
        labels.add(1)
    labels |= {k for k in range(2, len(LABELS)) if rng.random() < 0.25}
    return labels


def make_demo_competition(root: Path, n_train: int = 1000, n_test: int = 200, seed: int = 0) -> Path:
    """Write train/, test/, train.csv, labels.csv, sample_submission.csv under `root` (once)."""
    root = Path(root)
    done = root / ".complete"
    if done.is_file() and done.read_text().strip() == f"{n_train} {n_test} {seed}":
        return root
    rng = random.Random(seed)
    for sub in ("train", "test"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rows = []
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            image_id = f"{rng.getrandbits(64):016x}"
            labels = _random_labels(rng)
            ext = ".png" if rng.random() < 0.2 else ".jpg"
            img = _make_image(labels, rng)
            img.save(root / split / f"{image_id}{ext}", quality=90) if ext == ".jpg" else img.save(
                root / split / f"{image_id}{ext}")
            rows.append((split, image_id, " ".join(str(k) for k in sorted(labels))))
    df = pd.DataFrame(rows, columns=["split", "id", "attribute_ids"])
    df[df.split == "train"][["id", "attribute_ids"]].to_csv(root / "train.csv", index=False)
    pd.DataFrame({"attribute_id": range(len(LABELS)), "attribute_name": LABELS}).to_csv(root / "labels.csv", index=False)
    test = df[df.split == "test"][["id"]].assign(attribute_ids="")
    test.to_csv(root / "sample_submission.csv", index=False)
    # Answers for checking the demo's test score; a real competition never has this file.
    df[df.split == "test"][["id", "attribute_ids"]].to_csv(root / "test_solution.csv", index=False)
    done.write_text(f"{n_train} {n_test} {seed}")
    log.info("demo competition written to %s (%d train, %d test images)", root, n_train, n_test)
    return root


def score_demo_submission(data_dir: Path, out_dir: Path, comp: Competition) -> float | None:
    """F2 per image of the written submission against the generated test answers."""
    sol = data_dir / "test_solution.csv"
    if comp.task != "multilabel" or not sol.is_file():
        return None
    truth = pd.read_csv(sol, dtype=str, keep_default_na=False)
    sub = pd.read_csv(out_dir / "submission.csv", dtype=str, keep_default_na=False)
    return fbeta_per_image(cells_to_onehot(comp, truth.attribute_ids.tolist()),
                           cells_to_onehot(comp, sub.iloc[:, 1].tolist()))
