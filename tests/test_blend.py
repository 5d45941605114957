"""--mode blend: K-fold runs weighted on their out-of-fold predictions (blend.py, blend_job.py)."""
import json
import shutil

import numpy as np
import pytest
from conftest import TINY

from kernelkit.app.cli import main
from kernelkit.decide.ensemble import _with_weight, fit_weights, group_members, mix
from kernelkit.decide.metrics import accuracy
from kernelkit.inputs.competition import load_competition
from kernelkit.inputs.submission import validate_submission

SMALL = [*TINY, "--epochs", "1", "--budget", "5m", "--tta", "1"]


def test_weights_favour_the_better_model_and_never_lose_to_the_best_alone():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    good = np.eye(3)[y] * 0.6 + rng.random((300, 3)) * 0.5
    noise = rng.random((300, 3))
    score = lambda p: accuracy(y, p)  # noqa: E731
    weights, best = fit_weights([noise, good], score)
    assert weights.sum() == pytest.approx(1.0) and (weights >= 0).all()
    assert weights[1] > 0.5 and best >= max(score(noise), score(good))
    assert best == pytest.approx(score(mix([noise, good], weights)))
    w = _with_weight(np.array([0.5, 0.5, 0.0]), 2, 0.2)
    assert np.allclose(w, [0.4, 0.4, 0.2])


def test_blend_mode_reports_cv_fits_weights_and_writes_a_valid_submission(multilabel_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    for fold in (0, 1):
        assert main({}, [*SMALL, "--data-dir", str(multilabel_dir), "--out-dir", str(runs / f"a{fold}"),
                         "--fold", str(fold), "--n-folds", "2"]) == 0
    # A second model: the same folders as if trained with another seed, whose out-of-fold probabilities
    # know the answers better than one epoch of training does.
    rng = np.random.default_rng(1)
    targets = load_competition(multilabel_dir).train_targets
    for fold in (0, 1):
        src, dst = runs / f"a{fold}", runs / f"b{fold}"
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.pt", "cache"))
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, "seed": 7}))
        idx = np.load(dst / "oof" / f"oof_fold{fold}_idx.npy")
        np.save(dst / "oof" / f"oof_fold{fold}_probs.npy",
                (0.5 * targets[idx] + 0.5 * rng.random((len(idx), targets.shape[1]))).astype(np.float32))
    assert [len(g) for g in group_members(sorted(runs.iterdir()))] == [2, 2], "folds of one model go together"
    out = tmp_path / "blend"
    assert main({}, ["--mode", "blend", "--checkpoints", f"{runs}/a*,{runs}/b*", "--data-dir", str(multilabel_dir),
                     "--out-dir", str(out)]) == 0
    validate_submission(out / "submission.csv", load_competition(multilabel_dir))
    report = json.loads((out / "blend.json").read_text())
    assert len(report["folds"]) == 4 and len(report["members"]) == 2 and report["oof_rows"] == 60
    assert sum(report["weights"].values()) == pytest.approx(1.0, abs=1e-3)
    assert report["weights"]["b0+1"] > report["weights"]["a0+1"], "the better model weighs more"
    assert report["blended"] >= max(report["members"].values()) - 1e-9
    assert report["threshold_rule"]["kind"] == "global"
    assert json.loads((out / "summary.json").read_text())["exit_status"] == 0
    # A folder that is no K-fold run is refused at start, named.
    capsys.readouterr()
    assert main({}, ["--mode", "blend", "--checkpoints", str(tmp_path / "blend"), "--data-dir", str(multilabel_dir),
                     "--out-dir", str(tmp_path / "x")]) == 2
    assert "oof_fold" in capsys.readouterr().err
    assert main({}, ["--mode", "blend", "--data-dir", str(multilabel_dir)]) == 2, "blend needs checkpoints="
    # The same fold twice (a copied run folder joins its model): refused, named.
    shutil.copytree(runs / "a0", tmp_path / "again" / "a0copy")
    assert main({}, ["--mode", "blend", "--checkpoints", f"{runs}/a*,{tmp_path}/again/a0copy", "--data-dir",
                     str(multilabel_dir), "--out-dir", str(tmp_path / "y")]) == 2
    assert "already covered" in capsys.readouterr().err
