"""Each seed project as a preset, end to end on a generated dataset of its format (issue 4)."""
import json

import conftest
import numpy as np
import pandas as pd
import pytest

from kernelkit.app.cli import main
from kernelkit.core.config import PRESETS
from kernelkit.core.options import make_config
from kernelkit.engine.checkpoint import load_checkpoint

# Tiny backbones and sizes so CPU runs take seconds; everything else comes from the preset.
FROM_SCRATCH = ["--img-size", "32", "--batch-size", "16", "--num-workers", "0", "--epochs", "8", "--budget", "5m"]
SMALL = ["--img-size", "32", "--batch-size", "16", "--num-workers", "0", "--epochs", "3", "--budget", "5m",
         "--lr", "3e-3"]


def _imet_like(root, n_labels=6):
    conftest.make_multilabel_csv(root, n_train=80, n_labels=n_labels)
    names = [f"culture::c{k}" if k < 2 else f"tag::t{k}" for k in range(n_labels)]
    pd.DataFrame({"attribute_id": range(n_labels), "attribute_name": names}).to_csv(root / "labels.csv", index=False)
    return root


@pytest.mark.parametrize("preset,maker,model", [
    ("imet2019", _imet_like, "test_convnext"),
    ("helsinki14", _imet_like, "test_resnet"),
    ("inat2019", conftest.make_single_label_csv, "test_efficientnet"),
    ("scene15", conftest.make_folder, "test_resnet"),
])
def test_preset_learns_from_random_init_end_to_end(tmp_path, preset, maker, model):
    """The preset's own LR, loss, freezing, EMA and layer decay, from random init: it must learn the
    generated task (above the label prior by a margin), not only run."""
    data = maker(tmp_path / "data")
    out = tmp_path / "out"
    extra = ["--model2", "test_efficientnet"] if PRESETS[preset].get("model2") else []
    status = main({}, ["--preset", preset, "--model", model, *extra, *FROM_SCRATCH, "--data-dir", str(data),
                       "--out-dir", str(out)])
    assert status == 0
    cfg = json.loads((out / "config.json").read_text())
    for key, value in PRESETS[preset].items():
        if key not in ("model", "model2", "img_size", "batch_size", "budget"):
            assert cfg[key] == value, key
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_score"] is not None and np.isfinite(summary["train_end_s"])
    assert summary["val_score"] >= summary["baseline"] + 0.05, (summary["val_score"], summary["baseline"])
    sub = pd.read_csv(out / "submission.csv", dtype=str, keep_default_na=False)
    assert sub.iloc[:, 1].notna().all() and len(sub) > 0
    if PRESETS[preset].get("threshold_rule", "global") != "global":
        rule = summary["threshold_rule"]
        assert rule["kind"] == PRESETS[preset]["threshold_rule"]
        assert load_checkpoint(out / summary["checkpoint"])["threshold_rule"] == rule, "stored for offline use"
    if preset == "imet2019":
        assert (sub.attribute_ids != "").all(), "min_labels=1"
        assert summary["threshold_rule"]["group_names"] == ["culture", "tag"]


def test_preset_values_are_valid_configs():
    for name in PRESETS:
        cfg, _ = make_config({}, ["--preset", name])
        assert cfg.preset == name


def test_loss_choice_and_arguments_reach_training(tmp_path, multilabel_dir, capsys):
    out = tmp_path / "out"
    for loss, args, balanced in (("asl", "gamma_neg=2,clip=0.05", "false"), ("focal", "gamma=1.5", "true")):
        status = main({}, ["--model", "test_resnet", *SMALL, "--data-dir", str(multilabel_dir), "--out-dir",
                           str(out), "--loss", loss, "--loss-args", args, "--class-balanced", balanced])
        assert status == 0
    assert main({}, ["--model", "test_resnet", *SMALL, "--data-dir", str(multilabel_dir), "--out-dir", str(out),
                  "--loss", "asl", "--class-balanced", "true"]) == 2  # refused before training: class-balanced
    assert 'class-balanced' in capsys.readouterr().err
    assert main({}, ["--model", "test_resnet", *SMALL, "--data-dir", str(multilabel_dir), "--out-dir", str(out),
                  "--loss", "focal", "--loss-args", "gama=2"]) == 2  # refused before training: unknown parameters
    assert 'unknown parameters' in capsys.readouterr().err
    assert main({}, ["--model", "test_resnet", *SMALL, "--data-dir", str(multilabel_dir), "--out-dir", str(out),
                  "--loss", "ce"]) == 2  # refused before training: does not fit a multilabel task
    assert 'does not fit a multilabel task' in capsys.readouterr().err
    with pytest.raises(ValueError, match="key=value"):
        make_config({}, ["--loss-args", "gamma"])


def test_balanced_sampling_lifts_rare_classes():
    from kernelkit.data.sampling import balanced_sample_weights, balanced_sampler
    labels = np.array([0] * 90 + [1] * 10)
    w = balanced_sample_weights(labels, power=1.0)
    assert w[:90].sum() == pytest.approx(0.5) and w[90:].sum() == pytest.approx(0.5)
    assert balanced_sample_weights(labels, power=0.0) == pytest.approx(np.full(100, 0.01))
    drawn = labels[list(balanced_sampler(labels, power=1.0, seed=0))]
    assert 0.35 < drawn.mean() < 0.65, "about half the draws are the rare class"
    multi = np.array([[1, 0], [1, 0], [1, 1], [0, 0]])
    mw = balanced_sample_weights(multi, power=1.0)
    assert mw[2] > mw[0] and mw[3] == pytest.approx(mw[0]), "rarest label rules; no-label images kept"


def test_kfold_run_writes_out_of_fold_probabilities_and_reports(tmp_path, multilabel_dir):
    from kernelkit.data.folds import load_oof
    out = tmp_path / "out"
    for fold in (0, 1):
        assert main({}, ["--model", "test_resnet", *SMALL, "--epochs", "1", "--data-dir", str(multilabel_dir),
                         "--out-dir", str(out), "--fold", str(fold), "--n-folds", "2"]) == 0
    probs, covered = load_oof(out / "oof", 60, 4)
    assert covered.all(), "two folds of two cover every training image once"
    assert np.isfinite(probs).all() and (probs > 0).all()
    for name in ("label_stats.csv", "errors_per_label.csv", "worst_images.csv", "history.csv"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert "errors" in summary


def test_training_images_are_cached_once_and_reused(tmp_path, single_label_dir, caplog):
    args = ["--model", "test_resnet", *SMALL, "--epochs", "1", "--data-dir", str(single_label_dir)]
    with caplog.at_level("INFO", logger="kernelkit"):
        assert main({}, [*args, "--out-dir", str(tmp_path / "a"), "--cache-dir", str(tmp_path / "cache")]) == 0
        assert "image cache: 60 images at 32 px" in caplog.text
        caplog.clear()
        assert main({}, [*args, "--out-dir", str(tmp_path / "b"), "--cache-dir", str(tmp_path / "cache")]) == 0
        assert "image cache: reusing" in caplog.text
    assert len(list((tmp_path / "cache").iterdir())) == 1, "one cache for one file list and geometry"
    assert main({}, [*args, "--out-dir", str(tmp_path / "c"), "--cache-images", "false"]) == 0
    assert not (tmp_path / "c" / "cache").exists()


def test_gpu_batch_augmentation_and_mixup_in_a_run(tmp_path, single_label_dir, capsys):
    out = tmp_path / "out"
    assert main({}, ["--model", "test_resnet", *SMALL, "--epochs", "2", "--data-dir", str(single_label_dir),
                     "--out-dir", str(out), "--aug", "none", "--gpu-aug", "strong", "--mixup", "0.4",
                     "--cutmix", "1.0"]) == 0
    assert np.isfinite(pd.read_csv(out / "history.csv").train_loss).all()
    assert main({}, ["--model", "test_resnet", *SMALL, "--data-dir", str(single_label_dir), "--out-dir", str(out),
                  "--loss", "complement", "--mixup", "0.2"]) == 2  # refused before training: complement
    assert 'complement' in capsys.readouterr().err
