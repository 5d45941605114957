"""Competition formats: read a Kaggle-style input folder, write and validate the submission.

A format turns a folder into a `Competition`: image paths, targets, class names, the test ids in
submission order, and how predictions become submission cells.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
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


def _read_csv(path: Path, min_columns: int = 1, what: str = "") -> pd.DataFrame:
    df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    df.columns = [c.strip() for c in df.columns]
    if df.shape[1] < min_columns:
        raise ValueError(f"{path}: need two columns ({what}), found {list(df.columns)}")
    return df


def _check_unique(ids: list[str], csv: Path) -> None:
    seen: dict[str, int] = {}
    for r, i in enumerate(ids):
        if i in seen:
            raise ValueError(f"{csv.name}: id {i!r} is duplicated (rows {seen[i] + 2} and {r + 2}); "
                             "merge or drop the duplicates")
        seen[i] = r


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
        _check_unique(ids, sample)
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
    df = _read_csv(csv, 2, "id, attribute_ids")
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
    _check_unique(ids, csv)
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
    df = _read_csv(csv, 2, "id, label")
    id_col, lab_col = df.columns[0], df.columns[1]
    raw = [str(v).strip() for v in df[lab_col]]
    for r, v in enumerate(raw):
        if not v:
            raise ValueError(f"{csv.name} row {r + 2}: empty label")
    classes = sorted(set(raw), key=lambda t: (not t.lstrip("-").isdigit(), int(t) if t.lstrip("-").isdigit() else 0, t))
    pos = {c: i for i, c in enumerate(classes)}
    ids = [_safe_id(v, r, csv) for r, v in enumerate(df[id_col])]
    _check_unique(ids, csv)
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
