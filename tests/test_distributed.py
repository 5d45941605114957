"""Two data-parallel processes on CPU (gloo): launched by kernel.py itself, and by torchrun."""
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_MODEL as TINY
from test_kernel import _env, kernel_dir  # noqa: F401  (fixture)


def _check(out, proc, steps_single=None):
    print(proc.stdout[-4000:], proc.stderr[-4000:])
    assert proc.returncode == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["exit_status"] == 0
    sub = pd.read_csv(out / "submission.csv", dtype=str, keep_default_na=False)
    sample = pd.read_csv(out / "demo_data" / "sample_submission.csv", dtype=str, keep_default_na=False)
    assert sub.id.tolist() == sample.id.tolist()
    assert np.load(out / "test_probs.npy").shape == (len(sample), 8)
    assert proc.stdout.count("submission written") == 1, "only rank 0 writes"
    assert proc.stdout.count("INFO epoch 0") == 1, "only rank 0 logs progress"
    assert sorted(p.name for p in out.glob("*.pt")) == ["best.pt", "last.pt"]
    return summary


@pytest.mark.parametrize("launcher", ["kernel", "torchrun"])
def test_two_ranks_train_and_write_one_submission(kernel_dir, launcher):  # noqa: F811
    out = kernel_dir / f"ddp_{launcher}"
    args = [*TINY, "--demo-images", "160", "--epochs", "2", "--budget", "3m", "--num-workers", "0",
            "--out-dir", str(out)]
    if launcher == "kernel":
        cmd = [sys.executable, "kernel.py", *args, "--ddp-procs", "2"]
    else:
        # make the demo data first, so both torchrun ranks find it
        subprocess.run([sys.executable, "kernel.py", *args, "--dry-run"], cwd=kernel_dir, env=_env(),
                       capture_output=True, timeout=120, check=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "kernel.py", *args]
    proc = subprocess.run(cmd, cwd=kernel_dir, env=_env(), capture_output=True, text=True, timeout=180)
    summary = _check(out, proc)
    # 128 training images, batch 16, 2 ranks: 4 steps per epoch on each rank instead of 8
    assert summary["steps"] == 2 * 4, summary
    history = pd.read_csv(out / "history.csv")
    assert history.train_images.tolist() == [64, 64], "rank 0 saw its half of the data"


def test_options_data_parallelism_cannot_do_are_refused_before_any_rank_starts(kernel_dir, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text('{"exit_status": 0}')  # an earlier run's verdict must not be read back
    proc = subprocess.run([sys.executable, "kernel.py", *TINY, "--ddp-procs", "2", "--freeze", "0.3",
                           "--demo-images", "40", "--out-dir", str(out)], cwd=kernel_dir, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "ddp_procs=2 cannot be combined with freeze" in proc.stderr
    assert "starting 2 data-parallel processes" not in proc.stdout


def test_two_ranks_train_rect_batches_and_write_one_submission(kernel_dir, tmp_path):  # noqa: F811
    """input_mode=rect under data parallelism (auto's pick for a fine-tune on long images, on a Kaggle
    T4 x2 too): the ranks take turns at one bucketed shuffle, so they take as many steps."""
    from test_tiles import strip_competition
    data = strip_competition(tmp_path / "strips", n_train=48, n_test=6, lengths=(32, 64, 96, 160))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "kernel.py", *TINY, "--input-mode", "rect", "--ddp-procs", "2",
                           "--epochs", "2", "--budget", "3m", "--num-workers", "0", "--batch-size", "4",
                           "--data-dir", str(data), "--out-dir", str(out)], cwd=kernel_dir, env=_env(),
                          capture_output=True, text=True, timeout=240)
    print(proc.stdout[-4000:], proc.stderr[-4000:])
    assert proc.returncode == 0
    assert "starting 2 data-parallel processes" in proc.stdout and "input mode: rect (set)" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["exit_status"] == 0 and summary["input_mode"] == "rect"
    sub = pd.read_csv(out / "submission.csv", dtype=str, keep_default_na=False)
    assert sub.id.tolist() == [f"test{i:03d}" for i in range(6)] and set(sub.label) <= {"c0", "c1"}
    assert proc.stdout.count("submission written") == 1, "only rank 0 writes"
    history = pd.read_csv(out / "history.csv")
    # rank 0 its half of the bucket batches (one repeated at most to even the count), not all of them
    assert len(history) == 2 and (history.train_images > 0).all(), history
    assert (history.train_images < 0.75 * summary["train_images"]).all(), (history, summary)
