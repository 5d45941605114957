import importlib.util
import json
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFile

from kernelkit.decide.reports import (
    error_analysis,
    label_statistics,
    plot_history,
    write_error_analysis,
    write_label_statistics,
)

HAS_MPL = importlib.util.find_spec("matplotlib") is not None
HELSINKI = ["clouds", "male", "bird", "dog", "river", "portrait", "baby", "night", "people", "female"]


def write_history(path, with_val=True):
    rows = [{"epoch": e, "train_loss": 1.0 / (e + 1), "train_images": 100, "train_s": 1.0, "lr_end": 1e-3 * (3 - e),
             "progress": (e + 1) / 3, "elapsed_s": 2.0 * (e + 1)} for e in range(3)]
    if with_val:
        for r, v in zip(rows, (0.5, 0.7, 0.65)):
            r.update(val_score=v, threshold=0.2, val_s=0.5)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("with_val", [True, False])
def test_plot_history_writes_a_png_when_matplotlib_is_there(tmp_path, with_val):
    out = plot_history(write_history(tmp_path / "history.csv", with_val), tmp_path / "curves.png")
    if not HAS_MPL:
        assert out is None and not (tmp_path / "curves.png").exists()
        return
    assert out == tmp_path / "curves.png"
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1]
    assert not list(tmp_path.glob("*.tmp"))


def test_plot_history_is_skipped_without_matplotlib_or_rows(tmp_path, monkeypatch, caplog):
    assert plot_history(tmp_path / "missing.csv", tmp_path / "a.png") is None
    (tmp_path / "empty.csv").write_text("epoch,train_loss\n")
    assert plot_history(tmp_path / "empty.csv", tmp_path / "b.png") is None
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    with caplog.at_level("INFO", logger="kernelkit"):
        assert plot_history(write_history(tmp_path / "history.csv"), tmp_path / "c.png") is None
    assert "matplotlib is not installed" in caplog.text
    assert not list(tmp_path.glob("*.png"))


def test_multilabel_statistics_count_labels_per_image_and_read_sizes_from_headers(tmp_path):
    targets = np.zeros((6, 4), np.uint8)
    targets[0, [0, 1]] = 1
    targets[1, [0, 1, 2]] = 1
    targets[2, 0] = 1  # images 3, 4, 5: no label (Helsinki: half the images)
    sizes = [(300, 300), (300, 900), (1000, 300), (400, 300), (300, 500)]
    paths = []
    for i, s in enumerate(sizes):
        Image.new("RGB", s).save(tmp_path / f"{i}.jpg")
        paths.append(str(tmp_path / f"{i}.jpg"))
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    paths.append(str(tmp_path / "bad.jpg"))
    names = ["culture::a", "tag::b c", "tag::d", "tag::never"]
    summary = write_label_statistics(targets, names, paths + [""], "multilabel", tmp_path / "out")
    per_class = pd.read_csv(tmp_path / "out" / "label_stats.csv")
    assert per_class["count"].tolist() == [3, 2, 1, 0] and per_class["name"].tolist() == names
    assert per_class["share"].tolist() == pytest.approx([0.5, 2 / 6, 1 / 6, 0], abs=1e-6)
    assert json.loads((tmp_path / "out" / "label_stats.json").read_text()) == summary
    assert summary["labels_per_image"]["histogram"] == {"0": 3, "1": 1, "2": 1, "3": 1}
    assert summary["images_without_label"] == 3 and summary["classes_without_images"] == 1
    assert summary["rarest"][0] == ["tag::never", 0] and summary["most_common"][0] == ["culture::a", 3]
    s = summary["image_sizes"]
    assert s["sampled"] == 6 and s["unreadable"] == 1  # the blank path (missing file) is not sampled
    assert s["width"] == {"min": 300, "median": 300.0, "max": 1000}
    assert s["height"] == {"min": 300, "median": 300.0, "max": 900}
    assert s["extreme_aspect_share"] == pytest.approx(2 / 5) and s["max_aspect"] == pytest.approx(10 / 3, abs=0.01)


def test_image_sizes_come_from_a_bounded_sample_and_decode_nothing(tmp_path, monkeypatch):
    paths = []
    for i in range(30):
        Image.new("RGB", (50 + i, 40)).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels were decoded"))
    labels = np.arange(30) % 3
    a = label_statistics(labels, ["x", "y", "z"], paths, "multiclass", sample_sizes=10, seed=1)["summary"]
    b = label_statistics(labels, ["x", "y", "z"], paths, "multiclass", sample_sizes=10, seed=1)["summary"]
    assert a["image_sizes"]["sampled"] == 10 and a == b
    assert "labels_per_image" not in a and a["imbalance_ratio"] == 1.0
    assert label_statistics(labels, ["x", "y", "z"], None, "multiclass")["per_class"]["count"].tolist() == [10] * 3


def helsinki_like(n=200, seed=0):
    rng = np.random.default_rng(seed)
    truth = rng.random((n, len(HELSINKI))) < np.linspace(0.02, 0.3, len(HELSINKI))
    pred = truth.copy()
    flip = rng.random(truth.shape) < 0.03
    pred[flip] = ~pred[flip]
    probs = np.clip(np.where(pred, 0.7, 0.1) + rng.normal(0, 0.05, truth.shape), 0, 1)
    return truth, pred, probs


def test_multilabel_error_analysis_matches_a_direct_count(tmp_path):
    truth, pred, probs = helsinki_like()
    # One image with three wrong labels: two missing, one extra, and confidently so.
    truth[7], pred[7] = False, False
    truth[7, [1, 9]], pred[7, 4] = True, True
    probs[7] = 0.05
    probs[7, 4] = 0.99
    ids = [f"img{i}" for i in range(len(truth))]
    summary = write_error_analysis(truth, pred, probs, HELSINKI, ids, tmp_path, top=5)
    per_label = pd.read_csv(tmp_path / "errors_per_label.csv").set_index("name")
    for j, name in enumerate(HELSINKI):
        fp, fn = int((~truth[:, j] & pred[:, j]).sum()), int((truth[:, j] & ~pred[:, j]).sum())
        assert (per_label.loc[name, "fp"], per_label.loc[name, "fn"]) == (fp, fn)
        assert per_label.loc[name, "errors"] == fp + fn
    assert per_label["errors"].is_monotonic_decreasing
    worst = pd.read_csv(tmp_path / "worst_images.csv", keep_default_na=False)
    assert len(worst) == 5 and worst["n_wrong"].is_monotonic_decreasing
    n_wrong = (truth != pred).sum(1)
    assert worst["n_wrong"].iloc[0] == n_wrong.max()
    row = worst.set_index("id").loc["img7"]
    assert row["missing"] == "male; female" and row["extra"] == "river"
    assert row["top_probs"].startswith("river 0.990")
    candidates = pd.read_csv(tmp_path / "missing_label_candidates.csv")
    assert candidates.iloc[0].tolist()[:3] == ["img7", "river", 0.99]
    assert summary["wrong_labels"] == int(n_wrong.sum())
    assert summary["wrong_labels_per_image"] == {str(k): int(v) for k, v in enumerate(np.bincount(n_wrong)) if v}
    assert summary["most_errors"][0] == [per_label.index[0], int(per_label["errors"].iloc[0])]
    assert json.loads((tmp_path / "error_summary.json").read_text()) == summary


def test_unlabelled_images_given_labels_are_counted():
    truth = np.zeros((4, 3), bool)
    truth[0, 0] = True
    pred = np.zeros((4, 3), bool)
    pred[[0, 1, 2], [0, 2, 2]] = True
    out = error_analysis(truth, pred, None, ["a", "b", "c"], ["w", "x", "y", "z"])
    s = out["summary"]
    assert s["images_without_label"] == 3 and s["unlabelled_images_given_labels"] == 2
    assert "top_probs" not in out["worst_images"] and len(out["worst_images"]) == 2
    assert s["most_errors"] == [["c", 2]] and s["wrong_labels_per_image"] == {"0": 2, "1": 2}


def test_wrong_labels_per_image_pools_ten_and_more():
    truth = np.zeros((3, 12), bool)
    pred = np.zeros((3, 12), bool)
    pred[0], pred[1, :10], pred[2, 0] = True, True, True
    s = error_analysis(truth, pred, None, [str(i) for i in range(12)], ["a", "b", "c"])["summary"]
    assert s["wrong_labels_per_image"] == {"1": 1, "10+": 2}


def test_single_label_error_analysis_finds_confusions_and_least_confident_images(tmp_path):
    names = ["beach", "forest", "highway", "coast"]
    truth = np.array([0, 0, 0, 0, 1, 1, 2, 2, 3, 3])
    pred = np.array([3, 3, 3, 0, 1, 2, 2, 2, 0, 3])
    probs = np.full((10, 4), 0.1)
    probs[np.arange(10), pred] = 0.7
    probs[2] = [0.02, 0.08, 0.0, 0.9]  # the most confident mistake
    summary = write_error_analysis(truth, pred, probs, names, [f"s{i}" for i in range(10)], tmp_path, top=3)
    pairs = pd.read_csv(tmp_path / "confusion_pairs.csv")
    assert pairs.iloc[0].tolist() == ["beach", "coast", 3, 0.75]
    assert len(pairs) == 3 and set(pairs["count"][1:]) == {1}
    worst = pd.read_csv(tmp_path / "worst_images.csv")
    assert worst["id"].iloc[0] == "s2" and worst["p_true"].iloc[0] == pytest.approx(0.02)
    assert worst["p_true"].is_monotonic_increasing and not worst["correct"].any()
    per_label = pd.read_csv(tmp_path / "errors_per_label.csv").set_index("name")
    assert per_label.loc["beach", "fn"] == 3 and per_label.loc["coast", "fp"] == 3
    assert summary["errors"] == 5 and summary["accuracy"] == 0.5
    assert summary["top_confusions"][0] == ["beach", "coast", 3]


def test_error_analysis_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="ids"):
        error_analysis(np.zeros((3, 2), bool), np.zeros((3, 2), bool), None, ["a", "b"], ["x"])
    with pytest.raises(ValueError, match="probs"):
        error_analysis(np.zeros(3, int), np.zeros(3, int), np.zeros((3, 5)), ["a", "b"], ["x", "y", "z"])
