"""The submission: predictions -> cells (`format_predictions`), written in the sample's layout
(columns in its order, its delimiter, extra columns copied, one 0/1 column per class for a wide
sample) and validated in memory before it replaces the file (`write_submission`); the same checks
on a file (`validate_submission`) and, before training, on a dummy submission
(`check_submission_writable`), so a sample the writer cannot reproduce costs seconds, not the run.
The layout itself is read from the sample with the competition (`competition._fit_submission`)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.fileio import atomic_write
from .competition import Competition
from .csvfiles import CsvTable, parse_csv_text, read_csv_file


def format_predictions(comp: Competition, decoded: list[list[int]] | np.ndarray) -> list[str]:
    """Class indices per image -> submission cells (space-separated ids, or one class)."""
    if comp.task == "multilabel":
        return [" ".join(comp.classes[k] for k in row) for row in decoded]
    return [comp.classes[int(k)] for k in decoded]


def cells_to_onehot(comp: Competition, cells: list[str]) -> np.ndarray:
    """Submission cells -> (N, C) 0/1 over comp.classes; a cell naming no class raises ValueError."""
    pos = {c: i for i, c in enumerate(comp.classes)}
    out = np.zeros((len(cells), len(comp.classes)), dtype=np.uint8)
    for r, cell in enumerate(cells):
        tags = cell.split() if comp.task == "multilabel" else [cell.strip()] if cell.strip() else []
        for t in tags:
            if t not in pos:
                raise ValueError(f"prediction {r + 1}: {t!r} is not a class")
            out[r, pos[t]] = 1
    return out


def _sample_table(comp: Competition) -> CsvTable | None:
    return read_csv_file(comp.sample_submission) if comp.sample_submission is not None else None


def render_submission(comp: Competition, cells: list[str], sample: CsvTable | None = None) -> pd.DataFrame:
    """The submission as a frame: the sample's columns in its order, extra columns copied from it."""
    if len(cells) != len(comp.test_ids):
        raise ValueError(f"{len(cells)} predictions for {len(comp.test_ids)} test ids")
    sample = sample if sample is not None else _sample_table(comp)
    cols = comp.submission_columns or [comp.id_column, comp.pred_column]
    onehot = cells_to_onehot(comp, cells) if comp.wide_columns else None
    data: dict[str, object] = {}
    for c in cols:
        if c == comp.id_column:
            data[c] = list(comp.test_ids)
        elif c in comp.wide_columns:
            k = comp.wide_columns[c]  # integer columns: to_csv writes 0/1 without a str per cell
            data[c] = onehot[:, k] if k >= 0 else np.zeros(len(cells), dtype=np.uint8)
        elif c == comp.pred_column:
            data[c] = list(cells)
        elif sample is not None and len(sample.frame) == len(cells):
            data[c] = sample.column(c)  # e.g. Usage: Kaggle wants it back unchanged
        else:
            raise ValueError(f"column {c!r}: nothing to fill it with ({comp.sample_submission} changed?)")
    return pd.DataFrame(data, columns=cols)


def _to_text(comp: Competition, df: pd.DataFrame) -> str:
    return df.to_csv(index=False, sep=comp.submission_sep, lineterminator="\n")


def _check_cells(sub: CsvTable, comp: Competition) -> None:
    if comp.wide_columns:
        for c in comp.wide_columns:
            bad = next((r for r, v in enumerate(sub.column(c)) if v.strip() not in ("0", "1")), None)
            if bad is not None:
                raise ValueError(f"{sub.name} row {bad + 2}, column {c!r}: {sub.column(c)[bad]!r} is not 0 or 1")
        return
    known = set(comp.classes)
    for r, v in enumerate(sub.column(comp.pred_column)):
        tags = v.split() if comp.task == "multilabel" else [v.strip()]
        if comp.task == "multiclass" and not tags[0]:
            raise ValueError(f"{sub.name} has empty predictions (row {r + 2})")
        unknown = next((t for t in tags if t not in known), None)
        if unknown is not None:
            raise ValueError(f"{sub.name} row {r + 2}: prediction {unknown!r} is not one of the classes")


def _check_submission(sub: CsvTable, comp: Competition, ref: CsvTable | None = None) -> None:
    """Same ids, order, columns and delimiter as sample_submission.csv; a valid cell in every row."""
    ref = ref if ref is not None else _sample_table(comp)
    cols = ref.columns if ref is not None else (comp.submission_columns or [comp.id_column, comp.pred_column])
    where = Path(ref.name).name if ref is not None else "expected"
    if ref is not None and sub.sep != ref.sep:
        raise ValueError(f"{sub.name}: delimiter {sub.sep!r}, but {where} uses {ref.sep!r}")
    if sub.columns != cols:
        raise ValueError(f"{sub.name}: columns {sub.columns} != {where} {cols}")
    ids = [v.strip() for v in sub.column(cols[0])]
    want = [v.strip() for v in ref.column(cols[0])] if ref is not None else list(comp.test_ids)
    if len(ids) != len(want):
        raise ValueError(f"{sub.name} has {len(ids)} rows, {where} has {len(want)}")
    bad = next((r for r, (a, b) in enumerate(zip(ids, want)) if a != b), None)
    if bad is not None:
        raise ValueError(f"{sub.name} row {bad + 2}: id {ids[bad]!r} != {where}'s {want[bad]!r}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{sub.name} has duplicated ids")
    _check_cells(sub, comp)


def write_submission(comp: Competition, cells: list[str], path: Path) -> pd.DataFrame:
    """Render, validate in memory, then replace `path` atomically: an invalid file never lands there."""
    path = Path(path)
    sample = _sample_table(comp)  # read once for both: it is the reference the render must match
    df = render_submission(comp, cells, sample)
    text = _to_text(comp, df)
    _check_submission(parse_csv_text(text, f"{path.name} (not written)"), comp, sample)
    atomic_write(path, text)
    return df


def validate_submission(path: Path, comp: Competition) -> None:
    """Same ids, same order, same columns as sample_submission.csv, and a cell for every row."""
    _check_submission(read_csv_file(Path(path)), comp)


def check_submission_writable(comp: Competition, out_dir: Path | None = None) -> None:
    """Before training: a dummy prediction per test id goes through the real writer's render and checks.

    A sample the writer cannot reproduce (or an output folder it cannot write to) then costs seconds,
    not the whole run. Raises ValueError naming the sample file and the problem.
    """
    where = str(comp.sample_submission) if comp.sample_submission is not None else "test/ (no sample_submission.csv)"
    if not comp.test_ids:
        raise ValueError(f"{where}: no test ids, so there is nothing to predict")
    if not comp.classes:
        raise ValueError(f"{where}: the training data has no classes to predict")
    dummy = [[] for _ in comp.test_ids] if comp.task == "multilabel" else np.zeros(len(comp.test_ids), np.int64)
    try:
        sample = _sample_table(comp)
        text = _to_text(comp, render_submission(comp, format_predictions(comp, dummy), sample))
        _check_submission(parse_csv_text(text, "submission.csv (dry run)"), comp, sample)
    except ValueError as e:
        raise ValueError(f"{where}: a submission in its layout would be invalid: {e}") from None
    if out_dir is not None:
        try:
            with tempfile.TemporaryFile(dir=out_dir):
                pass
        except OSError as e:
            raise ValueError(f"{out_dir}: cannot write the submission there ({e.strerror})") from None
