"""Competition formats: read a Kaggle-style input folder (the submission is `submission`'s).

A format turns a folder into a `Competition`: image paths, targets, class names, the test ids in
submission order, and how predictions become submission cells. Everything a bad input can break is
checked here, at load time, so a 9-hour run fails in its first seconds with the file's name instead.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.config import IMAGE_EXTS
from .csvfiles import MISSING, CsvTable, is_missing, read_csv_file, require_rows
from .discovery import TEST_DIRS, TRAIN_DIRS

log = logging.getLogger("kernelkit")

FORMATS = ("multilabel_csv", "single_label_csv", "folder")
# Column names tried in order when no override and no sample submission column name settles it.
ID_NAMES = ("id", "image_id", "imageid", "image", "image_name", "img", "img_id", "filename", "file_name",
            "file", "fname")
LABEL_NAMES = ("label", "labels", "category_id", "category", "class", "class_id", "classes", "target",
               "attribute_ids", "tags", "species", "breed", "landmark_id", "landmarks", "diagnosis")
PRED_NAMES = LABEL_NAMES + ("predicted", "prediction", "predictions")


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
    id_column: str = "id"  # submission's id column
    pred_column: str = "predicted"  # submission's prediction column; "" for a wide sample
    sample_submission: Path | None = None
    missing_train: int = 0
    train_label_column: str = ""  # train.csv column the labels came from ("" for folders)
    submission_columns: list[str] = field(default_factory=list)  # every column, in the sample's order
    submission_sep: str = ","  # the sample's delimiter, reproduced by the writer
    # A wide sample (id + one 0/1 column per class): column -> class index; -1 = a class training never
    # shows (always 0). Empty for the usual id,prediction layout.
    wide_columns: dict[str, int] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class Layout:
    """Where a competition keeps its files and how train.csv names them (options, else detected)."""
    root: Path
    train: Path  # the training images folder (train/, train_images/, ...)
    test: Path
    id_column: str = ""
    label_column: str = ""
    image_ext: str = ""  # only files with this extension are images (".jpg"); "" = any image extension


def _image_folder(root: Path, names: tuple[str, ...], explicit: str, option: str) -> Path:
    if explicit:
        d = root / explicit
        if not d.is_dir():
            raise FileNotFoundError(f"{option}={explicit!r}: {d} is not a folder")
        return d
    present = [n for n in names if (root / n).is_dir()]
    if len(present) > 1:
        raise ValueError(f"{root}: several image folders {present}; set {option}= to the one to use")
    return root / (present[0] if present else names[0])


def make_layout(root: str | Path, train_images: str = "", test_images: str = "", id_column: str = "",
                label_column: str = "", image_ext: str = "") -> Layout:
    root = Path(root)
    return Layout(root, _image_folder(root, TRAIN_DIRS, train_images, "train_images"),
                  _image_folder(root, TEST_DIRS, test_images, "test_images"), id_column, label_column,
                  image_ext.lower())


def _is_junk(name: str) -> bool:
    """Hidden entries (.ipynb_checkpoints, AppleDouble ._x.jpg) and __MACOSX are zip/OS debris, not data."""
    return name.startswith((".", "__"))


class ImageIndex(dict):
    """id (file name, and stem) -> path, from one directory scan instead of a stat per id. A stem
    shared by several files (a.jpg and a.png) is kept out and remembered: an id naming it is refused
    rather than read from whichever file the scan met first."""

    def __init__(self) -> None:
        super().__init__()
        self.ambiguous: dict[str, list[str]] = {}


def _index_images(folder: Path, ext: str = "") -> ImageIndex:
    index = ImageIndex()
    if not folder.is_dir():
        return index
    exts = (ext,) if ext else IMAGE_EXTS
    stems: dict[str, list[str]] = {}
    with os.scandir(folder) as it:
        for e in it:
            if e.is_file() and e.name.lower().endswith(exts) and not _is_junk(e.name):
                index[e.name] = e.path
                stems.setdefault(os.path.splitext(e.name)[0], []).append(e.path)
    for stem, paths in stems.items():
        if len(paths) == 1:
            index.setdefault(stem, paths[0])
        else:
            index.ambiguous[stem] = sorted(os.path.basename(p) for p in paths)
    return index


def _safe_id(value: object, row: int, name: str) -> str:
    s = str(value).strip()
    if not s or s.lower() == "nan":
        raise ValueError(f"{name} row {row + 2}: empty id")
    if "/" in s or "\\" in s or s in (".", "..") or s.startswith(".."):
        # Ids name files inside the data root; a path here could read anything on disk.
        raise ValueError(f"{name} row {row + 2}: id {s!r} looks like a path; refusing to read outside the data root")
    return s


def _check_unique(ids: list[str], name: str) -> None:
    seen: dict[str, int] = {}
    for r, i in enumerate(ids):
        if i in seen:
            raise ValueError(f"{name}: id {i!r} is duplicated (rows {seen[i] + 2} and {r + 2}); "
                             "merge or drop the duplicates")
        seen[i] = r


def _lookup(i: str, index: ImageIndex) -> str:
    p = index.get(i, "")
    stem = os.path.splitext(i)[0] if i.lower().endswith(IMAGE_EXTS) else i
    if not p and stem in index.ambiguous:
        raise ValueError(f"id {i!r} matches several files {index.ambiguous[stem]}; set image_ext= "
                         f"(one of {', '.join(IMAGE_EXTS)}) to say which extension the images have")
    if not p and stem != i:
        # "abc.jpg" in the csv while the file is abc.png: the stem still names it.
        p = index.get(stem, "")
    return p


def _resolve(ids: list[str], index: ImageIndex, what: str) -> tuple[list[str], int]:
    paths = [_lookup(i, index) for i in ids]
    missing = sum(1 for p in paths if not p)
    if missing:
        example = next(i for i, p in zip(ids, paths) if not p)
        log.warning("%d %s ids have no image file (e.g. %r)", missing, what, example)
    return paths, missing


def _match(names: list[str] | tuple[str, ...], columns: list[str]) -> str:
    """The first of `names` among `columns`, compared case-insensitively; "" when none is."""
    low = {c.lower(): c for c in columns}
    return next((low[n.lower()] for n in names if n and n.lower() in low), "")


def _explicit(name: str, table: CsvTable, what: str) -> str:
    if not name:
        return ""
    col = _match([name], table.columns)
    if not col:
        raise ValueError(f"{table.name}: {what}={name!r} is not a column; its columns are {table.columns}")
    return col


def _known_label(table: CsvTable, rest: list[str]) -> str:
    if len(rest) == 1:
        return rest[0]
    hits = [c for c in rest if c.lower() in LABEL_NAMES]
    if len(hits) == 1:
        return hits[0]
    why = f"several label-like columns {hits}" if hits else "no column has a known label name"
    raise ValueError(f"{table.name}: cannot tell which column holds the labels ({why}); its columns are "
                     f"{table.columns}. Set label_column= (and id_column=) to name them")


def pick_columns(table: CsvTable, sample_cols: list[str], id_column: str = "",
                 label_column: str = "") -> tuple[str, str]:
    """(id column, label column) of train.csv: explicit names, else the sample's names, else known names.

    Extra columns (width, height, genus) are common; picking by position would train on the wrong one.
    """
    cols = table.columns
    if len(cols) < 2:
        raise ValueError(f"{table.name}: need two columns (id, label), found {cols}")
    lab = _explicit(label_column, table, "label_column")
    others = [c for c in cols if c != lab]
    id_col = (_explicit(id_column, table, "id_column") or _match(sample_cols[:1], others)
              or _match(ID_NAMES, others) or others[0])
    if id_col == lab:
        raise ValueError(f"{table.name}: id_column and label_column are both {lab!r}")
    rest = [c for c in cols if c != id_col]
    lab = lab or _match(sample_cols[1:2], rest) or _known_label(table, rest)
    return id_col, lab


def _read_sample(root: Path) -> CsvTable | None:
    path = root / "sample_submission.csv"
    if not path.is_file():
        return None
    sample = require_rows(read_csv_file(path))
    if len(sample.columns) < 2:
        raise ValueError(f"{path} has one column {sample.columns}: no column to write predictions into. "
                         "A submission needs the id column and a prediction column (e.g. id,label); "
                         "fix the sample, or remove it to write id + prediction columns")
    return sample


def _test_ids(lay: Layout, sample: CsvTable | None) -> list[str]:
    if sample is not None:
        name = Path(sample.name).name
        ids = [_safe_id(v, r, name) for r, v in enumerate(sample.column(sample.columns[0]))]
        _check_unique(ids, name)
        return ids
    index = _index_images(lay.test, lay.image_ext)
    return sorted({os.path.splitext(os.path.basename(p))[0] for p in index.values()} | set(index.ambiguous))


def _looks_multilabel(cells: list[str]) -> bool:
    """Space-separated words in a label column: several labels per image, or class names with spaces?

    Tags combine freely, so a word of a combined cell is also a label on its own or sits at varying
    places ("clear primary", "haze primary water", "primary"); a word of a class name keeps its place
    ("golden retriever", "labrador retriever"). Numbers ("1 5 9") are always tag ids.
    """
    vals = {c.strip() for c in cells if not is_missing(c)}
    spaced = [v.split() for v in vals if len(v.split()) > 1]
    if not spaced:
        return False
    if all(w.isdigit() for words in spaced for w in words):
        return True
    alone = {v for v in vals if len(v.split()) == 1}
    places: dict[str, set[int]] = {}
    for words in spaced:
        for k, w in enumerate(words):
            places.setdefault(w, set()).add(k)
    reused = {w for w, ks in places.items() if len(ks) > 1 or w in alone}
    return sum(any(w in reused for w in words) for words in spaced) > len(spaced) / 2


def detect_format(root: Path, id_column: str = "", label_column: str = "", train_dir: Path | None = None) -> str:
    root = Path(root)
    train_dir = train_dir or make_layout(root).train
    train_csv = root / "train.csv"
    if train_csv.is_file():
        table = read_csv_file(train_csv)
        if "attribute_ids" in [c.lower() for c in table.columns] or (root / "labels.csv").is_file():
            return "multilabel_csv"
        sample = _read_sample(root)
        _, lab = pick_columns(table, sample.columns if sample else [], id_column, label_column)
        cells = table.column(lab)
        if _looks_multilabel(cells):
            n = sum(1 for c in cells if len(c.split()) > 1)
            log.warning("%s: %d cells of label column %r hold several space-separated labels (e.g. %r); reading "
                        "it as multi-label (format=single_label_csv overrides)", train_csv, n, lab,
                        next(c for c in cells if len(c.split()) > 1))
            return "multilabel_csv"
        return "single_label_csv"
    if _class_dirs(train_dir):
        return "folder"
    raise FileNotFoundError(
        f"{root}: no train.csv and no {train_dir.name}/<class>/ folders; set format= and data_dir= explicitly")


def load_competition(root: str | Path, fmt: str = "auto", id_column: str = "", label_column: str = "",
                     train_images: str = "", test_images: str = "", image_ext: str = "") -> Competition:
    """id_column / label_column name train.csv's columns, train_images / test_images the image
    folders, when detection cannot (or guesses wrong)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data_dir {root} does not exist")
    lay = make_layout(root, train_images, test_images, id_column, label_column, image_ext)
    fmt = detect_format(root, id_column, label_column, lay.train) if fmt == "auto" else fmt
    loader = {"multilabel_csv": _load_multilabel_csv, "single_label_csv": _load_single_label_csv,
              "folder": _load_folder}.get(fmt)
    if loader is None:
        raise ValueError(f"unknown format {fmt!r}; choose from {FORMATS}")
    sample = _read_sample(root)
    comp = loader(lay, sample)
    _fit_submission(comp, sample)
    comp.test_paths, _ = _resolve(comp.test_ids, _index_images(lay.test, lay.image_ext), "test")
    log.info("%s: %d train images, %d classes (%s), %d test ids", fmt, len(comp.train_paths),
             comp.num_classes, comp.task, len(comp.test_ids))
    return comp


def _train_table(lay: Layout, sample: CsvTable | None) -> tuple[list[str], list[str], str]:
    """(ids, raw label cells, label column name) of train.csv, ids checked."""
    table = require_rows(read_csv_file(lay.root / "train.csv"))
    id_col, lab_col = pick_columns(table, sample.columns if sample else [], lay.id_column, lay.label_column)
    ids = [_safe_id(v, r, "train.csv") for r, v in enumerate(table.column(id_col))]
    _check_unique(ids, "train.csv")
    return ids, [v.strip() for v in table.column(lab_col)], lab_col


def _class_key(t: str) -> tuple[bool, int, str]:
    """Numeric labels in numeric order ("2" before "10"), then the rest alphabetically."""
    num = t.lstrip("-").isdigit()
    return (not num, int(t) if num else 0, t)


def _labels_csv(path: Path) -> tuple[list[str], list[str]]:
    ldf = require_rows(read_csv_file(path))
    classes = [v.strip() for v in ldf.column(ldf.columns[0])]
    names = [v.strip() for v in ldf.column(ldf.columns[1])] if len(ldf.columns) > 1 else classes
    _check_unique(classes, path.name)
    return classes, names


def _tags(cells: list[str]) -> list[list[str]]:
    """Space-separated tags per cell; "nan"/"None"/"null" mean no tag, like a blank cell does."""
    out = [[t for t in c.split() if t.lower() not in MISSING] for c in cells]
    n = sum(1 for c, tags in zip(cells, out) if len(c.split()) != len(tags))
    if n:
        log.warning("train.csv: %d label cells hold NaN/None/null text; read as no label there", n)
    return out


def _load_multilabel_csv(lay: Layout, sample: CsvTable | None = None) -> Competition:
    """iMet 2019 layout: train.csv (id, attribute_ids), labels.csv (attribute_id, attribute_name)."""
    ids, cells, lab_col = _train_table(lay, sample)
    tags = _tags(cells)  # blank cell = an image with no labels (legitimate in iMet)
    labels_csv = lay.root / "labels.csv"
    if labels_csv.is_file():
        classes, names = _labels_csv(labels_csv)
    else:
        classes = sorted({t for row in tags for t in row}, key=_class_key)
        names = classes
    pos = {c: i for i, c in enumerate(classes)}
    targets = np.zeros((len(ids), len(classes)), dtype=np.uint8)
    for r, row in enumerate(tags):
        for tag in row:
            if tag not in pos:
                raise ValueError(f"train.csv row {r + 2}: label {tag!r} is not in labels.csv")
            targets[r, pos[tag]] = 1
    paths, missing = _resolve(ids, _index_images(lay.train, lay.image_ext), "train")
    keep = np.array([bool(p) for p in paths], dtype=bool)
    return Competition(
        format="multilabel_csv", task="multilabel", classes=classes, class_names=names,
        train_paths=[p for p in paths if p], train_targets=targets[keep], test_ids=_test_ids(lay, sample),
        test_paths=[], id_column="id", pred_column="attribute_ids", missing_train=missing,
        train_label_column=lab_col)


def _drop_missing_labels(raw: list[str], col: str) -> list[int]:
    """Rows to keep: a missing label is no class, and training on a class named "nan" is worse than less data."""
    missing = [r for r, v in enumerate(raw) if is_missing(v)]
    if missing and len(missing) == len(raw):
        more = f", and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ValueError(f"train.csv: no row has a label in column {col!r} (row {missing[0] + 2}: empty label"
                         f"{more}); set label_column= if the labels are in another column")
    if missing:
        log.warning("train.csv: %d rows have no label in column %r (empty or NaN/None/null; rows %s); "
                    "training without them", len(missing), col, ", ".join(str(r + 2) for r in missing[:5])
                    + (", ..." if len(missing) > 5 else ""))
    drop = set(missing)
    return [r for r in range(len(raw)) if r not in drop]


def _load_single_label_csv(lay: Layout, sample: CsvTable | None = None) -> Competition:
    """train.csv with (id, label); the submission has one class per id (iNaturalist's id,predicted)."""
    ids, raw, lab_col = _train_table(lay, sample)
    rows = _drop_missing_labels(raw, lab_col)
    ids, raw = [ids[r] for r in rows], [raw[r] for r in rows]
    classes = sorted(set(raw), key=_class_key)
    pos = {c: i for i, c in enumerate(classes)}
    targets = np.array([pos[v] for v in raw], dtype=np.int64)
    paths, missing = _resolve(ids, _index_images(lay.train, lay.image_ext), "train")
    keep = np.array([bool(p) for p in paths], dtype=bool)
    return Competition(
        format="single_label_csv", task="multiclass", classes=classes, class_names=classes,
        train_paths=[p for p in paths if p], train_targets=targets[keep], test_ids=_test_ids(lay, sample),
        test_paths=[], id_column="id", pred_column="predicted", missing_train=missing,
        train_label_column=lab_col)


def _class_dirs(train: Path) -> list[Path]:
    if not train.is_dir():
        return []
    return sorted(p for p in train.iterdir() if p.is_dir() and not _is_junk(p.name))


def _load_folder(lay: Layout, sample: CsvTable | None = None) -> Competition:
    """train/<class>/*.jpg (Scene-15, Keras flow_from_directory); test/*.jpg."""
    if not lay.train.is_dir():
        raise FileNotFoundError(f"format=folder: {lay.train} is not a folder")
    junk = sorted(p.name for p in lay.train.iterdir() if p.is_dir() and _is_junk(p.name))
    if junk:
        log.info("%s/: skipping %s (not class folders)", lay.train.name, junk)
    classes, paths, targets, empty = [], [], [], []
    for d in _class_dirs(lay.train):
        files = sorted(set(_index_images(d, lay.image_ext).values()))
        if not files:  # an empty folder would be a class the model can never learn
            empty.append(d.name)
            continue
        paths += files
        targets += [len(classes)] * len(files)
        classes.append(d.name)
    if empty:
        log.warning("train/: skipping %d class folders with no images: %s", len(empty), empty[:10])
    if not classes:
        raise ValueError(f"{lay.train}: no class folder holds an image ({', '.join(IMAGE_EXTS)})")
    return Competition(
        format="folder", task="multiclass", classes=classes, class_names=classes,
        train_paths=paths, train_targets=np.array(targets, dtype=np.int64), test_ids=_test_ids(lay, sample),
        test_paths=[], id_column="id", pred_column="label")


def _is_number(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


def _wide_columns(comp: Competition, sample: CsvTable) -> dict[str, int]:
    """A sample with a column per class (id,cat,dog,...) wants 0/1 per class, not one prediction column."""
    rest = sample.columns[1:]
    lookups = ({c: i for i, c in enumerate(comp.classes)}, {c: i for i, c in enumerate(comp.class_names)})
    lookup = max(lookups, key=lambda m: sum(c in m for c in rest))
    if sum(c in lookup for c in rest) < 2:
        return {}
    wide: dict[str, int] = {}
    for c in rest:
        if c in lookup:
            wide[c] = lookup[c]
        elif all(_is_number(v) for v in sample.column(c)):
            wide[c] = -1  # a tag the training data never shows: always 0
    unseen = [c for c, k in wide.items() if k < 0]
    uncovered = len(comp.classes) - len({k for k in wide.values() if k >= 0})
    log.info("%s is wide: one 0/1 column per class (%d columns; %d never seen in training, written as 0)",
             sample.name, len(wide), len(unseen))
    if uncovered:
        log.warning("%s has no column for %d of the %d training classes; their predictions are dropped",
                    sample.name, uncovered, len(comp.classes))
    return wide


def _fit_submission(comp: Competition, sample: CsvTable | None) -> None:
    """Take the submission layout (columns, order, delimiter) from the sample, which Kaggle scores against."""
    if sample is None:
        comp.submission_columns = [comp.id_column, comp.pred_column]
        return
    cols = sample.columns
    comp.sample_submission = Path(sample.name)
    comp.submission_sep, comp.submission_columns, comp.id_column = sample.sep, cols, cols[0]
    comp.wide_columns = _wide_columns(comp, sample)
    if comp.wide_columns:
        comp.pred_column = ""
        return
    rest = cols[1:]
    pred = _match([comp.train_label_column], rest) or _match(PRED_NAMES, rest)
    if not pred and len(rest) > 1:
        raise ValueError(f"{sample.name}: cannot tell which of the columns {rest} takes the predictions "
                         f"(none is named like {PRED_NAMES[:4]}... or train.csv's label column)")
    comp.pred_column = pred or rest[0]
    extras = [c for c in rest if c != comp.pred_column]
    if extras:
        log.info("%s: predictions go in column %r; copying %s from the sample as they are", sample.name,
                 comp.pred_column, extras)
