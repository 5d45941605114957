"""kernel.py as users run it: copied alone into an empty folder, with src/ not importable."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from conftest import TINY_MODEL

import build_kernel  # noqa: E402

TINY = TINY_MODEL  # workers on: the bundled kernel spawns them


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("kernel")
    shutil.copy(ROOT / "kernel.py", d / "kernel.py")
    probe = subprocess.run([sys.executable, "-c", "import kernelkit"], cwd=d, env=_env(), capture_output=True)
    assert probe.returncode != 0, "src/ must not be importable for this test to mean anything"
    return d


def run_kernel(kernel_dir: Path, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "kernel.py", *args], cwd=kernel_dir, env=_env(),
                          capture_output=True, text=True, timeout=timeout)
    print(proc.stdout[-4000:], proc.stderr[-4000:])
    return proc


def test_build_is_deterministic_small_and_current(tmp_path):
    text = build_kernel.build()
    assert text == build_kernel.build()
    assert len(text.encode()) < 1_000_000
    # the CONFIG region is the user's: a filled one must not fail CI
    assert build_kernel.without_region((ROOT / "kernel.py").read_text()) == build_kernel.without_region(text), \
        "kernel.py is stale: run python build_kernel.py"
    assert text.index("CONFIG = dict(") < text.index("_SOURCES = {")
    stale = tmp_path / "kernel.py"
    check = [sys.executable, str(ROOT / "build_kernel.py"), "--check", "--out", str(stale)]
    stale.write_text(text.replace("def parse_duration(", "def parse_duration_(", 1))
    assert subprocess.run(check, capture_output=True).returncode == 1
    stale.write_text(text.replace("# model='auto'", "model='resnet18'"))
    assert subprocess.run(check, capture_output=True).returncode == 0, "the CONFIG region is the user's"
    stale.write_text(text)
    assert subprocess.run(check, capture_output=True).returncode == 0


def test_demo_runs_alone_with_spawned_workers(kernel_dir):
    out = kernel_dir / "demo_out"
    # Fixed epochs inside a roomy budget: spawned workers start slowly on a busy machine, and a
    # budget that start-up could eat would (rightly) be refused. 90 s was not roomy on a slow day of
    # this machine (`import torch, timm` 13 s a process: start-up took 71 s, and the run was refused).
    proc = run_kernel(kernel_dir, *TINY, "--budget", "240s", "--epochs", "3", "--demo-images", "160",
                      "--num-workers", "2", "--mp-context", "spawn", "--out-dir", str(out), timeout=480)
    assert proc.returncode == 0
    assert "running the built-in demo" in proc.stdout and "submission written" in proc.stdout
    sub = pd.read_csv(out / "submission.csv", dtype=str, keep_default_na=False)
    sample = pd.read_csv(out / "demo_data" / "sample_submission.csv", dtype=str, keep_default_na=False)
    assert sub.id.tolist() == sample.id.tolist() and list(sub.columns) == list(sample.columns)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["wall_s"] <= 240, "the run must finish inside its budget"
    assert summary["val_score"] is not None and summary["checkpoint"] == "best.pt"
    config = json.loads((out / "config.json").read_text())
    assert config["preset"] == "demo" and config["model"] == "test_resnet"
    assert np.load(out / "test_probs.npy").shape == (len(sample), 8)
    # requirements.txt pins matplotlib (Kaggle images have it): the training curves are drawn
    with Image.open(out / "history.png") as im:
        assert im.format == "PNG" and im.size[0] > im.size[1]


@pytest.mark.parametrize("maker,column", [("make_single_label_csv", "predicted"), ("make_folder", "label")])
def test_single_label_formats_train_and_submit(kernel_dir, tmp_path, maker, column):
    import conftest
    data = getattr(conftest, maker)(tmp_path / "data")
    out = tmp_path / "out"
    proc = run_kernel(kernel_dir, *TINY, "--data-dir", str(data), "--out-dir", str(out), "--epochs", "6",
                      "--val-fraction", "0.25", "--num-workers", "0", "--budget", "5m")
    assert proc.returncode == 0
    sub = pd.read_csv(out / "submission.csv", dtype=str)
    assert sub.columns.tolist() == ["id", column] and sub[column].notna().all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_score"] > summary["baseline"], summary


def test_multilabel_train_then_offline_inference_from_checkpoint(kernel_dir, tmp_path):
    import conftest
    data = conftest.make_multilabel_csv(tmp_path / "data")
    (data / "test" / "f0000003.png").write_bytes(b"broken")  # still gets a row
    out = tmp_path / "out"
    proc = run_kernel(kernel_dir, *TINY, "--data-dir", str(data), "--out-dir", str(out), "--epochs", "3",
                      "--num-workers", "0", "--budget", "5m", "--min-labels", "1")
    assert proc.returncode == 0
    sub = pd.read_csv(out / "submission.csv", dtype=str, keep_default_na=False)
    assert len(sub) == 12 and (sub.attribute_ids != "").all(), "min_labels=1 gives every image a label"
    assert "could not be read" in proc.stdout

    out2 = tmp_path / "out_infer"
    proc = run_kernel(kernel_dir, "--mode", "infer", "--checkpoints", str(out / "best.pt"),
                      "--data-dir", str(data), "--out-dir", str(out2), "--num-workers", "0", "--min-labels", "1")
    assert proc.returncode == 0
    np.testing.assert_allclose(np.load(out2 / "test_probs.npy"), np.load(out / "test_probs.npy"), atol=1e-5)
    assert pd.read_csv(out2 / "submission.csv", dtype=str, keep_default_na=False).equals(sub)

    # several checkpoints (a glob) are averaged; each one's probabilities are kept for blending
    out3 = tmp_path / "out_ensemble"
    proc = run_kernel(kernel_dir, "--mode", "infer", "--checkpoints", str(out / "*.pt"), "--data-dir", str(data),
                      "--out-dir", str(out3), "--num-workers", "0")
    assert proc.returncode == 0
    best, last = np.load(out3 / "test_probs_best.npy"), np.load(out3 / "test_probs_last.npy")
    np.testing.assert_allclose(np.load(out3 / "test_probs.npy"), (best + last) / 2, atol=1e-6)
    assert len(json.loads((out3 / "summary.json").read_text())["checkpoints"]) == 2

    # a budget already spent: the first checkpoint still predicts, the rest are skipped, a submission is written
    out4 = tmp_path / "out_late"
    proc = run_kernel(kernel_dir, "--mode", "infer", "--checkpoints", str(out / "*.pt"), "--data-dir", str(data),
                      "--out-dir", str(out4), "--num-workers", "0", "--budget", "1s", "--margin", "0.5s")
    assert proc.returncode == 0 and "skipped" in proc.stdout
    assert len(json.loads((out4 / "summary.json").read_text())["checkpoints"]) == 1
    assert len(pd.read_csv(out4 / "submission.csv")) == 12


def test_bad_config_is_a_clear_error(kernel_dir):
    proc = run_kernel(kernel_dir, "--preset", "nope", "--out-dir", str(kernel_dir / "x"))
    assert proc.returncode == 2 and "unknown preset 'nope'" in proc.stderr
