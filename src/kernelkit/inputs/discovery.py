"""Which attached folder under /kaggle/input is the competition.

Kaggle mounts a competition at /kaggle/input/<slug> (older images) or
/kaggle/input/competitions/<slug> (newer ones, sometimes with the data one folder deeper), and
datasets at /kaggle/input/<slug> or /kaggle/input/datasets/<owner>/<slug>. Users also attach
pre-resized copies of the training images and earlier kernel outputs, which look like training
data too. Picking the first folder with a train/ in it silently trains on the wrong thing, and
finding nothing used to run the demo on Kaggle and submit it. So: every candidate is ranked and
logged, a tie at the top is refused, and on Kaggle nothing found is a refusal, never the demo.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..core.config import ConfigError

log = logging.getLogger("kernelkit")

TRAIN_DIRS = ("train", "train_images", "train_imgs", "images_train", "train-images")
TEST_DIRS = ("test", "test_images", "test_imgs", "images_test", "test-images")
SAMPLE = "sample_submission.csv"
MAX_DEPTH = 4  # /kaggle/input/datasets/<owner>/<slug>/<subdir>
MAX_ENTRIES = 200  # a folder with more entries is data (images), not a folder of datasets
# Our own generated demo, inside an attached earlier output: never a competition.
SKIP_NAMES = ("demo_data",)


@dataclass(frozen=True)
class Candidate:
    path: Path
    under_competitions: bool
    has_sample: bool
    has_test: bool
    has_train_csv: bool

    @property
    def rank(self) -> tuple[bool, bool, bool, bool]:
        return (self.under_competitions, self.has_sample, self.has_test, self.has_train_csv)

    def describe(self) -> str:
        marks = [m for m, on in (("competitions/", self.under_competitions), (SAMPLE, self.has_sample),
                                 ("test images", self.has_test), ("train.csv", self.has_train_csv)) if on]
        return f"{self.path} ({', '.join(marks) or 'train images only'})"


def _has_any_dir(d: Path, names: tuple[str, ...]) -> bool:
    return any((d / n).is_dir() for n in names)


def has_training_data(d: Path) -> bool:
    return (d / "train.csv").is_file() or _has_any_dir(d, TRAIN_DIRS)


def _subdirs(d: Path) -> list[Path]:
    """Sub-folders worth descending into; none when `d` holds many entries (an image folder)."""
    out = []
    try:
        with os.scandir(d) as it:
            for k, e in enumerate(it):
                if k >= MAX_ENTRIES:
                    return []
                if e.is_dir() and not e.name.startswith((".", "__")) and e.name not in SKIP_NAMES:
                    out.append(Path(e.path))
    except OSError:
        return []
    return sorted(out)


def scan(input_root: Path) -> tuple[list[Candidate], list[Path]]:
    """(candidates with test data or a sample submission, folders with training data only)."""
    found, train_only = [], []
    level = [input_root]
    for depth in range(1, MAX_DEPTH + 1):
        nxt = []
        for parent in level:
            for d in _subdirs(parent):
                if not has_training_data(d):
                    nxt.append(d)
                    continue
                has_sample, has_test = (d / SAMPLE).is_file(), _has_any_dir(d, TEST_DIRS)
                if not (has_sample or has_test):
                    train_only.append(d)
                    continue
                rel = d.relative_to(input_root).parts
                found.append(Candidate(d, rel[0] == "competitions", has_sample, has_test, (d / "train.csv").is_file()))
        level = nxt
    return found, train_only


def listing(input_root: Path, depth: int = 2) -> str:
    """What is attached, two levels deep, for the refusal message."""
    lines = []
    level = [input_root]
    for _ in range(depth):
        level = [d for parent in level for d in _subdirs(parent)]
        lines += [str(d) for d in level]
    return ", ".join(sorted(lines)[:30]) or "nothing"


def find_competition(input_root: Path, on_kaggle: bool) -> Path | None:
    """The competition folder, or None (not on Kaggle and nothing found: the caller runs the demo).

    Raises ConfigError when the choice is ambiguous, or when on Kaggle nothing matches."""
    if not input_root.is_dir():
        if on_kaggle:
            raise ConfigError(f"{input_root} does not exist: attach the competition (Add Input) or set data_dir=")
        return None
    found, train_only = scan(input_root)
    for d in train_only:
        log.info("input %s: training images but no test images and no %s; not a competition", d, SAMPLE)
    for c in found:
        log.info("input candidate: %s", c.describe())
    if not found:
        if on_kaggle:
            raise ConfigError(f"no competition found under {input_root} (a folder with train.csv or train/ and "
                              f"test/ or {SAMPLE}); attached: {listing(input_root)}. Attach the competition or "
                              "set data_dir= (the generated demo never runs on Kaggle)")
        return None
    best = max(c.rank for c in found)
    top = [c for c in found if c.rank == best]
    if len(top) > 1:
        raise ConfigError("several attached folders look like the competition: "
                          + "; ".join(c.describe() for c in top) + ". Set data_dir= to the one to train on")
    log.info("competition: %s", top[0].path)
    return top[0].path
