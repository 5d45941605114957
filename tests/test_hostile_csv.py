"""Hostile competition inputs: odd encodings, delimiters, columns, missing labels, junk folders and
sample submissions the writer must reproduce. Each must load correctly or fail at once, naming the file."""
import codecs
import logging
import os

import numpy as np
import pandas as pd
import pytest
from conftest import make_folder, make_multilabel_csv, make_single_label_csv
from PIL import Image

from kernelkit.inputs.competition import detect_format, load_competition
from kernelkit.inputs.submission import format_predictions, validate_submission, write_submission


def write_rows(path, header, rows, sep=",", encoding="utf-8", bom=b""):
    text = "".join(sep.join(map(str, r)) + "\n" for r in [header, *rows])
    path.write_bytes(bom + text.encode(encoding))


def train_rows(root):
    return pd.read_csv(root / "train.csv", dtype=str, keep_default_na=False).values.tolist()


# 1. encodings, empty files, delimiters ---------------------------------------------------------------

@pytest.mark.parametrize("encoding,bom", [
    ("latin-1", b""),
    ("utf-16-le", codecs.BOM_UTF16_LE),
    ("utf-16-be", codecs.BOM_UTF16_BE),
    ("utf-16-le", b""),  # UTF-16 without a byte-order mark
])
def test_train_csv_in_other_encodings_is_read(tmp_path, caplog, encoding, bom):
    root = make_single_label_csv(tmp_path / "d")
    rows = [(i, {"10": "café", "11": "naïve", "12": "plain"}[c]) for i, c in train_rows(root)]
    write_rows(root / "train.csv", ["id", "category_id"], rows, encoding=encoding, bom=bom)
    with caplog.at_level(logging.WARNING, logger="kernelkit"):
        comp = load_competition(root)
    assert comp.classes == ["café", "naïve", "plain"] and len(comp.train_paths) == 60
    if encoding == "latin-1":
        assert "train.csv is not UTF-8" in caplog.text and "latin-1" in caplog.text


def test_labels_and_sample_in_other_encodings_are_read(tmp_path):
    root = make_multilabel_csv(tmp_path / "d")
    write_rows(root / "labels.csv", ["attribute_id", "attribute_name"],
               [(k, f"tag::é{k}") for k in range(4)], encoding="utf-16-le", bom=codecs.BOM_UTF16_LE)
    ids = pd.read_csv(root / "sample_submission.csv", dtype=str).id.tolist()
    write_rows(root / "sample_submission.csv", ["id", "attribute_ids"], [(i, "0") for i in ids],
               encoding="utf-8", bom=codecs.BOM_UTF8)
    comp = load_competition(root)
    assert comp.class_names[0] == "tag::é0" and comp.test_ids == ids and comp.id_column == "id"


def test_header_only_train_csv_is_a_clear_error(tmp_path):
    root = make_single_label_csv(tmp_path / "d")
    (root / "train.csv").write_text("id,category_id\n")
    with pytest.raises(ValueError, match="train.csv has no rows"):
        load_competition(root)


@pytest.mark.parametrize("name", ["train.csv", "labels.csv", "sample_submission.csv"])
def test_empty_csv_is_a_clear_error(tmp_path, name):
    root = make_multilabel_csv(tmp_path / "d")
    (root / name).write_bytes(b"")
    with pytest.raises(ValueError, match=f"{name} is empty"):
        load_competition(root)


def test_binary_file_named_csv_is_refused(tmp_path):
    root = make_single_label_csv(tmp_path / "d")
    (root / "train.csv").write_bytes(b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="train.csv: contains NUL bytes"):
        load_competition(root)


@pytest.mark.parametrize("sep", [";", "\t"])
def test_delimiters_are_sniffed(tmp_path, sep):
    root = make_single_label_csv(tmp_path / "d")
    write_rows(root / "train.csv", ["id", "category_id"], train_rows(root), sep=sep)
    comp = load_competition(root)
    assert comp.classes == ["10", "11", "12"] and comp.train_targets[:4].tolist() == [0, 1, 2, 0]


# 2. missing labels ---------------------------------------------------------------------------------

def test_missing_single_labels_are_dropped_with_a_warning(tmp_path, caplog):
    root = make_single_label_csv(tmp_path / "d")
    rows = train_rows(root)
    for r, v in enumerate(["", "NaN", "nan", "None", "null"]):
        rows[r][1] = v
    write_rows(root / "train.csv", ["id", "category_id"], rows)
    with caplog.at_level(logging.WARNING, logger="kernelkit"):
        comp = load_competition(root)
    assert comp.classes == ["10", "11", "12"] and len(comp.train_paths) == 55
    assert "5 rows have no label" in caplog.text


def test_all_labels_missing_is_an_error(tmp_path):
    root = make_single_label_csv(tmp_path / "d")
    write_rows(root / "train.csv", ["id", "category_id"], [(i, "nan") for i, _ in train_rows(root)])
    with pytest.raises(ValueError, match="no row has a label in column 'category_id'"):
        load_competition(root)


@pytest.mark.parametrize("with_labels_csv", [True, False])
def test_nan_text_in_multilabel_cells_means_no_labels(tmp_path, with_labels_csv):
    root = make_multilabel_csv(tmp_path / "d")
    if not with_labels_csv:
        (root / "labels.csv").unlink()
    rows = train_rows(root)
    rows[0][1], rows[1][1], rows[2][1] = "nan", "None", "1 nan"
    write_rows(root / "train.csv", ["id", "attribute_ids"], rows)
    comp = load_competition(root)
    assert comp.classes == ["0", "1", "2", "3"]
    assert comp.train_targets[:2].sum() == 0 and np.flatnonzero(comp.train_targets[2]).tolist() == [1]


# 3. which column holds the ids and the labels ------------------------------------------------------

@pytest.mark.parametrize("header,make_row", [
    (["id", "width", "category_id"], lambda i, c: (i, 40, c)),
    (["image_id", "height", "width", "label"], lambda i, c: (i, 32, 40, c)),
    (["width", "image_id", "target"], lambda i, c: (40, i, c)),
])
def test_label_and_id_columns_are_picked_by_name(tmp_path, header, make_row):
    root = make_single_label_csv(tmp_path / "d")
    write_rows(root / "train.csv", header, [make_row(i, c) for i, c in train_rows(root)])
    comp = load_competition(root)
    assert comp.classes == ["10", "11", "12"] and len(comp.train_paths) == 60
    assert comp.train_label_column == header[-1]


def test_sample_submission_names_the_label_column(tmp_path):
    root = make_single_label_csv(tmp_path / "d")
    write_rows(root / "train.csv", ["id", "genus", "species", "category_id"],
               [(i, "g", "s" + c, c) for i, c in train_rows(root)])
    ids = pd.read_csv(root / "sample_submission.csv", dtype=str).id.tolist()
    write_rows(root / "sample_submission.csv", ["id", "category_id"], [(i, 0) for i in ids])
    comp = load_competition(root)
    assert comp.classes == ["10", "11", "12"] and comp.pred_column == "category_id"


def test_ambiguous_label_column_is_refused_listing_the_columns(tmp_path):
    root = make_single_label_csv(tmp_path / "d")
    write_rows(root / "train.csv", ["id", "a", "b"], [(i, c, c) for i, c in train_rows(root)])
    msg = r"train.csv: cannot tell which column holds the labels.*'a', 'b'.*label_column="
    with pytest.raises(ValueError, match=msg):
        load_competition(root)


def test_explicit_columns_override_detection(tmp_path):
    root = make_single_label_csv(tmp_path / "d")
    write_rows(root / "train.csv", ["x", "file", "y"], [(0, i, c) for i, c in train_rows(root)])
    comp = load_competition(root, id_column="file", label_column="y")
    assert comp.classes == ["10", "11", "12"] and len(comp.train_paths) == 60
    assert detect_format(root, id_column="file", label_column="y") == "single_label_csv"
    with pytest.raises(ValueError, match="label_column='nope' is not a column"):
        load_competition(root, label_column="nope")


def test_ids_with_extensions_and_leading_zeros_resolve(tmp_path):
    root = make_single_label_csv(tmp_path / "d")
    write_rows(root / "train.csv", ["id", "category_id"], [(i + ".jpg", c) for i, c in train_rows(root)])
    for f in (root / "test").iterdir():
        f.unlink()
    ids = ["0007.jpg", "1000015157.jpg", "0012"]
    for name in ("0007.jpg", "1000015157.png", "0012.jpg"):  # 1000015157.jpg is really a png
        Image.new("RGB", (8, 8)).save(root / "test" / name)
    write_rows(root / "sample_submission.csv", ["id", "predicted"], [(i, 0) for i in ids])
    comp = load_competition(root)
    assert len(comp.train_paths) == 60 and comp.test_ids == ids and all(comp.test_paths)
    out = tmp_path / "submission.csv"
    write_submission(comp, format_predictions(comp, [0, 1, 2]), out)
    assert out.read_text().splitlines()[1:] == ["0007.jpg,10", "1000015157.jpg,11", "0012,12"]


# 4. space-separated labels -------------------------------------------------------------------------

def test_space_separated_labels_are_detected_as_multilabel(tmp_path, caplog):
    root = make_single_label_csv(tmp_path / "d")
    combos = ["clear primary", "haze primary water", "primary", "clear", "cloudy", "clear primary road"]
    rows = [(i, combos[r % len(combos)]) for r, (i, _) in enumerate(train_rows(root))]
    write_rows(root / "train.csv", ["image_name", "tags"], rows)
    with caplog.at_level(logging.WARNING, logger="kernelkit"):
        comp = load_competition(root)
    assert comp.format == "multilabel_csv" and comp.task == "multilabel"
    assert sorted(comp.classes) == ["clear", "cloudy", "haze", "primary", "road", "water"]
    assert "multi-label" in caplog.text


def test_class_names_with_spaces_stay_single_label(tmp_path):
    root = make_single_label_csv(tmp_path / "d")
    names = {"10": "golden retriever", "11": "labrador retriever", "12": "pug"}
    write_rows(root / "train.csv", ["id", "breed"], [(i, names[c]) for i, c in train_rows(root)])
    comp = load_competition(root)
    assert comp.format == "single_label_csv" and comp.classes == ["golden retriever", "labrador retriever", "pug"]


# 5. junk in folder layouts -------------------------------------------------------------------------

def test_folder_junk_is_skipped(tmp_path):
    root = make_folder(tmp_path / "d")
    for junk in ("__MACOSX/beach", ".ipynb_checkpoints", ".hidden", "zzz_empty"):
        (root / "train" / junk).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "train" / "__MACOSX" / "beach" / "x.jpg")
    Image.new("RGB", (8, 8)).save(root / "train" / ".hidden" / "y.jpg")
    (root / "train" / "beach" / "._beach_0.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (root / "test" / "._img000.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    comp = load_competition(root)
    assert comp.classes == ["beach", "forest", "highway"] and len(comp.train_paths) == 45
    assert len(comp.test_ids) == 9 and not any(i.startswith(".") for i in comp.test_ids)


def test_folder_of_only_junk_is_not_a_dataset(tmp_path):
    (tmp_path / "train" / "__MACOSX").mkdir(parents=True)
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="no train.csv"):
        detect_format(tmp_path)


# 6. sample submissions the writer reproduces ---------------------------------------------------------

@pytest.mark.parametrize("sep", [";", "\t"])
def test_sample_delimiter_extra_columns_and_id_text_are_reproduced(tmp_path, sep):
    root = make_single_label_csv(tmp_path / "d", n_test=3)
    for f in (root / "test").iterdir():
        f.rename(f.with_name(f.name.replace("te", "00")))  # ids with leading zeros
    ids = ["000000", "000001", "000002"]
    write_rows(root / "sample_submission.csv", ["Id", "Predicted", "Usage"],
               [(i, 0, u) for i, u in zip(ids, ["Public", "Private", "Public"])], sep=sep)
    comp = load_competition(root)
    assert comp.test_ids == ids and all(comp.test_paths) and comp.pred_column == "Predicted"
    out = tmp_path / "submission.csv"
    write_submission(comp, format_predictions(comp, [0, 2, 1]), out)
    assert out.read_text() == (f"Id{sep}Predicted{sep}Usage\n000000{sep}10{sep}Public\n"
                               f"000001{sep}12{sep}Private\n000002{sep}11{sep}Public\n")
    validate_submission(out, comp)


def test_one_column_sample_is_refused_at_load(tmp_path):
    root = make_single_label_csv(tmp_path / "d")
    ids = pd.read_csv(root / "sample_submission.csv", dtype=str).id.tolist()
    write_rows(root / "sample_submission.csv", ["id"], [(i,) for i in ids])
    with pytest.raises(ValueError, match="sample_submission.csv has one column"):
        load_competition(root)


def test_wide_multilabel_sample_gets_01_per_class(tmp_path):
    root = make_multilabel_csv(tmp_path / "d", n_test=3)
    ids = pd.read_csv(root / "sample_submission.csv", dtype=str).id.tolist()
    write_rows(root / "sample_submission.csv", ["id", "0", "1", "2", "3", "99"], [(i, 0, 0, 0, 0, 0) for i in ids])
    comp = load_competition(root)
    assert comp.wide_columns == {"0": 0, "1": 1, "2": 2, "3": 3, "99": -1}
    out = tmp_path / "submission.csv"
    write_submission(comp, format_predictions(comp, [[0, 2], [], [3]]), out)
    sub = pd.read_csv(out, dtype=str)
    assert list(sub.columns) == ["id", "0", "1", "2", "3", "99"] and sub.id.tolist() == ids
    assert sub.iloc[:, 1:].astype(int).values.tolist() == [[1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 1, 0]]


def test_wide_single_label_sample_is_one_hot(tmp_path):
    root = make_single_label_csv(tmp_path / "d", n_test=2)
    ids = pd.read_csv(root / "sample_submission.csv", dtype=str).id.tolist()
    write_rows(root / "sample_submission.csv", ["id", "10", "11", "12"], [(i, 0.33, 0.33, 0.34) for i in ids])
    comp = load_competition(root)
    out = tmp_path / "submission.csv"
    write_submission(comp, format_predictions(comp, [2, 0]), out)
    assert out.read_text().splitlines() == ["id,10,11,12", f"{ids[0]},0,0,1", f"{ids[1]},1,0,0"]


@pytest.mark.parametrize("make", [make_single_label_csv, make_multilabel_csv, make_folder])
def test_check_submission_writable_passes_for_good_data(tmp_path, make):
    from kernelkit.inputs.submission import check_submission_writable
    comp = load_competition(make(tmp_path / "d"))
    check_submission_writable(comp, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["d"], "the dry run writes nothing"


def test_check_submission_writable_names_the_problem(tmp_path):
    from kernelkit.inputs.submission import check_submission_writable
    root = make_single_label_csv(tmp_path / "d")
    comp = load_competition(root)
    with pytest.raises(ValueError, match="cannot write the submission there"):
        check_submission_writable(comp, tmp_path / "no_such_dir")
    pd.DataFrame({"id": ["x1", "x2"], "predicted": "0"}).to_csv(root / "sample_submission.csv", index=False)
    with pytest.raises(ValueError, match="sample_submission.csv: .* would be invalid"):
        check_submission_writable(comp)
    folder = make_folder(tmp_path / "f", n_test=0)
    with pytest.raises(ValueError, match="no test ids"):
        check_submission_writable(load_competition(folder))


# 7. never an invalid file at the submission path -------------------------------------------------------

def test_invalid_submission_never_replaces_the_old_file(tmp_path, single_label_dir):
    comp = load_competition(single_label_dir)
    out = tmp_path / "out" / "submission.csv"
    out.parent.mkdir()
    out.write_text("previous run\n")
    with pytest.raises(ValueError, match="empty predictions"):
        write_submission(comp, [""] * len(comp.test_ids), out)
    assert out.read_text() == "previous run\n" and os.listdir(out.parent) == ["submission.csv"]


def test_failed_write_leaves_no_temp_file(tmp_path, single_label_dir, monkeypatch):
    comp = load_competition(single_label_dir)
    out = tmp_path / "out" / "submission.csv"
    out.parent.mkdir()

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError):
        write_submission(comp, format_predictions(comp, [0] * len(comp.test_ids)), out)
    assert os.listdir(out.parent) == []


def test_validate_submission_checks_a_file_on_disk(tmp_path, single_label_dir):
    comp = load_competition(single_label_dir)
    out = tmp_path / "submission.csv"
    write_submission(comp, format_predictions(comp, [1] * len(comp.test_ids)), out)
    validate_submission(out, comp)
    out.write_text(out.read_text().replace(",11\n", ",banana\n", 1))
    with pytest.raises(ValueError, match="'banana' is not one of the classes"):
        validate_submission(out, comp)
