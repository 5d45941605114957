import pickle
import time

import pytest
import torch

from kernelkit.engine.budget import BudgetClock, InferenceReserve, Progress, lr_factor
from kernelkit.engine.checkpoint import load_checkpoint, save_checkpoint


def test_lr_factor_warms_up_then_decays_to_zero():
    assert lr_factor(0.0, 0.1) == 0.0 and lr_factor(0.05, 0.1) == pytest.approx(0.5)
    assert lr_factor(0.1, 0.1) == pytest.approx(1.0)
    for kind in ("linear", "cosine"):
        values = [lr_factor(p / 100, 0.1, kind) for p in range(10, 101)]
        assert all(a >= b for a, b in zip(values, values[1:])) and values[-1] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        lr_factor(0.5, 0.1, "step")


def test_clock_counts_time_spent_before_a_restart():
    clock = BudgetClock(100, 10, start_time=time.time() - 30)
    assert 29.5 < clock.elapsed() < 31 and 59 < clock.remaining() < 60.5


def test_progress_by_time_and_by_steps():
    clock = BudgetClock(100, 0, start_time=time.time() - 50)
    prog = Progress(clock, start_progress=0.5)
    assert prog.at(deadline_s=clock.elapsed() + 50) == pytest.approx(0.5, abs=0.01)
    assert prog.at(deadline_s=clock.elapsed()) == pytest.approx(1.0)
    assert Progress(clock, total_steps=10).at(0, step=4) == 0.4


def test_inference_reserve_grows_with_test_size_and_views():
    small, big = InferenceReserve(100, 10, 1), InferenceReserve(1000, 10, 2)
    for r in (small, big):
        r.test_ips = 100.0  # measured by the probe before training: test images, TTA views counted
        r.observe_startup(1.0)
    assert big.seconds() > small.seconds() > 2.5 + 2
    assert big.seconds() == pytest.approx(2.5 + 2 + 1.3 * (2000 + 10) / 100)
    big.val_ips = 1000.0  # validation reads cached images: its speed does not stand in for the test's
    assert big.seconds() == pytest.approx(2.5 + 2 + 1.3 * (2000 / 100 + 10 / 1000))
    big.observe_startup(0.1)  # warm persistent workers must not shrink the test loader's start-up
    assert big.startup_s == 1.0


def test_checkpoint_is_atomic_and_weights_only(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}, "config": {"model": "x"}, "step": 3}, path)
    assert load_checkpoint(path)["step"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"], "no temp file left behind"

    class Boom:  # unpicklable-at-save-time object: the old checkpoint must survive
        def __reduce__(self):
            raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        save_checkpoint({"x": Boom()}, path)
    assert load_checkpoint(path)["step"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


class Evil:
    pass


def test_checkpoint_with_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"obj": Evil()}, path, pickle_module=pickle)
    with pytest.raises(ValueError, match="refusing"):
        load_checkpoint(path)


def test_a_format_1_checkpoint_still_loads_and_predicts(tmp_path):
    """Checkpoints written before the format was versioned (no format_version, no seed) migrate on load,
    and the shared predictor path rebuilds the model, its rule (with the training run's min_labels)."""
    from kernelkit.app.predictor import load_predictor
    from kernelkit.build.components import model_from_config
    from kernelkit.core.config import Config
    from kernelkit.engine.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
    cfg = Config(model="test_resnet", img_size=32, min_labels=1)
    model = model_from_config(cfg, 3, with_weights=False)
    old = {"model": model.state_dict(), "epoch": 2, "step": 10, "progress": 0.5, "best_score": 0.7,
           "threshold": 0.3, "config": {**cfg.to_dict(), "option_of_an_old_version": 1}, "classes": ["a", "b", "c"],
           "task": "multilabel"}
    del old["config"]["grace"]  # an option that did not exist then
    path = tmp_path / "best.pt"
    save_checkpoint(old, path)
    ckpt = load_checkpoint(path)
    assert ckpt["format_version"] == FORMAT_VERSION and ckpt["seed"] == cfg.seed
    pred = load_predictor(path, torch.device("cpu"))
    assert pred.rule.values == [0.3] and pred.rule.min_labels == 1, "the training run's decoding, not today's"
    assert pred.classes == ["a", "b", "c"] and pred.config.grace == Config().grace


def test_a_checkpoint_from_a_newer_kernel_is_refused_clearly(tmp_path):
    from kernelkit.engine.checkpoint import load_checkpoint, save_checkpoint
    save_checkpoint({"model": {}, "format_version": 99}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="newer than this kernel"):
        load_checkpoint(tmp_path / "x.pt")
