"""The hard task of issue #20: odd aspect ratios and small objects, written as Kaggle competitions.

Frames have a short side of 64 px and a long side of 64-320 px (aspect 1:1 to 1:5, either
orientation) on a noisy textured background. Objects are 24-40 px coloured shapes
(6 shapes x 4 colours = 24 classes) placed anywhere in the frame. Squeezing a 64 x 320 strip
into a square shrinks them 5x along the long side, which is what the aspect-aware input mode is for.

* multi-label (`multilabel_csv`): 1-4 objects of distinct classes per image, the label is the set
  (attribute_ids + labels.csv, iMet style); metric F2 per image;
* single-label (`single_label_csv`): one object per image plus 0-2 grey distractor shapes that carry
  no label; the label is the class name; metric accuracy.

Everything is deterministic by seed; test answers are returned, never written next to the data.

    from hard_task import make_hard_task, score_submission
    task = make_hard_task(Path("/tmp/hard_multi"), multilabel=True)
    ... kernel.py --data-dir task.root ...
    score_submission(task, out / "submission.csv")

    .venv/bin/python bench/hard_task.py /tmp/hard   # writes both, prints their sizes and timing
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from kernelkit.decide.metrics import fbeta_per_image  # noqa: E402

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
COLOURS = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (45, 70, 215), "yellow": (225, 205, 35)}
CLASSES = [f"{c}_{s}" for c in COLOURS for s in SHAPES]
SHORT, MAX_ASPECT = 64, 5.0
OBJ_MIN, OBJ_MAX = 24, 40


@dataclass
class HardTask:
    root: Path
    multilabel: bool
    classes: list[str]
    test_ids: list[str]
    answers: np.ndarray  # multi-label: (N, C) bool; single-label: (N,) class indices
    aspects: list[float] = field(default_factory=list)  # long / short side of each train image

    @property
    def metric(self) -> str:
        return "F2 per image" if self.multilabel else "accuracy"


def _frame(rng: np.random.Generator) -> tuple[int, int]:
    """(w, h): short side 64, long side 64-320; a third square-ish, the rest spread up to 1:5."""
    aspect = 1.0 + rng.uniform(0, 0.3) if rng.random() < 1 / 3 else rng.uniform(1.3, MAX_ASPECT)
    long = int(round(SHORT * aspect))
    return (long, SHORT) if rng.random() < 0.5 else (SHORT, long)


def _background(w: int, h: int, rng: np.random.Generator) -> Image.Image:
    """Low-saturation texture: a random mid-grey base, coarse blotches and pixel noise."""
    base = rng.integers(95, 165) + rng.integers(-15, 16, 3)
    coarse = rng.integers(-30, 31, (h // 8 + 1, w // 8 + 1, 1)).repeat(8, 0).repeat(8, 1)[:h, :w]
    arr = base + coarse + rng.integers(-20, 21, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int], fill) -> None:
    x, y, s = box
    if shape == "circle":
        draw.ellipse([x, y, x + s, y + s], fill=fill)
    elif shape == "square":
        draw.rectangle([x + s // 8, y + s // 8, x + s - s // 8, y + s - s // 8], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x + s // 2, y), (x, y + s), (x + s, y + s)], fill=fill)
    elif shape == "cross":
        t = max(3, s // 6)
        draw.rectangle([x + s // 2 - t, y, x + s // 2 + t, y + s], fill=fill)
        draw.rectangle([x, y + s // 2 - t, x + s, y + s // 2 + t], fill=fill)
    elif shape == "ring":
        t = max(4, s // 5)
        draw.ellipse([x, y, x + s, y + s], outline=fill, width=t)
    else:  # diamond
        draw.polygon([(x + s // 2, y), (x + s, y + s // 2), (x + s // 2, y + s), (x, y + s // 2)], fill=fill)


def _place(w: int, h: int, taken: list[tuple[int, int, int]], rng: np.random.Generator) -> tuple[int, int, int]:
    """A box of 24-40 px anywhere in the frame, avoiding the ones already placed when it can."""
    s = int(rng.integers(OBJ_MIN, OBJ_MAX + 1))
    box = (0, 0, s)
    for _ in range(30):
        box = (int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1)), s)
        if all(abs(box[0] - x) >= (s + t) // 2 + 2 or abs(box[1] - y) >= (s + t) // 2 + 2 for x, y, t in taken):
            break
    taken.append(box)
    return box


def _colour(name: str, rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in COLOURS[name])


def make_image(classes: list[int], rng: np.random.Generator, distractors: int = 0) -> Image.Image:
    w, h = _frame(rng)
    img = _background(w, h, rng)
    draw = ImageDraw.Draw(img)
    taken: list[tuple[int, int, int]] = []
    for _ in range(distractors):  # grey shapes: same geometry, no colour, no label
        g = int(rng.choice([40, 215]))
        _draw(draw, SHAPES[int(rng.integers(len(SHAPES)))], _place(w, h, taken, rng), (g, g, g))
    for k in classes:
        colour, shape = CLASSES[k].split("_")
        _draw(draw, shape, _place(w, h, taken, rng), _colour(colour, rng))
    return img


def _labels(multilabel: bool, rng: np.random.Generator) -> list[int]:
    if not multilabel:
        return [int(rng.integers(len(CLASSES)))]
    n = int(rng.choice([1, 2, 3, 4], p=[0.3, 0.35, 0.25, 0.1]))
    return sorted(int(k) for k in rng.choice(len(CLASSES), n, replace=False))


def make_hard_task(root: Path, multilabel: bool, n_train: int = 1200, n_test: int = 300,
                   seed: int = 0) -> HardTask:
    """Write train/, test/, train.csv, sample_submission.csv (+ labels.csv) under a new `root`."""
    root = Path(root)
    rng = np.random.default_rng([seed, int(multilabel)])
    for sub in ("train", "test"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rows, truth, aspects = [], [], []
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            image_id = f"{split[:2]}{i:05d}"
            labels = _labels(multilabel, rng)
            img = make_image(labels, rng, 0 if multilabel else int(rng.integers(0, 3)))
            img.save(root / split / f"{image_id}.jpg", quality=92)
            if split == "train":
                aspects.append(max(img.size) / min(img.size))
                cell = " ".join(map(str, labels)) if multilabel else CLASSES[labels[0]]
                rows.append((image_id, cell))
            else:
                truth.append(labels)
    label_col = "attribute_ids" if multilabel else "label"
    pd.DataFrame(rows, columns=["id", label_col]).to_csv(root / "train.csv", index=False)
    test_ids = [f"te{i:05d}" for i in range(n_test)]
    pd.DataFrame({"id": test_ids, label_col: "0" if multilabel else CLASSES[0]}).to_csv(
        root / "sample_submission.csv", index=False)
    if multilabel:
        pd.DataFrame({"attribute_id": range(len(CLASSES)), "attribute_name": CLASSES}).to_csv(
            root / "labels.csv", index=False)
        answers = np.zeros((n_test, len(CLASSES)), bool)
        for i, labels in enumerate(truth):
            answers[i, labels] = True
    else:
        answers = np.array([t[0] for t in truth], np.int64)
    return HardTask(root, multilabel, list(CLASSES), test_ids, answers, aspects)


def score_submission(task: HardTask, submission: Path, beta: float = 2.0) -> float:
    """F2 per image (multi-label) or accuracy (single-label) of a submission.csv on the held-out answers.

    Rows are matched by id; a test id missing from the submission counts as an empty / wrong answer.
    """
    df = pd.read_csv(submission, dtype=str, keep_default_na=False)
    cells = dict(zip(df.iloc[:, 0], df.iloc[:, 1]))
    if task.multilabel:
        pred = np.zeros_like(task.answers)
        for i, t in enumerate(task.test_ids):
            for tok in cells.get(t, "").split():
                if tok.isdigit() and int(tok) < len(task.classes):
                    pred[i, int(tok)] = True
        return float(fbeta_per_image(task.answers, pred, beta))
    index = {c: k for k, c in enumerate(task.classes)}
    pred = np.array([index.get(cells.get(t, "").strip(), -1) for t in task.test_ids])
    return float((pred == task.answers).mean())


def prior_score(task: HardTask) -> float:
    """The label prior on the test set: the best constant answer learnt from train.csv."""
    df = pd.read_csv(task.root / "train.csv", dtype=str, keep_default_na=False)
    if not task.multilabel:
        top = df.iloc[:, 1].value_counts().idxmax()
        return float((task.answers == task.classes.index(top)).mean())
    freq = np.zeros(len(task.classes))
    for cell in df.iloc[:, 1]:
        for tok in cell.split():
            freq[int(tok)] += 1
    order = np.argsort(-freq)
    best = 0.0
    for k in range(1, len(order) + 1):
        pred = np.zeros_like(task.answers)
        pred[:, order[:k]] = True
        best = max(best, fbeta_per_image(task.answers, pred, beta=2.0))
    return best


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/kk_hard_task")
    for multi in (True, False):
        t0 = time.time()
        task = make_hard_task(out / ("multi" if multi else "single"), multilabel=multi)
        print(f"{task.root}: {len(task.aspects)} train, {len(task.test_ids)} test, {len(task.classes)} classes, "
              f"aspect median {np.median(task.aspects):.2f} max {max(task.aspects):.2f}, prior {prior_score(task):.3f}, "
              f"{time.time() - t0:.1f}s")
