"""The output folder on Kaggle: a cap checked before writing, no cache saved as output, and slim
inference weights that --mode infer and plain timm both load."""
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from conftest import TINY

from kernelkit.core.config import ConfigError
from kernelkit.core.storage import GB, checkpoint_bytes, folder_bytes, plan_storage
from kernelkit.core.weights import resolve_weights

TINY = [*TINY, "--epochs", "1", "--budget", "2m"]


def test_the_checkpoints_are_planned_first_and_the_cache_gets_what_is_left(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    kw = dict(n_params=1_000_000, ema=False, n_images=1000, n_outputs=0, img_size=100, cache_max_gb=0.0)
    free = plan_storage(out, out / "cache", cap_gb=0, **kw)
    assert free.cache_in_output and free.cache_allowed_bytes == free.cache_wanted_bytes == 1000 * 3 * 100 * 100
    assert free.fixed_bytes >= 3 * checkpoint_bytes(1_000_000, False) + 4_000_000
    capped = plan_storage(out, out / "cache", cap_gb=(free.fixed_bytes + 10_000_000) / GB, **kw)
    assert capped.cache_allowed_bytes == 10_000_000
    elsewhere = plan_storage(out, tmp_path / "scratch", cap_gb=(free.fixed_bytes + 10_000_000) / GB, **kw)
    assert not elsewhere.cache_in_output and elsewhere.cache_allowed_bytes == elsewhere.cache_wanted_bytes
    with pytest.raises(ConfigError, match="output_cap_gb=0.001"):
        plan_storage(out, out / "cache", cap_gb=0.001, **kw)
    (out / "last.prev.pt").write_bytes(b"x" * 5_000_000)  # what is already there counts
    assert plan_storage(out, out / "cache", cap_gb=0, **kw).fixed_bytes == free.fixed_bytes + 5_000_000


def _cap_for_half_the_cache(out: Path, n_images: int, classes: int, n_test: int) -> float:
    from kernelkit.build.components import count_parameters
    from kernelkit.core.options import make_config
    cfg, _ = make_config({}, TINY)
    n_params = count_parameters(cfg, classes)
    assert n_params > 0
    plan = plan_storage(out, out / "cache", n_params=n_params, ema=False, n_images=n_images,
                        n_outputs=3 * (n_test + n_images) * classes, img_size=32, cache_max_gb=0, cap_gb=0)
    return (plan.fixed_bytes + plan.cache_wanted_bytes // 2) / GB


def test_a_small_output_cap_cuts_the_cache_and_is_never_exceeded(tmp_path, single_label_dir, caplog):
    from kernelkit.app.cli import main
    out = tmp_path / "out"
    out.mkdir()
    cap = _cap_for_half_the_cache(out, 60, 3, 12)
    assert main({}, [*TINY, "--data-dir", str(single_label_dir), "--out-dir", str(out),
                     "--output-cap-gb", f"{cap:.9f}"]) == 0
    assert "image cache: room for" in caplog.text and "storage plan" in caplog.text
    assert folder_bytes(out) <= cap * GB, (folder_bytes(out), cap * GB)
    assert (out / "submission.csv").is_file()


def test_a_cap_the_checkpoints_cannot_fit_is_refused_before_training(tmp_path, single_label_dir):
    from kernelkit.app.cli import main
    out = tmp_path / "out"
    assert main({}, [*TINY, "--data-dir", str(single_label_dir), "--out-dir", str(out),
                     "--output-cap-gb", "0.0001"]) == 2
    assert not (out / "last.pt").exists() and not (out / "submission.csv").exists()


def test_on_kaggle_the_cache_is_not_left_in_the_output(tmp_path, single_label_dir, monkeypatch):
    from kernelkit.app.cli import main
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    out = tmp_path / "working"
    assert main({}, [*TINY, "--data-dir", str(single_label_dir), "--out-dir", str(out)]) == 0
    assert not (out / "cache").exists() and (out / "submission.csv").is_file()


def test_inference_weights_load_in_infer_mode_and_in_plain_timm(tmp_path, multilabel_dir):
    from kernelkit.app.cli import main
    from kernelkit.app.predictor import load_predictor
    out = tmp_path / "out"
    assert main({}, [*TINY, "--data-dir", str(multilabel_dir), "--out-dir", str(out)]) == 0
    folder = out / "model"
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "kernelkit.json"}
    meta = json.loads((folder / "kernelkit.json").read_text())
    assert meta["classes"] == ["0", "1", "2", "3"] and meta["task"] == "multilabel" and meta["preprocess"]["mean"]
    assert (folder / "model.safetensors").stat().st_size < (out / "best.pt").stat().st_size / 2  # no optimizer

    # --mode infer from the folder predicts what the run predicted
    assert main({}, [*TINY, "--data-dir", str(multilabel_dir), "--out-dir", str(tmp_path / "inf"),
                     "--mode", "infer", "--checkpoints", str(folder)]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "inf" / "test_probs.npy"), np.load(out / "test_probs.npy"),
                               rtol=1e-4, atol=1e-5)
    assert pd.read_csv(tmp_path / "inf" / "submission.csv").equals(pd.read_csv(out / "submission.csv"))
    # a run folder with no .pt left falls back to its inference folder
    for pt in out.glob("*.pt"):
        os.remove(pt)
    assert main({}, [*TINY, "--data-dir", str(multilabel_dir), "--out-dir", str(tmp_path / "inf2"),
                     "--mode", "infer", "--checkpoints", str(out)]) == 0

    # plain timm: config.json + model.safetensors, as any timm user loads a local folder
    src = resolve_weights(folder)
    model = timm.create_model(src.architecture, pretrained=True, pretrained_cfg_overlay=src.overlay(),
                              num_classes=src.num_classes).eval()
    ours = load_predictor(folder, torch.device("cpu")).model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ours(x))


def test_the_inference_weights_are_written_before_the_unreserved_reports(tmp_path, single_label_dir, monkeypatch):
    """The export has its seconds in the inference reserve, the reports (plot, error analysis) none:
    on 120 s GPU runs the reports ran first and left the export no time on every run."""
    from kernelkit.app import train_job
    from kernelkit.app.cli import main
    out = tmp_path / "out"
    seen = []
    real = train_job.validation_reports

    def reports(*args, **kwargs):
        seen.append((out / "model" / "model.safetensors").is_file())
        return real(*args, **kwargs)

    monkeypatch.setattr(train_job, "validation_reports", reports)
    assert main({}, [*TINY, "--data-dir", str(single_label_dir), "--out-dir", str(out)]) == 0
    assert seen == [True]
    assert (out / "val_probs.npy").is_file() and (out / "error_summary.json").is_file()  # the reports still ran
