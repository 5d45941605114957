"""Progressive resizing over the clock (resolution.py): the schedule, the batch resize, the training
run that follows it, a resumed run that continues at the right size, and the planners' arithmetic."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

import kernelkit.build.components as components
from kernelkit.app.cli import main
from kernelkit.inputs.competition import load_competition, validate_submission
from kernelkit.engine.resolution import (ResolutionSchedule, effective_ips, epochs_with_schedule, ips_by_pixels,
                                  resize_batch, schedule_from)

PROGRESS = np.linspace(0, 1, 1001)


@pytest.mark.parametrize("full,start,full_at", [(224, 0.5, 0.75), (64, 0.5, 0.75), (96, 0.5, 0.6),
                                                (320, 0.25, 1.0), (512, 0.3, 0.5), (128, 0.75, 0.8)])
def test_size_rises_in_few_rounded_steps_to_full_at_full_at(full, start, full_at):
    s = ResolutionSchedule(full, start, full_at)
    sizes = [s.size_at(p) for p in PROGRESS]
    assert all(a <= b for a, b in zip(sizes, sizes[1:])), "never shrinks"
    step = 32 if full >= 128 else 8
    first = max(32, int(start * full // step) * step)
    assert sizes[0] == first < full
    assert all(sz == full for p, sz in zip(PROGRESS, sizes) if p >= full_at)
    assert all(sz < full for p, sz in zip(PROGRESS, sizes) if p < full_at * 0.5), "the first half is smaller"
    assert all(sz % step == 0 or sz == full for sz in sizes)
    assert 2 <= len(set(sizes)) <= 4, "few shapes: compile and cudnn tune each"
    assert min(sizes) >= 32
    assert sorted(set(sizes)) == [sz for sz, _, _ in s.spans()]
    assert sum(s.shares().values()) == pytest.approx(1.0)


def test_off_or_a_single_size_is_no_schedule():
    assert all(ResolutionSchedule(96, 0.0).size_at(p) == 96 for p in PROGRESS)
    assert schedule_from(96, 0.0, 0.75) is None
    assert schedule_from(0, 0.5, 0.75) is None, "img_size not resolved yet"
    assert schedule_from(32, 0.5, 0.75) is None, "nothing below the 32 px floor"
    assert schedule_from(224, 0.5, 0.75).describe() == "96 px until p=0.25, 128 px until p=0.50, " \
                                                       "160 px until p=0.75, then 224 px"


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_resize_batch_keeps_dtype_layout_and_range(dtype, channels_last):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(4, 3, 64, 64, generator=g) * 255).to(dtype)
    x[:, :, :32] = 255  # a saturated half: antialiasing must not overshoot past 255
    x[:, :, 32:, :8] = 0
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = resize_batch(x, 40)
    assert y.shape == (4, 3, 40, 40) and y.dtype == dtype and y.device == x.device
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert float(y.min()) >= 0 and float(y.max()) <= 255
    assert float(y.float().mean()) == pytest.approx(float(x.float().mean()), rel=0.02)
    assert resize_batch(x, 64) is x, "full size: untouched"


def test_the_schedule_over_the_clock_fits_more_epochs_when_early_stages_are_faster():
    s = ResolutionSchedule(224, 0.5, 0.75)
    ips = {96: 900.0, 128: 600.0, 160: 400.0, 224: 200.0}
    assert epochs_with_schedule(3600, 10000, ips, s) > epochs_with_schedule(3600, 10000, ips, None)
    assert epochs_with_schedule(3600, 10000, ips, None) == pytest.approx(3600 * 200 / 10000)
    # Each stage has a quarter of the clock: the mean of the speeds.
    assert effective_ips(ips, s) == pytest.approx(sum(ips.values()) / 4)
    # Fixed epochs: a quarter of the images each, so the slow stage weighs more (harmonic mean).
    assert 200 < effective_ips(ips, s, over_clock=False) < effective_ips(ips, s)
    assert effective_ips({224: 200.0}, None) == 200.0


def test_stage_throughput_from_two_measurements():
    got = ips_by_pixels([96, 128, 160, 224], {96: 900.0, 224: 200.0})
    assert got[96] == 900.0 and got[224] == 200.0
    assert 900 > got[128] > got[160] > 200
    assert ips_by_pixels([112, 224], {224: 100.0})[112] == pytest.approx(400.0), "one measurement: by pixels"


# ----------------------------------------------------------------------------- a training run
TINY = ["--model", "test_resnet", "--img-size", "64", "--batch-size", "8", "--lr", "3e-3", "--num-workers", "0",
        "--budget", "5m", "--tta", "2"]


def _spy_inputs(monkeypatch) -> list[tuple[bool, tuple]]:
    """(training?, input shape) of every forward pass of the model the run builds."""
    seen: list[tuple[bool, tuple]] = []
    real = components.build_model

    def build(*args, **kwargs):
        model = real(*args, **kwargs)
        model.register_forward_pre_hook(lambda m, a: seen.append((m.training, tuple(a[0].shape))))
        return model

    monkeypatch.setattr(components, "build_model", build)
    return seen


def test_a_run_trains_small_first_full_at_the_end_and_validates_at_its_training_size(single_label_dir, tmp_path,
                                                                                      monkeypatch):
    seen = _spy_inputs(monkeypatch)
    out = tmp_path / "out"
    assert main({}, [*TINY, "--data-dir", str(single_label_dir), "--epochs", "4", "--resize-start", "0.5",
                     "--out-dir", str(out)]) == 0
    validate_submission(out / "submission.csv", load_competition(single_label_dir))
    history = pd.read_csv(out / "history.csv")
    assert history.train_px.tolist() == [32, 40, 48, 64], "a quarter of the steps per stage, full at 0.75"
    train_sizes = [shape[-1] for training, shape in seen if training]
    assert train_sizes[0] == 32 and train_sizes[-1] == 64
    assert set(train_sizes) == {32, 40, 48, 64} and train_sizes == sorted(train_sizes)
    assert all(shape[-2] == shape[-1] for _, shape in seen)
    eval_sizes = [shape[-1] for training, shape in seen if not training]
    assert set(eval_sizes) == {32, 40, 48, 64}, "each stage's validation at its training size (issue #20)"
    assert history.val_px.fillna(64).tolist() == [32, 40, 48, 64], "the last validation at img_size"
    assert eval_sizes[-1] == 64, "the TTA prediction at img_size"
    assert json.loads((out / "config.json").read_text())["resize_start"] == 0.5


def test_on_by_default_and_an_explicit_zero_turns_it_off(single_label_dir, tmp_path, monkeypatch):
    from kernelkit.core.config import Config
    assert Config().resize_start == 0.5, "the default bench/bench_progressive.py chose"
    seen = _spy_inputs(monkeypatch)
    out = tmp_path / "off"
    assert main({}, [*TINY, "--data-dir", str(single_label_dir), "--epochs", "2", "--resize-start", "0",
                     "--out-dir", str(out)]) == 0
    assert "train_px" not in pd.read_csv(out / "history.csv")
    assert {shape[-1] for _, shape in seen} == {64}


def test_a_resumed_session_continues_at_the_size_of_its_progress(single_label_dir, tmp_path, monkeypatch):
    seen = _spy_inputs(monkeypatch)
    common = [*TINY, "--data-dir", str(single_label_dir), "--epochs", "4", "--resize-start", "0.5",
              "--sessions", "2"]
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    assert main({}, [*common, "--out-dir", str(s1)]) == 0
    assert pd.read_csv(s1 / "history.csv").train_px.tolist() == [32, 40]
    seen.clear()
    assert main({}, [*common, "--out-dir", str(s2), "--resume-from", str(s1 / "last.pt")]) == 0
    assert pd.read_csv(s2 / "history.csv").train_px.tolist() == [48, 64], "not back to the start size"
    assert [shape[-1] for training, shape in seen if training][0] == 48


@pytest.mark.parametrize("args,words", [(["--resize-start", "0.1"], "[0.25, 1)"),
                                        (["--resize-start", "1.0"], "[0.25, 1)"),
                                        (["--resize-full-at", "0"], "(0, 1]"),
                                        (["--resize-start", "0.5", "--resize-full-at", "1.5"], "(0, 1]")])
def test_bad_values_are_refused_at_start_with_the_allowed_range(single_label_dir, tmp_path, args, words,
                                                                 capsys, caplog):
    assert main({}, [*TINY, "--data-dir", str(single_label_dir), "--out-dir", str(tmp_path / "o"), *args]) == 2
    said = capsys.readouterr().err + capsys.readouterr().out + caplog.text
    assert words in said and args[-2].lstrip("-").replace("-", "_") in said
    assert not (tmp_path / "o" / "submission.csv").exists()


# ----------------------------------------------------------------------------- the planners
def test_autopick_counts_the_faster_early_stages(monkeypatch):
    import time
    from types import SimpleNamespace

    from kernelkit.build import autopick
    from kernelkit.core.config import Config
    timed: list[int] = []

    def measure(cand, cfg, num_classes, device, steps=3, deadline=0.0):
        timed.append(cand.img_size)
        return 4e6 / cand.img_size ** 2, 8e6 / cand.img_size ** 2  # the cost grows with the pixels

    monkeypatch.setattr(autopick, "measure", measure)
    shape = autopick.RunShape(n_train=1000, n_val=100, n_test=100, tta=1, budget_s=3600.0, margin_s=10.0)
    comp = SimpleNamespace(num_classes=3, train_paths=[])
    epochs = {}
    for start in (0.0, 0.5):
        cfg = Config(model="test_resnet", img_size=64, resize_start=start)
        _, trials = autopick.choose(cfg, comp, torch.device("cpu"), shape, time.time())
        epochs[start] = trials[0].epochs
    assert timed == [64, 64, 32], "with the option on, the smallest stage is timed too"
    assert epochs[0.5] > epochs[0.0] > 0


def test_dry_run_times_every_stage_and_plans_with_their_mix(single_label_dir, tmp_path, monkeypatch, caplog):
    seen = _spy_inputs(monkeypatch)
    caplog.set_level("INFO", logger="kernelkit")
    status = main({}, [*TINY, "--data-dir", str(single_label_dir), "--out-dir", str(tmp_path / "o"),
                       "--resize-start", "0.5", "--dry-run"])
    assert status in (0, 4)
    assert {shape[-1] for training, shape in seen if training} == {32, 40, 48, 64}
    assert "progressive resizing: 32 px until p=0.25" in caplog.text
    assert json.loads((tmp_path / "o" / "plan.json").read_text())["epochs_that_fit"] > 0


def test_a_fixed_size_vision_transformer_trains_at_full_size_with_a_warning(single_label_dir, caplog):
    import timm

    from kernelkit.engine.budget import BudgetClock, InferenceReserve
    from kernelkit.model.losses import get_loss
    from kernelkit.engine.trainer import FitOptions, Trainer, TrainParts
    from test_train import _setup
    comp, tl, _, _, _, _, scaler = _setup(single_label_dir, size=64)
    model = timm.create_model("test_vit", num_classes=comp.num_classes, dynamic_img_size=False, img_size=64)
    parts = TrainParts(model, torch.optim.AdamW(model.parameters(), lr=1e-3), scaler, get_loss("auto", comp.task))
    opts = FitOptions(epochs=1, resolution=ResolutionSchedule(64, 0.5))
    trainer = Trainer(parts, opts, BudgetClock(600), InferenceReserve(0, 0, 1), torch.device("cpu"))
    assert trainer.opts.resolution is None and opts.resolution is not None, "the caller's options untouched"
    result = trainer.fit(tl, None)
    assert result.stop_reason == "epochs" and "progressive resizing off" in caplog.text
