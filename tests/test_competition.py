import numpy as np
import pandas as pd
import pytest

from kernelkit.inputs.competition import detect_format, load_competition
from kernelkit.inputs.submission import format_predictions, write_submission


def test_multilabel_csv(multilabel_dir):
    comp = load_competition(multilabel_dir)
    assert comp.format == "multilabel_csv" and comp.task == "multilabel"
    assert comp.classes == ["0", "1", "2", "3"] and comp.class_names[0] == "tag::t0"
    assert comp.train_targets.shape == (60, 4)
    assert (comp.train_targets.sum(1) == 0).any(), "images without labels must be kept"
    df = pd.read_csv(multilabel_dir / "train.csv", dtype=str, keep_default_na=False)
    first = [int(t) for t in df.attribute_ids[0].split()]
    assert np.flatnonzero(comp.train_targets[0]).tolist() == first
    assert comp.test_ids[:2] == ["f0000000", "f0000001"] and all(comp.test_paths)
    assert (comp.id_column, comp.pred_column) == ("id", "attribute_ids")


def test_single_label_csv(single_label_dir):
    comp = load_competition(single_label_dir)
    assert comp.format == "single_label_csv" and comp.task == "multiclass"
    assert comp.classes == ["10", "11", "12"]
    assert comp.train_targets[:4].tolist() == [0, 1, 2, 0]
    assert comp.pred_column == "predicted"


def test_folder_per_class(folder_dir):
    comp = load_competition(folder_dir)
    assert comp.format == "folder" and comp.classes == ["beach", "forest", "highway"]
    assert len(comp.train_paths) == 45 and np.bincount(comp.train_targets).tolist() == [15, 15, 15]
    # no sample_submission: ids are the sorted test file stems
    assert comp.test_ids == sorted(comp.test_ids) and len(comp.test_ids) == 9
    assert (comp.id_column, comp.pred_column) == ("id", "label")


def test_detect_format_error_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        detect_format(tmp_path)


def test_id_with_path_is_refused(single_label_dir):
    df = pd.read_csv(single_label_dir / "train.csv", dtype=str)
    df.loc[3, "id"] = "../../etc/passwd"
    df.to_csv(single_label_dir / "train.csv", index=False)
    with pytest.raises(ValueError, match="row 5.*path"):
        load_competition(single_label_dir)


def test_unknown_label_names_the_row(multilabel_dir):
    df = pd.read_csv(multilabel_dir / "train.csv", dtype=str, keep_default_na=False)
    df.loc[2, "attribute_ids"] = "1 99"
    df.to_csv(multilabel_dir / "train.csv", index=False)
    with pytest.raises(ValueError, match="row 4: label '99'"):
        load_competition(multilabel_dir)


def test_missing_images_are_counted_and_missing_test_files_keep_their_row(single_label_dir):
    (single_label_dir / "train" / "tr0001.jpg").unlink()
    (single_label_dir / "test" / "te0002.jpg").unlink()
    comp = load_competition(single_label_dir)
    assert comp.missing_train == 1 and len(comp.train_paths) == 59
    assert len(comp.test_ids) == 12 and comp.test_paths[2] == ""


def test_submission_is_validated_against_sample(tmp_path, multilabel_dir):
    comp = load_competition(multilabel_dir)
    cells = format_predictions(comp, [[0, 2]] + [[]] * (len(comp.test_ids) - 1))
    out = tmp_path / "submission.csv"
    write_submission(comp, cells, out)
    sub = pd.read_csv(out, dtype=str, keep_default_na=False)
    sample = pd.read_csv(multilabel_dir / "sample_submission.csv", dtype=str)
    assert list(sub.columns) == list(sample.columns) and sub.id.tolist() == sample.id.tolist()
    assert sub.attribute_ids[0] == "0 2"
    comp.test_ids = comp.test_ids[::-1]  # wrong order must be caught
    with pytest.raises(ValueError, match="id"):
        write_submission(comp, cells, out)
    with pytest.raises(ValueError, match="predictions"):
        write_submission(comp, cells[:-1], out)
