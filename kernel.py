#!/usr/bin/env python
"""Kaggle image-classification kernel: trains a timm model inside the time budget, then writes
submission.csv with test-time augmentation.

Built by build_kernel.py from src/kernelkit -- edit the CONFIG block, not the code below it.
Run:  python kernel.py [--flag value ...]   (python kernel.py --help lists every option)
With no competition under /kaggle/input and no data_dir, it runs a small generated demo.
"""

import time as _time

_STARTED_AT = _time.time()  # the budget clock starts here, before the slow imports

# ----------------------------------------------------------------------------- CONFIG
# Uncomment and edit. Precedence: defaults < preset < this block < command-line flags.
CONFIG = dict(
    # mode='train',                         # train: train then predict | infer: predict from saved checkpoints
    # preset='',                            # named preset applied under your settings (demo, ...)
    # data_dir='',                          # competition folder; empty = find it under /kaggle/input, else run the demo
    # format='auto',                        # auto | multilabel_csv | single_label_csv | folder
    # out_dir='',                           # outputs (checkpoints, submission.csv); empty = /kaggle/working or ./outputs
    # checkpoints='',                       # infer mode: checkpoint file, folder or glob
    # model='resnet50',                     # timm model name
    # pretrained_path='',                   # local weights file (.pth/.safetensors/.bin); empty = random init
    # drop_rate=0.0,                        # dropout before the classifier
    # img_size=224,                         # square input size
    # pad_aspect=2.0,                       # pad to square when long/short side exceeds this (0 = always resize)
    # pad_fill=255,                         # grey level of the padding (iMet seed pads with white)
    # aug='light',                          # none | flip | light (flip + random resized crop)
    # budget='8h30m',                       # wall-clock budget for the whole kernel, e.g. 9h, 8h30m, 90s
    # margin='auto',                        # safety margin kept free at the end of the budget; auto = 2% + 2s, at most 10m
    # epochs=0,                             # 0 = as many as fit the budget (schedule over time); >0 = fixed epochs
    # batch_size=32,
    # lr=0.001,                             # peak AdamW learning rate
    # weight_decay=0.05,
    # warmup=0.05,                          # fraction of training spent warming up
    # schedule='linear',                    # decay to zero at the end of training: linear | cosine
    # val_fraction=0.1,                     # held-out share of train for validation and thresholds
    # loss='auto',                          # auto | bce | ce
    # amp=True,                             # mixed precision on GPU
    # channels_last=True,
    # num_workers=-1,                       # -1 = all CPU cores
    # mp_context='',                        # DataLoader worker start method: '' (default) | spawn | forkserver | fork
    # seed=42,
    # ddp_procs=0,                          # data-parallel processes: 0 = one per GPU when several are visible (T4 x2), 1 = off
    # ddp_backend='',                       # '' = nccl on GPU, gloo on CPU
    # checkpoint_every='20m',               # also save last.pt at this wall-clock interval
    # resume=True,                          # continue an unfinished run from out_dir/last.pt (its time counts against the budget)
    # resume_from='',                       # continue from this checkpoint of an earlier session (e.g. an attached dataset); the budget is what this session has left
    # max_train_images=0,                   # use only this many training images (0 = all); for quick runs
    # tta=2,                                # test-time augmentation views: 1 = none, 2 = + horizontal flip
    # threshold=-1.0,                       # multi-label threshold; <0 = search on validation
    # min_labels=0,                         # multi-label: always emit at least this many labels per image
    # demo_images=1000,                     # demo: number of generated training images
)
# ------------------------------------------------------------------------------------

# Bundled sources of src/kernelkit, one module each (generated; do not edit).
_SOURCES = {
'kernelkit': r'''"""kernelkit: train a timm model inside a Kaggle time budget and write submission.csv."""
__version__ = "0.1.0"
''',
'kernelkit.budget': r'''"""Wall-clock budget and the learning-rate schedule defined over it.

Budgeted training (Li et al., ICLR 2020): for a fixed time budget, a schedule that decays to zero
exactly when the budget ends beats any schedule tuned for a number of epochs that may not fit.
So progress is measured in time (or in steps when epochs are fixed) and the LR is a function of it.
"""
from __future__ import annotations

import math
import time


class BudgetClock:
    """Seconds since the run started (possibly in an earlier process that was killed)."""

    def __init__(self, total_s: float, margin_s: float = 0.0, start_time: float | None = None):
        self.total_s, self.margin_s = float(total_s), float(margin_s)
        self.start_time = time.time() if start_time is None else float(start_time)

    def elapsed(self) -> float:
        return time.time() - self.start_time

    def remaining(self) -> float:
        return self.total_s - self.margin_s - self.elapsed()

    def fmt(self) -> str:
        return f"{fmt_seconds(self.elapsed())}/{fmt_seconds(self.total_s)}"


def fmt_seconds(s: float) -> str:
    s = max(0, int(s))
    h, m = divmod(s, 3600)
    m, sec = divmod(m, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


class InferenceReserve:
    """Time to keep for the final validation + test prediction, from measured throughput.

    Until a validation pass has been timed, inference speed is guessed from training speed
    (a forward pass costs about a third of forward+backward; assume half to stay safe).
    `startup_s` is the measured cost of a loader's first batch (worker start-up), paid twice:
    once for the final validation and once for the test loader.
    """

    def __init__(self, n_test: int, n_val: int, tta: int, overhead_s: float = 1.5, safety: float = 1.3):
        self.n_test, self.n_val, self.tta = n_test, n_val, tta
        self.overhead_s, self.safety = overhead_s, safety
        self.infer_ips: float | None = None
        self.train_ips: float | None = None
        self.startup_s = 5.0  # until measured
        self._startup_measured = False

    def observe_startup(self, seconds: float) -> None:
        """Keep the worst first-batch latency seen: persistent workers make later ones look free,
        but the test loader starts its workers from scratch."""
        self.startup_s = max(self.startup_s, seconds) if self._startup_measured else seconds
        self._startup_measured = True

    def seconds(self) -> float:
        ips = self.infer_ips or (2.0 * self.train_ips if self.train_ips else None)
        fixed = self.overhead_s + 2 * self.startup_s
        if not ips:
            return fixed
        return fixed + self.safety * (self.n_test * self.tta + self.n_val) / ips


def lr_factor(progress: float, warmup: float = 0.05, kind: str = "linear") -> float:
    """Multiplier of the peak LR at `progress` in [0, 1]: linear warmup, then decay to zero at 1."""
    p = min(max(progress, 0.0), 1.0)
    if warmup > 0 and p < warmup:
        return p / warmup
    q = (p - warmup) / max(1e-12, 1.0 - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - q)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * q))
    raise ValueError(f"unknown schedule {kind!r}; choose linear | cosine")


class Progress:
    """Where training is in [0, 1]: by time toward a (moving) deadline, or by steps.

    On resume it continues from the saved progress and spreads the rest over the time left.
    """

    def __init__(self, clock: BudgetClock, start_progress: float = 0.0, total_steps: int = 0):
        self.clock, self.p0, self.total_steps = clock, float(start_progress), total_steps
        self.t0 = clock.elapsed()

    def at(self, deadline_s: float, step: int = 0) -> float:
        if self.total_steps:
            return min(1.0, step / self.total_steps)
        span = deadline_s - self.t0
        if span <= 0:
            return 1.0
        return min(1.0, self.p0 + (1.0 - self.p0) * (self.clock.elapsed() - self.t0) / span)


def affordable_tta(level: int, n_images: int, images_per_s: float | None, seconds_left: float) -> int:
    """The most TTA views (up to `level`) whose prediction fits in `seconds_left`; at least 1."""
    if not images_per_s or n_images == 0:
        return level
    per_view = n_images / images_per_s
    return max(1, min(level, int(seconds_left // max(per_view, 1e-9))))
''',
'kernelkit.checkpoint': r'''"""Atomic checkpoints: a crash mid-save never leaves a half-written file behind."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("kernelkit")


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """weights_only=True: a checkpoint cannot run code when it is loaded."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001  (UnpicklingError and friends; re-raised with context)
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise ValueError(f"{path}: refusing checkpoint with pickled objects (weights_only=True): {e}") from e
        raise


def rng_state() -> dict[str, Any]:
    import random
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
''',
'kernelkit.competition': r'''"""Competition formats: read a Kaggle-style input folder, write and validate the submission.

A format turns a folder into a `Competition`: image paths, targets, class names, the test ids in
submission order, and how predictions become submission cells.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger("kernelkit")

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
FORMATS = ("multilabel_csv", "single_label_csv", "folder")


@dataclass
class Competition:
    format: str
    task: str  # "multilabel" or "multiclass"
    classes: list[str]  # label ids as written in the submission (e.g. "147" or "forest")
    class_names: list[str]  # human readable names (labels.csv) for logs
    train_paths: list[str]
    train_targets: np.ndarray  # multilabel: (N, C) uint8; multiclass: (N,) int64
    test_ids: list[str]
    test_paths: list[str]  # "" where the file is missing: it still gets a (fallback) row
    id_column: str = "id"
    pred_column: str = "predicted"
    sample_submission: Path | None = None
    missing_train: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _index_images(folder: Path) -> dict[str, str]:
    """Map id (file name and stem) -> path with one directory scan instead of a stat per id."""
    index: dict[str, str] = {}
    if not folder.is_dir():
        return index
    with os.scandir(folder) as it:
        for e in it:
            if e.is_file() and e.name.lower().endswith(IMAGE_EXTS):
                index.setdefault(e.name, e.path)
                index.setdefault(os.path.splitext(e.name)[0], e.path)
    return index


def _safe_id(value: object, row: int, csv: Path) -> str:
    s = str(value).strip()
    if not s or s.lower() == "nan":
        raise ValueError(f"{csv.name} row {row + 2}: empty id")
    if "/" in s or "\\" in s or s in (".", "..") or s.startswith(".."):
        # Ids name files inside the data root; a path here could read anything on disk.
        raise ValueError(f"{csv.name} row {row + 2}: id {s!r} looks like a path; refusing to read outside the data root")
    return s


def _read_csv(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    df.columns = [c.strip() for c in df.columns]
    return df


def _resolve(ids: list[str], index: dict[str, str], what: str) -> tuple[list[str], int]:
    paths = [index.get(i, "") for i in ids]
    missing = sum(1 for p in paths if not p)
    if missing:
        example = next(i for i, p in zip(ids, paths) if not p)
        log.warning("%d %s ids have no image file (e.g. %r)", missing, what, example)
    return paths, missing


def _test_ids(root: Path) -> tuple[list[str], Path | None, list[str]]:
    sample = root / "sample_submission.csv"
    test_index = _index_images(root / "test")
    if sample.is_file():
        df = _read_csv(sample)
        ids = [_safe_id(v, r, sample) for r, v in enumerate(df.iloc[:, 0])]
        return ids, sample, list(df.columns)
    ids = sorted({os.path.splitext(os.path.basename(p))[0] for p in test_index.values()})
    return ids, None, []


def detect_format(root: Path) -> str:
    train_csv = root / "train.csv"
    if train_csv.is_file():
        cols = [c.lower() for c in _read_csv(train_csv).columns]
        if "attribute_ids" in cols or (root / "labels.csv").is_file():
            return "multilabel_csv"
        return "single_label_csv"
    train = root / "train"
    if train.is_dir() and any(p.is_dir() for p in train.iterdir()):
        return "folder"
    raise FileNotFoundError(
        f"{root}: no train.csv and no train/<class>/ folders; set format= and data_dir= explicitly")


def load_competition(root: str | Path, fmt: str = "auto") -> Competition:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data_dir {root} does not exist")
    fmt = detect_format(root) if fmt == "auto" else fmt
    loader = {"multilabel_csv": _load_multilabel_csv, "single_label_csv": _load_single_label_csv,
              "folder": _load_folder}.get(fmt)
    if loader is None:
        raise ValueError(f"unknown format {fmt!r}; choose from {FORMATS}")
    comp = loader(root)
    test_index = _index_images(root / "test")
    comp.test_paths, _ = _resolve(comp.test_ids, test_index, "test")
    log.info("%s: %d train images, %d classes (%s), %d test ids", fmt, len(comp.train_paths),
             comp.num_classes, comp.task, len(comp.test_ids))
    return comp


def _load_multilabel_csv(root: Path) -> Competition:
    """iMet 2019 layout: train.csv (id, attribute_ids), labels.csv (attribute_id, attribute_name)."""
    csv = root / "train.csv"
    df = _read_csv(csv)
    id_col, lab_col = df.columns[0], ("attribute_ids" if "attribute_ids" in df.columns else df.columns[1])
    labels_csv = root / "labels.csv"
    if labels_csv.is_file():
        ldf = _read_csv(labels_csv)
        classes = [str(v).strip() for v in ldf.iloc[:, 0]]
        names = [str(v).strip() for v in ldf.iloc[:, 1]] if ldf.shape[1] > 1 else classes
    else:
        seen = sorted({t for cell in df[lab_col] for t in str(cell).split()},
                      key=lambda t: (not t.isdigit(), int(t) if t.isdigit() else 0, t))
        classes, names = seen, seen
    pos = {c: i for i, c in enumerate(classes)}
    ids, targets = [], np.zeros((len(df), len(classes)), dtype=np.uint8)
    for r, (i, cell) in enumerate(zip(df[id_col], df[lab_col])):
        ids.append(_safe_id(i, r, csv))
        for tag in str(cell).split():  # blank cell = an image with no labels
            if tag not in pos:
                raise ValueError(f"{csv.name} row {r + 2}: label {tag!r} is not in labels.csv")
            targets[r, pos[tag]] = 1
    paths, missing = _resolve(ids, _index_images(root / "train"), "train")
    keep = np.array([bool(p) for p in paths])
    test_ids, sample, cols = _test_ids(root)
    return Competition(
        format="multilabel_csv", task="multilabel", classes=classes, class_names=names,
        train_paths=[p for p in paths if p], train_targets=targets[keep], test_ids=test_ids, test_paths=[],
        id_column=cols[0] if cols else "id", pred_column=cols[1] if len(cols) > 1 else "attribute_ids",
        sample_submission=sample, missing_train=missing)


def _load_single_label_csv(root: Path) -> Competition:
    """train.csv with (id, label); the submission has one class per id (iNaturalist's id,predicted)."""
    csv = root / "train.csv"
    df = _read_csv(csv)
    if df.shape[1] < 2:
        raise ValueError(f"{csv}: need two columns (id, label), found {list(df.columns)}")
    id_col, lab_col = df.columns[0], df.columns[1]
    raw = [str(v).strip() for v in df[lab_col]]
    for r, v in enumerate(raw):
        if not v:
            raise ValueError(f"{csv.name} row {r + 2}: empty label")
    classes = sorted(set(raw), key=lambda t: (not t.lstrip("-").isdigit(), int(t) if t.lstrip("-").isdigit() else 0, t))
    pos = {c: i for i, c in enumerate(classes)}
    ids = [_safe_id(v, r, csv) for r, v in enumerate(df[id_col])]
    targets = np.array([pos[v] for v in raw], dtype=np.int64)
    paths, missing = _resolve(ids, _index_images(root / "train"), "train")
    keep = np.array([bool(p) for p in paths])
    test_ids, sample, cols = _test_ids(root)
    return Competition(
        format="single_label_csv", task="multiclass", classes=classes, class_names=classes,
        train_paths=[p for p in paths if p], train_targets=targets[keep], test_ids=test_ids, test_paths=[],
        id_column=cols[0] if cols else "id", pred_column=cols[1] if len(cols) > 1 else "predicted",
        sample_submission=sample, missing_train=missing)


def _load_folder(root: Path) -> Competition:
    """train/<class>/*.jpg (Scene-15, Keras flow_from_directory); test/*.jpg."""
    class_dirs = sorted(p for p in (root / "train").iterdir() if p.is_dir())
    classes = [p.name for p in class_dirs]
    paths, targets = [], []
    for k, d in enumerate(class_dirs):
        files = sorted(set(_index_images(d).values()))
        paths += files
        targets += [k] * len(files)
    test_ids, sample, cols = _test_ids(root)
    return Competition(
        format="folder", task="multiclass", classes=classes, class_names=classes,
        train_paths=paths, train_targets=np.array(targets, dtype=np.int64), test_ids=test_ids, test_paths=[],
        id_column=cols[0] if cols else "id", pred_column=cols[1] if len(cols) > 1 else "label",
        sample_submission=sample)


def format_predictions(comp: Competition, decoded: list[list[int]] | np.ndarray) -> list[str]:
    """Class indices per image -> submission cells (space-separated ids, or one class)."""
    if comp.task == "multilabel":
        return [" ".join(comp.classes[k] for k in row) for row in decoded]
    return [comp.classes[int(k)] for k in decoded]


def write_submission(comp: Competition, cells: list[str], path: Path) -> pd.DataFrame:
    if len(cells) != len(comp.test_ids):
        raise ValueError(f"{len(cells)} predictions for {len(comp.test_ids)} test ids")
    df = pd.DataFrame({comp.id_column: comp.test_ids, comp.pred_column: cells})
    tmp = path.with_name(path.name + ".tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)
    validate_submission(path, comp)
    return df


def validate_submission(path: Path, comp: Competition) -> None:
    """Same ids, same order, same columns as sample_submission.csv, and a cell for every row."""
    sub = _read_csv(path)
    if comp.sample_submission is not None:
        sample = _read_csv(comp.sample_submission)
        if list(sub.columns) != list(sample.columns):
            raise ValueError(f"submission columns {list(sub.columns)} != sample {list(sample.columns)}")
        if len(sub) != len(sample):
            raise ValueError(f"submission has {len(sub)} rows, sample_submission has {len(sample)}")
        a, b = sub.iloc[:, 0].str.strip().to_numpy(), sample.iloc[:, 0].str.strip().to_numpy()
        bad = np.flatnonzero(a != b)
        if bad.size:
            raise ValueError(f"submission row {bad[0] + 2}: id {a[bad[0]]!r} != sample's {b[bad[0]]!r}")
    elif len(sub) != len(comp.test_ids):
        raise ValueError(f"submission has {len(sub)} rows for {len(comp.test_ids)} test ids")
    if sub.iloc[:, 0].duplicated().any():
        raise ValueError("submission has duplicated ids")
    if comp.task == "multiclass" and (sub.iloc[:, 1].str.strip() == "").any():
        raise ValueError("submission has empty predictions")
''',
'kernelkit.config': r'''"""The one typed config. Defaults < preset < CONFIG block in kernel.py < command line."""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # what to run
    mode: str = _f("train", "train: train then predict | infer: predict from saved checkpoints")
    preset: str = _f("", "named preset applied under your settings (demo, ...)")
    data_dir: str = _f("", "competition folder; empty = find it under /kaggle/input, else run the demo")
    format: str = _f("auto", "auto | multilabel_csv | single_label_csv | folder")
    out_dir: str = _f("", "outputs (checkpoints, submission.csv); empty = /kaggle/working or ./outputs")
    checkpoints: str = _f("", "infer mode: checkpoint file, folder or glob")
    # model
    model: str = _f("resnet50", "timm model name")
    pretrained_path: str = _f("", "local weights file (.pth/.safetensors/.bin); empty = random init")
    drop_rate: float = _f(0.0, "dropout before the classifier")
    # images
    img_size: int = _f(224, "square input size")
    pad_aspect: float = _f(2.0, "pad to square when long/short side exceeds this (0 = always resize)")
    pad_fill: int = _f(255, "grey level of the padding (iMet seed pads with white)")
    aug: str = _f("light", "none | flip | light (flip + random resized crop)")
    # training
    budget: str = _f("8h30m", "wall-clock budget for the whole kernel, e.g. 9h, 8h30m, 90s")
    margin: str = _f("auto", "safety margin kept free at the end of the budget; auto = 2% + 2s, at most 10m")
    epochs: int = _f(0, "0 = as many as fit the budget (schedule over time); >0 = fixed epochs")
    batch_size: int = _f(32, "")
    lr: float = _f(1e-3, "peak AdamW learning rate")
    weight_decay: float = _f(0.05, "")
    warmup: float = _f(0.05, "fraction of training spent warming up")
    schedule: str = _f("linear", "decay to zero at the end of training: linear | cosine")
    val_fraction: float = _f(0.1, "held-out share of train for validation and thresholds")
    loss: str = _f("auto", "auto | bce | ce")
    amp: bool = _f(True, "mixed precision on GPU")
    channels_last: bool = _f(True, "")
    num_workers: int = _f(-1, "-1 = all CPU cores")
    mp_context: str = _f("", "DataLoader worker start method: '' (default) | spawn | forkserver | fork")
    seed: int = _f(42, "")
    ddp_procs: int = _f(0, "data-parallel processes: 0 = one per GPU when several are visible (T4 x2), 1 = off")
    ddp_backend: str = _f("", "'' = nccl on GPU, gloo on CPU")
    checkpoint_every: str = _f("20m", "also save last.pt at this wall-clock interval")
    resume: bool = _f(True, "continue an unfinished run from out_dir/last.pt (its time counts against the budget)")
    resume_from: str = _f("", "continue from this checkpoint of an earlier session (e.g. an attached dataset); "
                              "the budget is what this session has left")
    max_train_images: int = _f(0, "use only this many training images (0 = all); for quick runs")
    # inference
    tta: int = _f(2, "test-time augmentation views: 1 = none, 2 = + horizontal flip")
    threshold: float = _f(-1.0, "multi-label threshold; <0 = search on validation")
    min_labels: int = _f(0, "multi-label: always emit at least this many labels per image")
    # demo
    demo_images: int = _f(1000, "demo: number of generated training images")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def pretty(self) -> str:
        return "\n".join(f"  {k:<18} = {v!r}" for k, v in self.to_dict().items())


# Presets set what a project needs; later issues add one per seed.
PRESETS: dict[str, dict[str, Any]] = {
    "demo": dict(
        model="resnet18", img_size=64, batch_size=32, lr=2e-3, budget="150s",
        aug="flip", pad_aspect=2.0, val_fraction=0.2, checkpoint_every="1m", tta=2, warmup=0.05,
    ),
}


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([hms]?)")


def parse_duration(text: str | float | int) -> float:
    """'9h', '8h30m', '90s', '1.5h', '600' -> seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    s = text.strip().lower().replace(" ", "")
    if not s:
        raise ValueError("empty duration")
    pos, total = 0, 0.0
    for m in _DURATION.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * {"h": 3600, "m": 60, "s": 1, "": 1}[m.group(2)]
        pos = m.end()
    if pos != len(s):
        raise ValueError(f"cannot parse duration {text!r}; use e.g. 9h, 8h30m, 90s")
    return total


def _coerce(value: str, typ: Any) -> Any:
    if typ in (bool, "bool"):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {value!r}")
    return {"int": int, "float": float, "str": str}.get(typ, typ)(value) if isinstance(typ, str) else typ(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Kaggle image-classification kernel")
    for f in fields(Config):
        typ = f.type if not isinstance(f.type, str) else f.type
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None,
                       help=f"{f.metadata.get('help', '')} (default {f.default!r})",
                       type=lambda v, t=typ: _coerce(v, t))
    p.add_argument("--dry-run", action="store_true", help="short local run that reports throughput")
    return p


def make_config(block: dict[str, Any] | None = None, argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """Merge defaults, the named preset, the CONFIG block and command-line flags, in that order."""
    args = build_parser().parse_args(argv)
    cli = {k: v for k, v in vars(args).items() if v is not None and k in Config.__dataclass_fields__}
    block = dict(block or {})
    preset = cli.get("preset", block.get("preset", ""))
    merged: dict[str, Any] = {}
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        merged.update(PRESETS[preset])
    merged.update(block)
    merged.update(cli)
    cfg = Config.from_dict(merged)
    budget_seconds(cfg), parse_duration(cfg.checkpoint_every)
    return cfg, args


def budget_seconds(cfg: Config) -> tuple[float, float]:
    """-> (budget, margin) in seconds; the margin must leave time to work with."""
    total = parse_duration(cfg.budget)
    # Fixed costs (interpreter exit, worker teardown) dominate short runs, a share of the budget long ones.
    margin = min(600.0, 0.02 * total + 2.0) if cfg.margin == "auto" else parse_duration(cfg.margin)
    if total <= 0 or margin >= total:
        raise ValueError(f"budget {cfg.budget!r} must be positive and larger than margin {cfg.margin!r}")
    return total, margin
''',
'kernelkit.data': r'''"""Datasets and loaders. Bad files never stop a run: they become a blank image with ok=0."""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .images import BadImage, load_rgb

log = logging.getLogger("kernelkit")


class ImageDataset(Dataset):
    """(uint8 CHW image, target, ok). `ok` is 0 for an unreadable file so the loss can ignore it
    while batch shapes stay fixed and every test id still gets a prediction."""

    def __init__(self, paths: list[str], targets: np.ndarray | None, transform: Callable,
                 size: int, fill: int = 255):
        self.paths, self.targets, self.transform = list(paths), targets, transform
        self.size, self.fill = size, fill

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            img = self.transform(load_rgb(self.paths[i], self.size, self.fill))
            ok = 1.0
        except BadImage as e:
            log.warning("bad image skipped: %s", e)
            img = torch.full((3, self.size, self.size), 128, dtype=torch.uint8)
            ok = 0.0
        if self.targets is None:
            target = torch.zeros(())
        else:
            t = self.targets[i]
            target = torch.as_tensor(t, dtype=torch.float32 if np.ndim(t) else torch.long)
        return img, target, torch.tensor(ok)


def split_indices(targets: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified for single-label targets, random for multi-label; both sides non-empty."""
    n = len(targets)
    rng = np.random.default_rng(seed)
    if val_fraction <= 0 or n < 2:
        return np.arange(n), np.arange(0)
    if targets.ndim == 1:
        val = []
        for c in np.unique(targets):
            idx = rng.permutation(np.flatnonzero(targets == c))
            k = int(round(len(idx) * val_fraction))
            val.extend(idx[:k] if len(idx) > 1 else [])
        val = np.array(sorted(val), dtype=np.int64)
    else:
        perm = rng.permutation(n)
        val = np.sort(perm[:max(1, int(round(n * val_fraction)))])
    mask = np.ones(n, bool)
    mask[val] = False
    return np.flatnonzero(mask), val


def make_loader(ds: Dataset, batch_size: int, train: bool, num_workers: int, mp_context: str = "",
                pin_memory: bool = False, seed: int = 0, sampler=None) -> DataLoader:
    """`sampler` (e.g. DistributedSampler) replaces the loader's own shuffling."""
    kwargs = {}
    if num_workers > 0:
        # Persistent workers: under spawn each worker re-imports torch (seconds), once per run is enough.
        kwargs.update(persistent_workers=True, prefetch_factor=4)
        if mp_context:
            kwargs["multiprocessing_context"] = mp_context
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                      drop_last=train and len(ds) > batch_size, num_workers=num_workers, pin_memory=pin_memory,
                      generator=g, worker_init_fn=seed_worker, **kwargs)


def seed_worker(worker_id: int) -> None:
    """Python's `random` drives the augmentations; give each worker its own stream."""
    import random
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
''',
'kernelkit.decode': r'''"""Probabilities -> class indices."""
from __future__ import annotations

import numpy as np


def decode_multilabel(probs: np.ndarray, threshold: float, min_labels: int = 0) -> np.ndarray:
    """Boolean (N, C): probs above threshold, plus the top `min_labels` of each image."""
    pred = probs > threshold
    if min_labels > 0:
        top = np.argsort(-probs, axis=1)[:, :min_labels]
        np.put_along_axis(pred, top, True, axis=1)
    return pred


def decode(task: str, probs: np.ndarray, threshold: float = 0.5, min_labels: int = 0) -> list:
    if task == "multilabel":
        return [np.flatnonzero(row).tolist() for row in decode_multilabel(probs, threshold, min_labels)]
    return probs.argmax(1).tolist()
''',
'kernelkit.demo': r'''"""A small iMet-style competition generated on the fly, so the kernel runs with no data attached.

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
''',
'kernelkit.distributed': r'''"""Data-parallel training over several processes (Kaggle's "GPU T4 x2"), started from inside
kernel.py (no torchrun on Kaggle) or by torchrun.

Rank 0 owns the budget clock: it decides when training stops and what the schedule position is,
and broadcasts both every step, so all ranks take the same number of steps with the same LR.
Only rank 0 validates, writes checkpoints and the submission.
"""
from __future__ import annotations

import datetime
import inspect
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        if torch.cuda.is_available() and self.backend != "gloo":
            return torch.device("cuda", self.local_rank)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


SINGLE = DistInfo()


def from_torchrun() -> DistInfo | None:
    """torchrun (or any launcher using env://) sets RANK / WORLD_SIZE / LOCAL_RANK."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))


def wanted_processes(ddp_procs: int) -> int:
    """0 = one per GPU when several are visible; 1 = off; N = N processes (gloo on CPU)."""
    if ddp_procs > 0:
        return ddp_procs
    return torch.cuda.device_count() if torch.cuda.device_count() > 1 else 1


def default_backend(backend: str) -> str:
    return backend or ("nccl" if torch.cuda.is_available() else "gloo")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(info: DistInfo, init_method: str = "env://", timeout_s: float = 1800.0) -> None:
    if info.backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(info.backend, init_method=init_method, rank=info.rank, world_size=info.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def agree(info: DistInfo, stop: bool, progress: float) -> tuple[bool, float]:
    """Everyone adopts rank 0's decision and schedule position."""
    if not info.enabled:
        return stop, progress
    t = torch.tensor([float(stop), progress], dtype=torch.float64, device=_comm_device(info))
    dist.broadcast(t, src=0)
    return bool(t[0].item()), float(t[1].item())


def all_finite(info: DistInfo, loss: torch.Tensor) -> bool:
    """True when the loss is finite on every rank."""
    finite = torch.isfinite(loss.detach())
    if not info.enabled:
        return bool(finite)
    t = finite.to(torch.float32).reshape(1).to(_comm_device(info))
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def broadcast_object(info: DistInfo, obj):
    """Rank 0's value of a small picklable object, on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_comm_device(info))
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def _comm_device(info: DistInfo) -> torch.device:
    return torch.device("cuda", info.local_rank) if info.backend == "nccl" else torch.device("cpu")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def wrap(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    if not info.enabled:
        return model
    device_ids = [info.local_rank] if info.backend == "nccl" else None
    # No buffer sync inside forward: rank 0 validates alone, and a collective inside its forward
    # would wait forever for ranks that are not running one. (Newer torch renamed the switch.)
    params = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **no_sync)
''',
'kernelkit.env': r'''"""Every switch that depends on where we run (Kaggle or local) lives here.

Importing this module sets the offline flags, so it must be imported before timm.
"""
from __future__ import annotations

import os
from pathlib import Path

# timm/huggingface_hub otherwise retry a download for ~46 s before failing when internet is off.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

KAGGLE_INPUT = Path("/kaggle/input")
KAGGLE_WORKING = Path("/kaggle/working")


def on_kaggle() -> bool:
    return "KAGGLE_KERNEL_RUN_TYPE" in os.environ or KAGGLE_WORKING.is_dir()


def default_out_dir() -> Path:
    return KAGGLE_WORKING if on_kaggle() else Path("outputs")


def find_competition_dir(input_root: Path = KAGGLE_INPUT) -> Path | None:
    """The attached dataset that looks like a competition: it has train data beside it.

    Kaggle mounts competitions at /kaggle/input/<slug> (newer images use
    /kaggle/input/competitions/<slug>), so look two levels deep.
    """
    if not input_root.is_dir():
        return None
    candidates = []
    for child in sorted(input_root.iterdir()):
        for d in [child, *sorted(p for p in child.iterdir() if p.is_dir())] if child.is_dir() else []:
            if (d / "train.csv").is_file() or (d / "train").is_dir():
                candidates.append(d)
    return candidates[0] if candidates else None


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1
''',
'kernelkit.images': r'''"""Robust image decoding: any file Pillow can open becomes an RGB image, or a clear error."""
from __future__ import annotations

import warnings

import numpy as np
from PIL import Image, ImageOps

# Kaggle images can be huge (iMet up to 7351 x 5314); allow them but keep a bound against bombs.
Image.MAX_IMAGE_PIXELS = 300_000_000


class BadImage(Exception):
    """A file that cannot be decoded; the message names the file and the reason."""


def to_rgb(img: Image.Image, fill: int = 255) -> Image.Image:
    """Convert every Pillow mode to RGB; transparent pixels become `fill` (white like the iMet seed)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float32)
        hi = float(arr.max()) or 1.0
        scale = 255.0 / (65535.0 if hi > 255 else max(hi, 255.0))
        return Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / ((hi - lo) or 1.0) * 255.0
        return Image.fromarray(arr.astype(np.uint8)).convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (fill, fill, fill, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def load_rgb(path: str, target_size: int = 0, fill: int = 255) -> Image.Image:
    """Open, apply EXIF orientation, convert to RGB.

    `target_size` lets JPEG decode at a reduced scale (draft) when the image is much larger than
    needed; it never goes below twice the target so quality is kept for the resize that follows.
    """
    if not path:
        raise BadImage("missing file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            if target_size and img.format == "JPEG" and min(img.size) > 4 * target_size:
                img.draft("RGB", (2 * target_size, 2 * target_size))
            img = ImageOps.exif_transpose(img)
            img.load()
            return to_rgb(img, fill)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise BadImage(f"{path}: {type(e).__name__}: {e}") from e
''',
'kernelkit.infer': r'''"""Batch-wise prediction with test-time augmentation; probabilities averaged over views."""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Sequence

import numpy as np
import torch

from .progress import progress
from .transforms import normalize, tta_identity


def autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def activation(task: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return torch.sigmoid if task == "multilabel" else _softmax


def _softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, dim=1)


@torch.no_grad()
def predict(model: torch.nn.Module, loader, device: torch.device, task: str,
            views: Sequence[Callable] = (tta_identity,), amp: bool = True, channels_last: bool = False,
            desc: str = "predict") -> dict:
    """-> {probs (N, C) float32, ok (N,) bool, seconds, first_batch_s, images_per_s}.

    images_per_s counts image-views after the first batch, so worker start-up (seconds under
    spawn) does not distort the estimate the budget planner uses; first_batch_s holds that cost.
    """
    model.eval()
    act = activation(task)
    probs, oks = [], []
    t0 = time.time()
    t_first = None
    for images, _, ok in progress(loader, desc=desc):
        x = normalize(images.to(device, non_blocking=True), channels_last)
        with autocast(device, amp):
            p = sum(act(model(view(x)).float()) for view in views) / len(views)
        probs.append(p.cpu().numpy())
        oks.append(ok.numpy() > 0)
        if t_first is None:
            t_first = time.time()
    t_end = time.time()
    n = sum(len(p) for p in probs)
    steady_n = n - (len(probs[0]) if len(probs) > 1 else 0)
    steady_s = (t_end - t_first) if len(probs) > 1 else (t_end - t0)
    return {
        "probs": np.concatenate(probs) if probs else np.zeros((0, 0), np.float32),
        "ok": np.concatenate(oks) if oks else np.zeros(0, bool),
        "seconds": t_end - t0,
        "first_batch_s": (t_first or t_end) - t0,
        "images_per_s": steady_n * len(views) / max(steady_s, 1e-9),
    }
''',
'kernelkit.losses': r'''"""Losses that accept a per-sample weight (0 for unreadable images)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bce_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    per_sample = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none").mean(1)
    return (per_sample * weight).sum() / weight.sum().clamp_min(1.0)


def ce_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    per_sample = F.cross_entropy(logits.float(), targets, reduction="none")
    return (per_sample * weight).sum() / weight.sum().clamp_min(1.0)


def get_loss(name: str, task: str):
    name = {"auto": "bce" if task == "multilabel" else "ce"}.get(name, name)
    losses = {"bce": bce_loss, "ce": ce_loss}
    if name not in losses:
        raise ValueError(f"unknown loss {name!r}; choose from {sorted(losses)}")
    if task == "multilabel" and name == "ce" or task == "multiclass" and name == "bce":
        raise ValueError(f"loss {name!r} does not fit a {task} task")
    return losses[name]
''',
'kernelkit.metrics': r'''"""Competition metrics on numpy arrays."""
from __future__ import annotations

import numpy as np


def fbeta_per_image(truth: np.ndarray, pred: np.ndarray, beta: float = 2.0) -> float:
    """F-beta of each image's label set, averaged over images (iMet 2019's F2).

    An image with no true and no predicted labels scores 1 (sklearn's zero_division=1).
    """
    truth, pred = truth.astype(bool), pred.astype(bool)
    tp = (truth & pred).sum(1).astype(np.float64)
    p, t = pred.sum(1), truth.sum(1)
    b2 = beta * beta
    denom = b2 * t + p
    score = np.where(denom > 0, (1 + b2) * tp / np.maximum(denom, 1), 1.0)
    return float(score.mean()) if len(score) else 0.0


def accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    return float((probs.argmax(1) == labels).mean()) if len(labels) else 0.0


def top_k_error(labels: np.ndarray, probs: np.ndarray, k: int = 1) -> float:
    top = np.argsort(-probs, axis=1)[:, :k]
    return float(1.0 - (top == labels[:, None]).any(1).mean()) if len(labels) else 1.0


def search_threshold(truth: np.ndarray, probs: np.ndarray, beta: float = 2.0, min_labels: int = 0,
                     grid: np.ndarray | None = None) -> tuple[float, float]:
    """Best single global threshold on validation probabilities -> (threshold, score)."""
    from .decode import decode_multilabel
    grid = np.round(np.arange(0.02, 0.96, 0.01), 2) if grid is None else grid
    best_t, best_s = 0.5, -1.0
    for t in grid:
        s = fbeta_per_image(truth, decode_multilabel(probs, float(t), min_labels), beta)
        if s > best_s:
            best_t, best_s = float(t), s
    return best_t, best_s


def prior_baseline(task: str, train_targets: np.ndarray, val_targets: np.ndarray, beta: float = 2.0) -> float:
    """Score of the best constant prediction from training label frequencies: the bar to beat."""
    if task == "multiclass":
        majority = np.bincount(train_targets).argmax() if len(train_targets) else 0
        return float((val_targets == majority).mean()) if len(val_targets) else 0.0
    freq = train_targets.mean(0)
    probs = np.broadcast_to(freq, val_targets.shape)
    return search_threshold(val_targets, probs, beta, grid=np.unique(np.concatenate([[0.0], freq])))[1]
''',
'kernelkit.models': r'''"""timm models by name; pretrained weights only ever from a local file."""
from __future__ import annotations

import logging
from pathlib import Path

from . import env  # noqa: F401  (sets HF_HUB_OFFLINE before timm is imported)
import timm
import torch

log = logging.getLogger("kernelkit")


def create_model(name: str, num_classes: int, pretrained_path: str = "", drop_rate: float = 0.0) -> torch.nn.Module:
    """Build `name` with a fresh `num_classes` head.

    With `pretrained_path`, timm loads that file through `pretrained_cfg_overlay` and drops the
    classifier when its size differs, so ImageNet weights give a new head for our classes.
    """
    if name not in timm.list_models() and not timm.is_model(name):
        raise ValueError(f"timm has no model {name!r} (timm {timm.__version__})")
    kwargs = dict(num_classes=num_classes, drop_rate=drop_rate)
    if pretrained_path:
        path = Path(pretrained_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"pretrained_path {path} not found; attach the weights as a Kaggle dataset and point to the file")
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
        log.info("loaded pretrained weights from %s", path)
    else:
        model = timm.create_model(name, pretrained=False, **kwargs)
    return model
''',
'kernelkit.plan': r'''"""Dry-run planner: measure throughput on a few batches, then lay the full budget out.

Throughput is measured on the machine the dry run runs on; run it on the Kaggle accelerator (a
short interactive session) for a plan that holds there.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .budget import fmt_seconds


@dataclass
class Plan:
    budget_s: float
    margin_s: float
    setup_s: float
    train_images_per_s: float
    infer_images_per_s: float
    n_train: int
    n_val: int
    n_test: int
    tta: int
    epoch_s: float
    inference_s: float
    train_s: float
    epochs_that_fit: float
    epochs_requested: int
    fits: bool
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        rows = [
            ("budget", fmt_seconds(self.budget_s)),
            ("safety margin", fmt_seconds(self.margin_s)),
            ("setup (imports, data index, model)", fmt_seconds(self.setup_s)),
            ("training throughput", f"{self.train_images_per_s:.1f} images/s"),
            ("inference throughput", f"{self.infer_images_per_s:.1f} image-views/s"),
            ("one epoch (train + validation)", f"{fmt_seconds(self.epoch_s)} for {self.n_train} + {self.n_val} images"),
            (f"inference ({self.n_test} test images x {self.tta} TTA views + final validation)",
             fmt_seconds(self.inference_s)),
            ("time left for training", fmt_seconds(self.train_s)),
            ("epochs that fit", f"{self.epochs_that_fit:.1f}"
             + (f" (requested {self.epochs_requested})" if self.epochs_requested else " (schedule follows the clock)")),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"  {k:<{width}}  {v}" for k, v in rows]
        lines += [f"  WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)


def make_plan(*, budget_s: float, margin_s: float, setup_s: float, train_ips: float, infer_ips: float,
              n_train: int, n_val: int, n_test: int, tta: int, epochs: int = 0,
              loader_startup_s: float = 0.0, safety: float = 1.3) -> Plan:
    """Same arithmetic as the live run's InferenceReserve, so the plan predicts what training will do."""
    val_s = n_val / infer_ips
    epoch_s = n_train / train_ips + val_s
    inference_s = 2 * loader_startup_s + safety * (n_test * tta + n_val) / infer_ips
    train_s = budget_s - margin_s - setup_s - inference_s
    fit_epochs = max(0.0, train_s / epoch_s)
    warnings = []
    if train_s <= 0:
        warnings.append("no time left to train: inference alone needs more than the budget; "
                        "lower tta, img_size or pick a faster model")
    elif fit_epochs < 1:
        warnings.append(f"less than one epoch fits ({fit_epochs:.2f}); the schedule still ends at the deadline")
    if epochs and epochs > fit_epochs:
        warnings.append(f"epochs={epochs} does not fit: ~{fit_epochs:.1f} do; training will stop at the deadline "
                        "with the LR not yet decayed (use epochs=0 to schedule over time)")
    return Plan(budget_s=budget_s, margin_s=margin_s, setup_s=setup_s, train_images_per_s=train_ips,
                infer_images_per_s=infer_ips, n_train=n_train, n_val=n_val, n_test=n_test, tta=tta,
                epoch_s=epoch_s, inference_s=inference_s, train_s=train_s, epochs_that_fit=fit_epochs,
                epochs_requested=epochs, fits=not warnings, warnings=warnings)
''',
'kernelkit.progress': r'''"""tqdm that stays readable in Kaggle's log, where every carriage-return refresh becomes a line."""
from __future__ import annotations

import sys
from typing import Iterable

from tqdm.auto import tqdm


class _LineWriter:
    """Turns tqdm's '\\r'-refreshes into whole lines, so a non-tty log gets one clean line each."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s: str) -> None:
        s = s.replace("\r", "").strip()
        if s:
            self.stream.write(s + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(it: Iterable, desc: str = "", total: int | None = None, log_every_s: float = 30.0, **kw) -> tqdm:
    if sys.stderr.isatty():
        return tqdm(it, desc=desc, total=total, dynamic_ncols=True, **kw)
    # Kaggle/CI logs: loops shorter than `log_every_s` print nothing (the caller logs a summary),
    # longer ones print a line every `log_every_s`.
    return tqdm(it, desc=desc, total=total, mininterval=log_every_s, delay=log_every_s, ascii=True,
                ncols=100, file=_LineWriter(sys.stdout), **kw)
''',
'kernelkit.run': r'''"""The adapter from Config to the library: train, predict, write submission.csv.

Whatever happens in training, a submission is written from the best weights available; the exit
status says what happened (see EXIT_*).
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed, env
from .budget import BudgetClock, InferenceReserve, affordable_tta, fmt_seconds
from .checkpoint import load_checkpoint, set_rng_state
from .competition import Competition, format_predictions, load_competition, write_submission
from .config import Config, budget_seconds, make_config, parse_duration
from .data import ImageDataset, make_loader, split_indices
from .decode import decode
from .demo import make_demo_competition
from .distributed import DistInfo
from .infer import predict
from .losses import get_loss
from .metrics import fbeta_per_image, prior_baseline
from .models import create_model
from .plan import Plan, make_plan
from .session import begin_run, finish_run
from .train import FitOptions, FitState, fit, train_one_epoch
from .transforms import EvalTransform, TrainTransform, tta_views

log = logging.getLogger("kernelkit")

EXIT_OK = 0
EXIT_NO_SUBMISSION = 1
EXIT_TRAIN_FAILED = 3  # training raised; submission.csv written from the best checkpoint
EXIT_PLAN_DOES_NOT_FIT = 4  # --dry-run: the plan does not fit the budget


def setup_logging() -> None:
    if not log.handlers:
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False


def resolve_paths(cfg: Config) -> tuple[Path, Path, bool]:
    """-> (data_dir, out_dir, is_demo)."""
    out_dir = Path(cfg.out_dir) if cfg.out_dir else env.default_out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.data_dir:
        return Path(cfg.data_dir), out_dir, False
    found = env.find_competition_dir()
    if found is not None:
        return found, out_dir, False
    return out_dir / "demo_data", out_dir, True


def num_workers(cfg: Config) -> int:
    return min(env.cpu_count(), 8) if cfg.num_workers < 0 else cfg.num_workers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_test_loader(cfg: Config, comp: Competition, device: torch.device):
    ds = ImageDataset(comp.test_paths, None, EvalTransform(cfg.img_size, cfg.pad_aspect, cfg.pad_fill),
                      cfg.img_size, cfg.pad_fill)
    return make_loader(ds, cfg.batch_size * 2, False, num_workers(cfg), cfg.mp_context, device.type == "cuda")


def write_outputs(comp: Competition, probs: np.ndarray, ok: np.ndarray, task: str, threshold: float,
                  min_labels: int, out_dir: Path) -> Path:
    """Decode, write submission.csv (validated) and the raw probabilities for blending."""
    if (~ok).any():
        log.warning("%d test images could not be read; their rows use the model's output on a blank image",
                    int((~ok).sum()))
    np.save(out_dir / "test_probs.npy", probs.astype(np.float32))
    cells = format_predictions(comp, decode(task, probs, threshold, min_labels))
    path = out_dir / "submission.csv"
    write_submission(comp, cells, path)
    log.info("submission written: %s (%d rows)", path.resolve(), len(cells))
    return path


def load_resume_checkpoint(path: Path | None, cfg: Config, comp: Competition) -> dict[str, Any] | None:
    if path is None:
        return None
    ckpt = load_checkpoint(path)
    if ckpt.get("classes") != comp.classes or ckpt.get("config", {}).get("model") != cfg.model:
        log.warning("%s belongs to a different model or label set; starting fresh", path)
        return None
    return ckpt


@dataclass
class TrainingData:
    train_loader: Any
    val_loader: Any
    train_targets: np.ndarray
    val_targets: np.ndarray


def build_training_data(cfg: Config, comp: Competition, device: torch.device,
                        info: DistInfo = distributed.SINGLE) -> TrainingData:
    nw, pin = num_workers(cfg), device.type == "cuda"
    targets, paths = comp.train_targets, comp.train_paths
    if cfg.max_train_images and len(paths) > cfg.max_train_images:
        keep = np.sort(np.random.default_rng(cfg.seed).permutation(len(paths))[:cfg.max_train_images])
        paths, targets = [paths[i] for i in keep], targets[keep]
    tr_idx, va_idx = split_indices(targets, cfg.val_fraction, cfg.seed)
    if len(tr_idx) == 0:
        raise ValueError("no training images found")
    train_ds = ImageDataset([paths[i] for i in tr_idx], targets[tr_idx],
                            TrainTransform(cfg.img_size, cfg.pad_aspect, cfg.pad_fill, cfg.aug), cfg.img_size, cfg.pad_fill)
    val_ds = ImageDataset([paths[i] for i in va_idx], targets[va_idx],
                          EvalTransform(cfg.img_size, cfg.pad_aspect, cfg.pad_fill), cfg.img_size, cfg.pad_fill)
    log.info("train %d / validation %d images, %d workers, device %s", len(train_ds), len(val_ds), nw, device)
    sampler = None
    if info.enabled:  # each rank sees its own shard, the same number of batches on every rank
        sampler = torch.utils.data.DistributedSampler(train_ds, info.world_size, info.rank, shuffle=True,
                                                      seed=cfg.seed, drop_last=True)
    return TrainingData(
        train_loader=make_loader(train_ds, cfg.batch_size, True, nw, cfg.mp_context, pin, cfg.seed, sampler),
        val_loader=(make_loader(val_ds, cfg.batch_size * 2, False, nw, cfg.mp_context, pin)
                    if len(val_ds) and info.is_main else None),
        train_targets=targets[tr_idx], val_targets=targets[va_idx])


def build_model_and_optimizer(cfg: Config, num_classes: int, device: torch.device):
    model = create_model(cfg.model, num_classes, cfg.pretrained_path, cfg.drop_rate).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and device.type == "cuda")
    return model, optimizer, scaler


def restore(ckpt: dict[str, Any], model, optimizer, scaler) -> FitState:
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    return FitState(epoch=ckpt["epoch"], step=ckpt["step"], progress=ckpt["progress"],
                    best_score=ckpt["best_score"], threshold=ckpt["threshold"])


def fit_options(cfg: Config) -> FitOptions:
    return FitOptions(lr=cfg.lr, warmup=cfg.warmup, schedule=cfg.schedule, epochs=cfg.epochs, amp=cfg.amp,
                      channels_last=cfg.channels_last, checkpoint_every_s=parse_duration(cfg.checkpoint_every),
                      threshold=cfg.threshold, min_labels=cfg.min_labels)


def train_and_predict(cfg: Config, comp: Competition, out_dir: Path, device: torch.device,
                      clock: BudgetClock, resume_path: Path | None = None,
                      info: DistInfo = distributed.SINGLE) -> tuple[int, dict]:
    data = build_training_data(cfg, comp, device, info)
    model, optimizer, scaler = build_model_and_optimizer(cfg, comp.num_classes, device)
    state = FitState()
    ckpt = load_resume_checkpoint(resume_path, cfg, comp)
    if ckpt is not None:
        state = restore(ckpt, model, optimizer, scaler)
        log.info("resumed from %s: epoch %d, step %d, progress %.2f; %s of the budget already spent",
                 resume_path, state.epoch, state.step, state.progress, fmt_seconds(clock.elapsed()))
    model = distributed.wrap(model, info)
    n_val = len(data.val_targets)
    reserve = InferenceReserve(len(comp.test_ids), n_val, cfg.tta)
    extra = {"config": cfg.to_dict(), "classes": comp.classes, "task": comp.task}
    summary: dict[str, Any] = {"train_images": len(data.train_targets), "val_images": n_val,
                               "train_start_s": round(clock.elapsed(), 1)}
    status = EXIT_OK
    try:
        result = fit(model, data.train_loader, data.val_loader, data.val_targets, task=comp.task,
                     loss_fn=get_loss(cfg.loss, comp.task), optimizer=optimizer, scaler=scaler, device=device,
                     clock=clock, reserve=reserve, opts=fit_options(cfg), out_dir=out_dir, state=state, extra=extra,
                     dist=info)
        summary.update(stop_reason=result["stop_reason"], epochs=len(result["history"]), steps=state.step)
        if state.step == 0:
            log.warning("the budget left no time to train (%s left, inference needs ~%s); predicting untrained",
                        fmt_seconds(clock.remaining()), fmt_seconds(reserve.seconds()))
    except Exception:  # noqa: BLE001  (the run must still produce a submission)
        log.exception("training failed; predicting with the best checkpoint available")
        status = EXIT_TRAIN_FAILED
        summary["stop_reason"] = "error"
    summary["train_end_s"] = round(clock.elapsed(), 1)
    if not info.is_main:
        return status, summary
    model = distributed.unwrap(model)

    threshold = state.threshold
    for name in ("best.pt", "last.pt"):
        if (out_dir / name).is_file():
            best = load_checkpoint(out_dir / name, device)
            model.load_state_dict(best["model"])
            threshold = best.get("threshold", threshold)
            summary.update(checkpoint=name, val_score=best.get("best_score"))
            break
    if cfg.threshold >= 0:
        threshold = cfg.threshold
    if n_val:
        summary["baseline"] = prior_baseline(comp.task, data.train_targets, data.val_targets)
    summary["threshold"] = threshold
    tta = affordable_tta(cfg.tta, len(comp.test_ids), reserve.infer_ips,
                         clock.remaining() - reserve.overhead_s - reserve.startup_s)
    if tta < cfg.tta:
        log.warning("only %s left: predicting with %d TTA views instead of %d",
                    fmt_seconds(clock.remaining()), tta, cfg.tta)
    out = predict(model, build_test_loader(cfg, comp, device), device, comp.task, tta_views(tta),
                  cfg.amp, cfg.channels_last, desc="test")
    summary.update(tta=tta, infer_images_per_s=round(out["images_per_s"], 1))
    write_outputs(comp, out["probs"], out["ok"], comp.task, threshold, cfg.min_labels, out_dir)
    return status, summary


def dry_run(cfg: Config, comp: Competition, device: torch.device, setup_s: float, train_steps: int = 12,
            infer_batches: int = 4) -> Plan:
    """Time a few training steps and TTA batches on a subset, then plan the full budget."""
    data = build_training_data(cfg, comp, device)
    model, optimizer, scaler = build_model_and_optimizer(cfg, comp.num_classes, device)
    opts = fit_options(cfg)
    state = FitState()

    def first_steps_at_peak_lr(step: int) -> tuple[bool, float]:
        return step >= train_steps, cfg.lr

    tr = train_one_epoch(model, data.train_loader, optimizer, scaler, get_loss(cfg.loss, comp.task), device,
                         state, opts, control=first_steps_at_peak_lr)
    test_loader = build_test_loader(cfg, comp, device)
    subset = torch.utils.data.Subset(test_loader.dataset, range(min(len(test_loader.dataset),
                                                                    infer_batches * test_loader.batch_size)))
    loader = make_loader(subset, test_loader.batch_size, False, num_workers(cfg), cfg.mp_context,
                         device.type == "cuda")
    inf = predict(model, loader, device, comp.task, tta_views(cfg.tta), cfg.amp, cfg.channels_last, desc="dry-run")
    budget_s, margin_s = budget_seconds(cfg)
    return make_plan(budget_s=budget_s, margin_s=margin_s, setup_s=setup_s, train_ips=tr["images_per_s"],
                     infer_ips=inf["images_per_s"], n_train=len(data.train_targets), n_val=len(data.val_targets),
                     n_test=len(comp.test_ids), tta=cfg.tta, epochs=cfg.epochs, loader_startup_s=inf["first_batch_s"])


def find_checkpoints(spec: str) -> list[Path]:
    p = Path(spec)
    if p.is_dir():
        found = sorted(p.glob("best*.pt")) or sorted(p.glob("*.pt"))
    elif p.is_file():
        found = [p]
    else:
        found = sorted(Path(x) for x in glob.glob(spec))
    if not found:
        raise FileNotFoundError(f"no checkpoints match {spec!r}")
    return found


def infer_only(cfg: Config, comp: Competition, out_dir: Path, device: torch.device, clock: BudgetClock) -> dict:
    """Average TTA probabilities of one or more checkpoints; each rebuilds its own model and input size.

    The first checkpoint's measured speed decides how many TTA views the others can afford; a
    checkpoint that cannot fit even one view is skipped, so a submission is always written in time.
    """
    paths = find_checkpoints(cfg.checkpoints)
    probs_sum, ok, thresholds, used = None, None, [], []
    seconds_per_view: float | None = None
    for i, p in enumerate(paths):
        tta = cfg.tta
        if seconds_per_view is not None:
            share = clock.remaining() / (len(paths) - i)
            tta = affordable_tta(cfg.tta, 1, 1.0 / seconds_per_view, share)
            if share < seconds_per_view:
                log.warning("no time left for %s and %d more checkpoint(s); skipped", p, len(paths) - i - 1)
                break
            if tta < cfg.tta:
                log.warning("%s: %d TTA views instead of %d to stay inside the budget", p.name, tta, cfg.tta)
        ckpt = load_checkpoint(p, "cpu")
        ccfg = Config.from_dict(ckpt["config"])
        if ckpt["classes"] != comp.classes:
            raise ValueError(f"{p}: trained on a different label set than the {comp.format} data in {cfg.data_dir}")
        model = create_model(ccfg.model, len(ckpt["classes"]), "", 0.0)
        model.load_state_dict(ckpt["model"])
        model.to(device).eval()
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        run_cfg = Config.from_dict({**ccfg.to_dict(), "batch_size": cfg.batch_size, "num_workers": cfg.num_workers,
                                    "mp_context": cfg.mp_context})
        t0 = time.time()
        out = predict(model, build_test_loader(run_cfg, comp, device), device, ckpt["task"], tta_views(tta),
                      cfg.amp, cfg.channels_last, desc=p.name)
        seconds_per_view = (time.time() - t0) / tta
        np.save(out_dir / f"test_probs_{p.stem}.npy", out["probs"].astype(np.float32))
        probs_sum = out["probs"] if probs_sum is None else probs_sum + out["probs"]
        ok = out["ok"]
        thresholds.append(float(ckpt.get("threshold", 0.5)))
        used.append({"checkpoint": str(p), "model": ccfg.model, "tta": tta, "val_score": ckpt.get("best_score")})
        log.info("%s: %s, val score %.4f, %d TTA views", p, ccfg.model, ckpt.get("best_score", float("nan")), tta)
    threshold = cfg.threshold if cfg.threshold >= 0 else float(np.mean(thresholds))
    write_outputs(comp, probs_sum / len(used), ok, comp.task, threshold, cfg.min_labels, out_dir)
    return {"checkpoints": used, "threshold": threshold, "wall_s": round(clock.elapsed(), 1)}


def _demo_test_score(data_dir: Path, out_dir: Path, comp: Competition) -> float | None:
    sol = data_dir / "test_solution.csv"
    if comp.task != "multilabel" or not sol.is_file():
        return None
    import pandas as pd
    truth_df = pd.read_csv(sol, dtype=str, keep_default_na=False)
    sub = pd.read_csv(out_dir / "submission.csv", dtype=str, keep_default_na=False)
    pos = {c: i for i, c in enumerate(comp.classes)}

    def onehot(cells) -> np.ndarray:
        m = np.zeros((len(cells), len(pos)), np.uint8)
        for r, cell in enumerate(cells):
            for t in cell.split():
                m[r, pos[t]] = 1
        return m
    return fbeta_per_image(onehot(truth_df.attribute_ids), onehot(sub.iloc[:, 1]))


@dataclass
class Context:
    cfg: Config
    args: argparse.Namespace
    data_dir: Path
    out_dir: Path
    is_demo: bool
    t_start: float


def resolve(config_block: dict[str, Any] | None, argv: list[str] | None, t_start: float) -> Context:
    """Config and paths, with no side effects beyond creating out_dir."""
    cfg, args = make_config(config_block, argv)
    data_dir, out_dir, is_demo = resolve_paths(cfg)
    if is_demo and not cfg.preset:
        cfg, args = make_config({**(config_block or {}), "preset": "demo"}, argv)
        data_dir, out_dir, _ = resolve_paths(cfg)
    return Context(cfg, args, data_dir, out_dir, is_demo, t_start)


def announce(ctx: Context) -> None:
    log.info("kernelkit: torch %s, timm %s, %s, config:\n%s", torch.__version__, timm_version(),
             "on Kaggle" if env.on_kaggle() else "local", ctx.cfg.pretty())
    ctx.cfg.save(ctx.out_dir / "config.json")
    if ctx.is_demo:
        log.info("no competition data found: running the built-in demo (set data_dir= for a real competition)")
        make_demo_competition(ctx.data_dir, ctx.cfg.demo_images, max(50, ctx.cfg.demo_images // 5), ctx.cfg.seed)


def timm_version() -> str:
    import timm
    return timm.__version__


def main(config_block: dict[str, Any] | None = None, argv: list[str] | None = None,
         started_at: float | None = None) -> int:
    """`started_at`: process start (kernel.py records it before importing torch), so the budget
    counts the imports too."""
    setup_logging()
    ctx = resolve(config_block, argv, started_at or time.time())
    cfg = ctx.cfg
    if cfg.mode not in ("train", "infer"):
        raise ValueError(f"unknown mode {cfg.mode!r}; choose train | infer")
    info = distributed.from_torchrun()
    if info is not None:  # started by torchrun: one process per rank already
        info = DistInfo(info.rank, info.world_size, info.local_rank, distributed.default_backend(cfg.ddp_backend))
        if info.rank:
            log.setLevel(logging.WARNING)
        distributed.init(info)
        try:
            return run_rank(ctx, info)
        finally:
            distributed.shutdown(info)
    procs = distributed.wanted_processes(cfg.ddp_procs) if cfg.mode == "train" and not ctx.args.dry_run else 1
    if procs > 1:
        announce(ctx)  # once, before the ranks start: the demo data must exist for all of them
        return launch_ranks(procs, config_block, argv, ctx)
    return run_rank(ctx, distributed.SINGLE)


def launch_ranks(procs: int, config_block: dict[str, Any] | None, argv: list[str] | None, ctx: Context) -> int:
    """Kaggle has no torchrun in a script kernel: start one spawned process per rank ourselves."""
    import torch.multiprocessing as mp
    port = distributed.free_port()
    log.info("starting %d data-parallel processes (%s)", procs, distributed.default_backend(ctx.cfg.ddp_backend))
    mp.start_processes(rank_worker, args=(procs, port, config_block, argv, ctx.t_start), nprocs=procs,
                       join=True, start_method="spawn")
    summary = json.loads((ctx.out_dir / "summary.json").read_text())
    return int(summary.get("exit_status", EXIT_NO_SUBMISSION))


def rank_worker(rank: int, world_size: int, port: int, config_block: dict[str, Any] | None,
                argv: list[str] | None, t_start: float) -> None:
    """Entry of a spawned rank (module level, so spawn can import it)."""
    setup_logging()
    if rank:
        log.setLevel(logging.WARNING)
    ctx = resolve(config_block, argv, t_start)
    info = DistInfo(rank, world_size, rank, distributed.default_backend(ctx.cfg.ddp_backend))
    distributed.init(info, f"tcp://127.0.0.1:{port}")
    try:
        run_rank(ctx, info, announced=True)
    except Exception:  # noqa: BLE001
        if info.is_main:
            raise
        # Exiting non-zero would make the launcher kill rank 0 before it writes the submission.
        log.exception("rank %d failed; rank 0 carries on", rank)
    finally:
        distributed.shutdown(info)


def run_rank(ctx: Context, info: DistInfo, announced: bool = False) -> int:
    cfg, out_dir = ctx.cfg, ctx.out_dir
    if info.is_main and not announced:
        announce(ctx)
    distributed.barrier(info)
    comp = load_competition(ctx.data_dir, cfg.format)
    device = info.device()
    if cfg.mode == "infer":
        summary = infer_only(cfg, comp, out_dir, device, BudgetClock(*budget_seconds(cfg), start_time=ctx.t_start))
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
        log.info("done in %s: %s", fmt_seconds(time.time() - ctx.t_start), summary)
        return EXIT_OK
    if ctx.args.dry_run:
        plan = dry_run(cfg, comp, device, setup_s=time.time() - ctx.t_start)
        (out_dir / "plan.json").write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
        log.info("dry-run plan for %s on %s:\n%s", cfg.model, device, plan.table())
        return EXIT_OK if plan.fits else EXIT_PLAN_DOES_NOT_FIT

    run_start, resume_path = begin_run(out_dir, cfg.resume, ctx.t_start) if info.is_main else (0.0, None)
    run_start, resume_path = distributed.broadcast_object(info, (run_start, resume_path))
    if resume_path is None and cfg.resume_from:
        resume_path = Path(cfg.resume_from)
        if not resume_path.is_file():
            raise FileNotFoundError(f"resume_from {resume_path} does not exist")
    clock = BudgetClock(*budget_seconds(cfg), start_time=run_start)
    status, summary = train_and_predict(cfg, comp, out_dir, device, clock, resume_path, info)
    if not info.is_main:
        return status
    finish_run(out_dir)
    summary.update(wall_s=round(clock.elapsed(), 1), exit_status=status, world_size=info.world_size)
    if ctx.is_demo:
        summary["demo_test_score"] = _demo_test_score(ctx.data_dir, out_dir, comp)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    metric = "F2 per image" if comp.task == "multilabel" else "accuracy"
    log.info("validation %s %.4f (label-prior baseline %.4f); %s of %s used; submission: %s",
             metric, summary.get("val_score") or float("nan"), summary.get("baseline", float("nan")),
             fmt_seconds(clock.elapsed()), fmt_seconds(clock.total_s), (out_dir / "submission.csv").resolve())
    if ctx.is_demo and summary.get("demo_test_score") is not None:
        log.info("demo test F2 against the generated answers: %.4f", summary["demo_test_score"])
    return status
''',
'kernelkit.session': r'''"""Run bookkeeping in out_dir: when the run started, whether it finished, which checkpoint to resume.

A run killed mid-way (kill -9, a lost Kaggle session) and started again in the same out_dir
continues from last.pt, and the time the killed process spent still counts against the budget.
A finished run's checkpoints are kept as *.prev.pt so a new run never mixes them with its own.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger("kernelkit")

STATE_FILE = "run_state.json"
CHECKPOINTS = ("last.pt", "best.pt")


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def remove_partial_files(out_dir: Path) -> None:
    """Temp files of a save that was killed half-way; the real checkpoints are intact beside them."""
    for tmp in out_dir.glob(".*.tmp*"):
        log.info("removing partial file %s left by an interrupted save", tmp.name)
        tmp.unlink(missing_ok=True)


def begin_run(out_dir: Path, resume: bool, started_at: float) -> tuple[float, Path | None]:
    """-> (run start time for the budget clock, checkpoint to resume from or None)."""
    remove_partial_files(out_dir)
    state_path = out_dir / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    last = out_dir / "last.pt"
    if resume and state and not state.get("finished") and last.is_file():
        _write_json(state_path, {**state, "restarts": int(state.get("restarts", 0)) + 1})
        return float(state["run_start"]), last
    archive_checkpoints(out_dir)
    _write_json(state_path, {"run_start": started_at, "finished": False, "restarts": 0})
    return started_at, None


def archive_checkpoints(out_dir: Path) -> None:
    for name in CHECKPOINTS:
        p = out_dir / name
        if p.is_file():
            os.replace(p, p.with_suffix(".prev.pt"))
            log.info("kept the previous run's %s as %s", name, p.with_suffix(".prev.pt").name)


def finish_run(out_dir: Path) -> None:
    state_path = out_dir / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    _write_json(state_path, {**state, "finished": True})
''',
'kernelkit.train': r'''"""The training loop under a wall-clock budget."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .budget import BudgetClock, InferenceReserve, Progress, fmt_seconds, lr_factor
from .checkpoint import rng_state, save_checkpoint
from .decode import decode_multilabel
from .distributed import SINGLE, DistInfo, agree, all_finite, unwrap
from .infer import autocast, predict
from .metrics import accuracy, fbeta_per_image, search_threshold
from .progress import progress
from .transforms import normalize

log = logging.getLogger("kernelkit")


@dataclass
class FitOptions:
    lr: float = 1e-3
    warmup: float = 0.05
    schedule: str = "linear"
    epochs: int = 0  # 0: train until the time budget (minus the inference reserve) is spent
    amp: bool = True
    channels_last: bool = False
    checkpoint_every_s: float = 1200.0
    threshold: float = -1.0  # multi-label: <0 searches on validation
    min_labels: int = 0
    beta: float = 2.0


@dataclass
class FitState:
    epoch: int = 0
    step: int = 0
    progress: float = 0.0
    best_score: float = -math.inf
    threshold: float = 0.5
    nonfinite_steps: int = 0
    bad_images: int = 0


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def train_one_epoch(model: torch.nn.Module, loader, optimizer: torch.optim.Optimizer, scaler, loss_fn: Callable,
                    device: torch.device, state: FitState, opts: FitOptions,
                    control: Callable[[int], tuple[bool, float]], on_step: Callable[[], None] | None = None,
                    dist: DistInfo = SINGLE) -> dict:
    """One pass over `loader`, or until control(step) says stop; control also gives each step's LR."""
    model.train()
    losses, images, skipped = [], 0, 0
    t0 = time.time()
    t_first, first_n = None, 0
    bar = progress(loader, desc=f"epoch {state.epoch}")
    stopped = False
    for x, y, ok in bar:
        stop, lr = control(state.step)
        if stop:
            stopped = True
            break
        set_lr(optimizer, lr)
        x = normalize(x.to(device, non_blocking=True), opts.channels_last)
        y, ok = y.to(device, non_blocking=True), ok.to(device, non_blocking=True)
        with autocast(device, opts.amp):
            logits = model(x)
        loss = loss_fn(logits, y, ok)
        optimizer.zero_grad(set_to_none=True)
        if not all_finite(dist, loss):
            # One NaN batch must not poison the weights of a 9-hour run: skip the update (on every
            # rank together, or the gradient all-reduce would wait forever).
            state.nonfinite_steps += 1
            log.warning("non-finite loss at step %d; update skipped (%d so far)", state.step, state.nonfinite_steps)
            state.step += 1
            continue
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        state.step += 1
        skipped += int((ok == 0).sum())
        images += len(ok)
        losses.append(loss.item())
        if t_first is None:
            t_first, first_n = time.time(), images
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                        p=f"{state.progress:.2f}", refresh=False)
        if on_step is not None:
            on_step()
    bar.close()
    t_end = time.time()
    state.bad_images += skipped
    # Throughput after the first step, which carries worker start-up and lazy initialisation.
    steady = (images - first_n, t_end - t_first) if t_first and images > first_n else (images, t_end - t0)
    return {"loss": float(np.mean(losses)) if losses else float("nan"), "images": images,
            "seconds": t_end - t0, "images_per_s": steady[0] / max(steady[1], 1e-9), "skipped": skipped,
            "stopped": stopped, "lr": optimizer.param_groups[0]["lr"]}


def score_predictions(task: str, targets: np.ndarray, probs: np.ndarray, opts: FitOptions) -> dict:
    """Competition metric on validation; multi-label also picks the threshold."""
    if task == "multilabel":
        if opts.threshold >= 0:
            t = opts.threshold
            s = fbeta_per_image(targets, decode_multilabel(probs, t, opts.min_labels), opts.beta)
        else:
            t, s = search_threshold(targets, probs, opts.beta, opts.min_labels)
        return {"score": s, "threshold": t, "metric": f"F{opts.beta:g} per image"}
    acc = accuracy(targets, probs)
    return {"score": acc, "threshold": 0.5, "metric": "accuracy", "top1_error": 1 - acc}


def validate(model: torch.nn.Module, loader, targets: np.ndarray, device: torch.device, task: str,
             opts: FitOptions) -> dict:
    out = predict(model, loader, device, task, amp=opts.amp, channels_last=opts.channels_last, desc="validate")
    return {**out, **score_predictions(task, targets, out["probs"], opts)}


def _timing(tr: dict, state: FitState, clock: BudgetClock, reserve: InferenceReserve) -> str:
    """Schedule position, speed, elapsed/budget and when training will end."""
    train_left = clock.total_s - clock.margin_s - reserve.seconds() - clock.elapsed()
    return (f"p={state.progress:.2f}  {tr['images_per_s']:.0f} img/s  [{clock.fmt()}, training ends in "
            f"{fmt_seconds(train_left)}, then ~{fmt_seconds(reserve.seconds())} inference]")


def _write_history(history: list[dict], out_dir: Path) -> None:
    import pandas as pd
    pd.DataFrame(history).to_csv(out_dir / "history.csv", index=False)


def fit(model: torch.nn.Module, train_loader, val_loader, val_targets: np.ndarray, *, task: str,
        loss_fn: Callable, optimizer: torch.optim.Optimizer, scaler, device: torch.device,
        clock: BudgetClock, reserve: InferenceReserve, opts: FitOptions, out_dir: Path,
        state: FitState | None = None, extra: dict[str, Any] | None = None, dist: DistInfo = SINGLE) -> dict:
    """Train until the budget (or `opts.epochs`) is used; keep last.pt and best.pt in `out_dir`.

    `extra` (config dict, classes, task) is stored in every checkpoint so inference can rebuild
    the model from the checkpoint alone. Under DDP (`dist`), rank 0's clock rules and only rank 0
    validates and writes.
    """
    state = state or FitState()
    extra = dict(extra or {})
    core = unwrap(model)
    total_steps = opts.epochs * len(train_loader) if opts.epochs else 0
    prog = Progress(clock, state.progress, total_steps)
    history: list[dict] = []
    last_save = [time.time()]
    has_val = dist.is_main and val_loader is not None and len(val_targets) > 0

    def deadline() -> float:
        return clock.total_s - clock.margin_s - reserve.seconds()

    def time_is_up() -> bool:
        if total_steps and state.step >= total_steps:
            return True
        return clock.elapsed() >= deadline()

    def control(step: int) -> tuple[bool, float]:
        stop, state.progress = agree(dist, time_is_up(), prog.at(deadline(), step))
        return stop, opts.lr * lr_factor(state.progress, opts.warmup, opts.schedule)

    def checkpoint(name: str, epoch_done: bool) -> None:
        save_checkpoint({
            "model": core.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "epoch": state.epoch + int(epoch_done), "step": state.step, "progress": state.progress,
            "best_score": state.best_score, "threshold": state.threshold,
            "elapsed": clock.elapsed(), "run_start": clock.start_time, "rng": rng_state(), **extra,
        }, out_dir / name)

    def on_step() -> None:
        if dist.is_main and time.time() - last_save[0] >= opts.checkpoint_every_s:
            checkpoint("last.pt", epoch_done=False)
            last_save[0] = time.time()

    stop_reason = "budget"
    while True:
        if opts.epochs and state.epoch >= opts.epochs:
            stop_reason = "epochs"
            break
        if agree(dist, time_is_up(), state.progress)[0]:
            break
        if hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(state.epoch)  # a new shuffle per epoch under DistributedSampler
        tr = train_one_epoch(model, train_loader, optimizer, scaler, loss_fn, device, state, opts, control,
                             on_step, dist)
        if tr["images"]:
            reserve.train_ips = tr["images_per_s"]
        if dist.is_main:
            history.append(_end_of_epoch(core, tr, val_loader, val_targets, has_val, task, device, opts, state,
                                         clock, reserve, checkpoint))
            _write_history(history, out_dir)
            checkpoint("last.pt", epoch_done=not tr["stopped"])
            last_save[0] = time.time()
        if tr["stopped"] or not tr["images"]:
            break
        state.epoch += 1
    if dist.is_main and val_loader is None:
        checkpoint("best.pt", epoch_done=True)
    return {"state": state, "history": history, "stop_reason": stop_reason}


def _end_of_epoch(model: torch.nn.Module, tr: dict, val_loader, val_targets: np.ndarray, has_val: bool, task: str,
                  device: torch.device, opts: FitOptions, state: FitState, clock: BudgetClock,
                  reserve: InferenceReserve, checkpoint: Callable[[str, bool], None]) -> dict:
    """Validate, keep best.pt, log; -> the epoch's history row."""
    row = {"epoch": state.epoch, "train_loss": tr["loss"], "train_images": tr["images"],
           "train_s": round(tr["seconds"], 2), "lr_end": tr["lr"], "progress": round(state.progress, 4),
           "elapsed_s": round(clock.elapsed(), 1)}
    if not (has_val and tr["images"]):
        log.info("epoch %d  loss %.4f  %s", state.epoch, tr["loss"], _timing(tr, state, clock, reserve))
        return row
    va = validate(model, val_loader, val_targets, device, task, opts)
    reserve.infer_ips = va["images_per_s"]
    reserve.observe_startup(va["first_batch_s"])
    row.update(val_score=va["score"], threshold=va["threshold"], val_s=round(va["seconds"], 2))
    if va["score"] > state.best_score:
        state.best_score, state.threshold = va["score"], va["threshold"]
        checkpoint("best.pt", not tr["stopped"])
    log.info("epoch %d  loss %.4f  val %s %.4f (best %.4f)  thr %.2f  %s", state.epoch, tr["loss"],
             va["metric"], va["score"], state.best_score, va["threshold"], _timing(tr, state, clock, reserve))
    return row
''',
'kernelkit.transforms': r'''"""Image transforms: aspect handling from the iMet seed, train augmentation, the eval transform.

Transforms map a PIL RGB image to a uint8 CHW tensor; normalisation happens on the device
(`normalize`), so workers ship 4x fewer bytes than float tensors.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_or_pad(img: Image.Image, size: int, pad_aspect: float = 2.0, fill: int = 255) -> Image.Image:
    """Square `size` x `size`: stretch ordinary images, pad very long/thin ones (iMet seed).

    Stretching a 1:5 strip to a square destroys it; fitting the long side and padding the short
    side keeps its content recognisable.
    """
    w, h = img.size
    if pad_aspect and max(w, h) / max(1, min(w, h)) > pad_aspect:
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=3.0)
        dw, dh = size - nw, size - nh
        return ImageOps.expand(img, (dw // 2, dh // 2, dw - dw // 2, dh - dh // 2), fill=(fill, fill, fill))
    return img.resize((size, size), Image.BILINEAR, reducing_gap=3.0)


def to_tensor_uint8(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class EvalTransform:
    """Deterministic: resize or pad to the working size."""

    def __init__(self, size: int, pad_aspect: float = 2.0, fill: int = 255):
        self.size, self.pad_aspect, self.fill = size, pad_aspect, fill

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return to_tensor_uint8(resize_or_pad(img, self.size, self.pad_aspect, self.fill))


class TrainTransform(EvalTransform):
    """Random horizontal flip, and for aug='light' a mild random resized crop."""

    def __init__(self, size: int, pad_aspect: float = 2.0, fill: int = 255, aug: str = "light"):
        super().__init__(size, pad_aspect, fill)
        if aug not in ("none", "flip", "light"):
            raise ValueError(f"unknown aug {aug!r}; choose none | flip | light")
        self.aug = aug

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if self.aug == "light":
            img = resize_or_pad(img, int(self.size * 1.15), self.pad_aspect, self.fill)
            w, h = img.size
            area = w * h * random.uniform(0.6, 1.0)
            ratio = random.uniform(3 / 4, 4 / 3)
            cw = min(w, round((area * ratio) ** 0.5))
            ch = min(h, round((area / ratio) ** 0.5))
            x, y = random.randint(0, w - cw), random.randint(0, h - ch)
            img = img.crop((x, y, x + cw, y + ch)).resize((self.size, self.size), Image.BILINEAR)
        else:
            img = resize_or_pad(img, self.size, self.pad_aspect, self.fill)
        if self.aug != "none" and random.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor_uint8(img)


def normalize(batch: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 NCHW on any device -> float normalised with ImageNet statistics."""
    mean = torch.tensor(IMAGENET_MEAN, device=batch.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=batch.device).view(1, 3, 1, 1) * 255
    x = (batch.float() - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# Test-time views: each maps a normalised batch to a view of it. Chosen by level, in this order.
def tta_identity(x: torch.Tensor) -> torch.Tensor:
    return x


def tta_hflip(x: torch.Tensor) -> torch.Tensor:
    return torch.flip(x, dims=[3])


def tta_vflip(x: torch.Tensor) -> torch.Tensor:
    return torch.flip(x, dims=[2])


def tta_hvflip(x: torch.Tensor) -> torch.Tensor:
    return torch.flip(x, dims=[2, 3])


TTA_VIEWS = (tta_identity, tta_hflip, tta_vflip, tta_hvflip)


def tta_views(level: int) -> tuple:
    if not 1 <= level <= len(TTA_VIEWS):
        raise ValueError(f"tta must be 1..{len(TTA_VIEWS)}, got {level}")
    return TTA_VIEWS[:level]
''',
}

import importlib.abc as _abc
import importlib.util as _util
import linecache as _linecache
import os as _os
import sys as _sys

_os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything can import timm


class _BundledPackage(_abc.MetaPathFinder, _abc.Loader):
    """Serves the embedded modules, ahead of anything installed under the same name."""

    def find_spec(self, name, path=None, target=None):
        if name not in _SOURCES:
            return None
        return _util.spec_from_loader(name, self, origin=self._filename(name), is_package=name == 'kernelkit')

    @staticmethod
    def _filename(name):
        rel = name.replace(".", "/") + ("/__init__.py" if name == 'kernelkit' else ".py")
        return _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "kernel.py:" + rel)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        filename = self._filename(module.__name__)
        source = _SOURCES[module.__name__]
        # Registered so tracebacks show the bundled source lines.
        _linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        module.__file__ = filename
        exec(compile(source, filename, "exec"), module.__dict__)


if not any(isinstance(f, _BundledPackage) or type(f).__name__ == "_BundledPackage" for f in _sys.meta_path):
    _sys.meta_path.insert(0, _BundledPackage())

if __name__ == "__main__":
    from kernelkit.run import main
    _sys.exit(main(CONFIG, started_at=_STARTED_AT))
