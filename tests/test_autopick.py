"""Issue 13: model/img_size 'auto' pick what fits the budget here; a model that does not learn is flagged."""
import json
import os
import time

import pytest
import torch
from conftest import TINY_AUTO

from kernelkit.build import autopick
from kernelkit.build.autopick import Candidate, ladder, pick
from kernelkit.core.config import Config, ConfigError
from kernelkit.core.options import make_config
from kernelkit.engine.budget import InferenceReserve
from kernelkit.engine.checkpoint import load_checkpoint
from kernelkit.engine.learning_check import at_prior, likely_causes

SMALL = [*TINY_AUTO, "--tta", "1"]


def speeds_ladder():
    return [Candidate(f"m{i}", 32, float(i + 1)) for i in range(9)]


def test_pick_takes_the_costliest_candidate_that_fits_with_few_measurements():
    cands = speeds_ladder()
    epochs = {c: 100.0 / c.cost for c in cands}  # 100, 50, 33, 25, 20, 16.7, 14.3, 12.5, 11.1
    calls = []

    def measured(c):
        calls.append(c)
        return epochs[c]

    choice, seen = pick(cands, measured, need=20)
    assert choice == cands[4], "m4 gets exactly 20 epochs; m5 only 16.7"
    assert len(calls) <= 4 and len(set(calls)) == len(calls), "binary search, each candidate timed once"
    assert all(seen[c] == epochs[c] for c in calls)
    assert pick(cands, measured, need=5)[0] == cands[-1], "everything fits: the largest"


def test_pick_falls_back_to_the_cheapest_and_counts_failures_as_too_slow():
    cands = speeds_ladder()
    choice, seen = pick(cands, lambda c: 1.0, need=10)
    assert choice == cands[0] and cands[0] in seen, "nothing fits: the cheapest, measured so it can be logged"
    choice, seen = pick(cands, lambda c: 9.0 if c == cands[4] else 1.0, need=10)
    assert choice == cands[4], "nothing fits, and the nominally cheapest is not the fastest: the most epochs wins"
    failing = {cands[4], cands[6]}  # out of memory, say: -1 epochs
    choice, _ = pick(cands, lambda c: -1.0 if c in failing else 30.0, need=10)
    assert choice not in failing and choice.cost < 5


def test_ladder_never_upscales_past_the_native_size_and_explicit_settings_pin_an_axis():
    digits = ladder("cpu", 28)
    assert {c.img_size for c in digits} == {32}, "28 px digits train at 32, not 224"
    assert [c.cost for c in digits] == sorted(c.cost for c in digits)
    photos = ladder("cuda", 600)
    assert max(c.img_size for c in photos) == 320 and min(c.img_size for c in photos) >= 128
    assert {c.model for c in photos} >= {"resnet50", "convnext_tiny"}
    assert {c.img_size for c in ladder("cpu", 150)} == {64, 96, 128, 160}
    pinned = ladder("cpu", 150, model="resnet18")
    assert {c.model for c in pinned} == {"resnet18"} and len(pinned) == 4
    assert [(c.model, c.img_size) for c in ladder("cuda", 600, img_size=224)] == [
        ("resnet18", 224), ("resnet34", 224), ("resnet50", 224), ("convnext_tiny", 224)]


def test_the_native_size_is_the_median_long_side_of_each_image_in_either_orientation(tmp_path):
    """Hostile input: strips in both orientations (96 x 32 and 32 x 96). The larger of the median width and
    the median height is 64 there, which capped a from-scratch ladder at 64 px on images 96 px long."""
    from PIL import Image
    paths = []
    for i in range(10):
        size = (96, 32) if i % 2 else (32, 96)
        Image.new("RGB", size).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    assert autopick.native_size(paths) == 96
    assert autopick.native_size(paths, short=True) == 32
    assert max(c.img_size for c in ladder("cpu", autopick.native_size(paths))) == 96


def test_epoch_estimate_charges_setup_and_inference():
    shape = autopick.RunShape(n_train=900, n_val=100, n_test=200, tta=2, budget_s=300, margin_s=8)
    fast = shape.epochs(train_ips=300, infer_ips=900, setup_s=20, pipeline=1.0)
    reserve = InferenceReserve.measured(n_test=200, n_val=100, tta=2, images_per_s=900, startup_s=3.0)
    assert reserve.seconds() == pytest.approx(2.5 + 2 * 3.0 + 1.3 * 500 / 900), "overhead, 2 loaders, the views"
    assert fast == pytest.approx((300 - 8 - 20 - reserve.seconds()) / (3 + 100 / 900)), "the live run's reserve"
    assert shape.epochs(150, 900, 20, 1.0) < fast and shape.epochs(300, 900, 100, 1.0) < fast
    assert autopick.RunShape(900, 100, 200, 2, 300, 8, world_size=2).epochs(150, 900, 20, 1.0) > \
        shape.epochs(150, 900, 20, 1.0), "data-parallel ranks share the epoch"


def test_config_auto_defaults_and_explicit_values():
    cfg = Config()
    assert (cfg.model, cfg.img_size, cfg.auto_min_epochs) == ("auto", 0, 10)
    explicit, _ = make_config({"img_size": 224}, ["--model", "resnet18"])
    assert (explicit.model, explicit.img_size) == ("resnet18", 224)
    assert make_config({"img_size": "auto"}, [])[0].img_size == 0
    assert make_config({}, ["--img-size", "auto"])[0].img_size == 0
    with pytest.raises(ConfigError, match="img_size=4"):
        make_config({}, ["--img-size", "4"])
    with pytest.raises(ConfigError, match="auto_min_epochs"):
        make_config({"auto_min_epochs": 0}, [])


def test_pretrained_weights_need_a_named_model(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    with pytest.raises(ConfigError, match="pretrained_path"):
        make_config({"pretrained_path": str(weights)}, [])
    assert make_config({"pretrained_path": str(weights), "model": "resnet50"}, [])[0].model == "resnet50"


def test_measure_gives_positive_speeds_for_a_tiny_model():
    cfg = Config(model="test_resnet", img_size=32, batch_size=4, channels_last=False)
    train_ips, infer_ips = autopick.measure(Candidate("test_resnet", 32, 0.01), cfg, 3, torch.device("cpu"), steps=1)
    assert train_ips > 0 and infer_ips > 0


def test_auto_run_logs_its_choice_and_stores_concrete_values(tmp_path, single_label_dir, tiny_ladder, caplog):
    from kernelkit.app.cli import main
    out = tmp_path / "out"
    caplog.set_level("INFO", logger="kernelkit")
    status = main({}, [*SMALL, "--data-dir", str(single_label_dir), "--out-dir", str(out), "--budget", "40s",
                       "--epochs", "2", "--auto-min-epochs", "2"])
    assert status == 0 and (out / "submission.csv").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] in ("test_resnet", "test_convnext")
    assert summary["img_size"] == 48, "40x32 images: the first ladder size that reaches 40 px, no larger"
    assert "autopick: chose" in caplog.text and "img/s train" in caplog.text
    stored = load_checkpoint(out / "best.pt")["config"]
    assert (stored["model"], stored["img_size"]) == (summary["model"], 48), "infer and resume rebuild this"
    assert json.loads((out / "config.json").read_text())["model"] == summary["model"]


def test_explicit_model_and_size_are_not_measured(tmp_path, single_label_dir, tiny_ladder, caplog):
    from kernelkit.app.cli import main
    caplog.set_level("INFO", logger="kernelkit")
    status = main({}, [*SMALL, "--data-dir", str(single_label_dir), "--out-dir", str(tmp_path / "o"),
                       "--budget", "40s", "--epochs", "1", "--model", "test_resnet", "--img-size", "32"])
    assert status == 0 and "autopick" not in caplog.text


def test_learning_check_threshold_and_hints():
    assert at_prior(0.12, 0.10) and not at_prior(0.30, 0.10)
    assert at_prior(0.76, 0.75) and not at_prior(0.80, 0.75)
    assert "pretrained_path is empty" in likely_causes(Config(preset="imet2019"))
    assert "lr=0.5" in likely_causes(Config(lr=0.5))


@pytest.mark.parametrize("lr,warned", [(1e-9, True), (3e-3, False)])
def test_a_model_stuck_at_the_prior_is_flagged_and_still_submits(tmp_path, single_label_dir, lr, warned):
    from kernelkit.app.cli import main
    out = tmp_path / "out"
    status = main({}, [*SMALL, "--data-dir", str(single_label_dir), "--out-dir", str(out), "--budget", "40s",
                       "--epochs", "4", "--model", "test_resnet", "--img-size", "32", "--lr", str(lr),
                       "--val-fraction", "0.3"])
    assert status == 0 and (out / "submission.csv").is_file()
    summary = json.loads((out / "summary.json").read_text())
    flagged = [w for w in summary["warnings"] if "label prior" in w]
    assert bool(flagged) == warned, summary
    assert summary["epochs"] == 4, "the warning does not stop training"


def test_dry_run_prints_every_rung_of_the_ladder(tmp_path, single_label_dir, tiny_ladder, caplog):
    from kernelkit.app.cli import main
    caplog.set_level("INFO", logger="kernelkit")
    status = main({}, [*SMALL, "--data-dir", str(single_label_dir), "--out-dir", str(tmp_path / "o"),
                       "--budget", "10m", "--dry-run"])
    assert status in (0, 4)
    table = caplog.text.split("autopick: ladder", 1)[1]
    for model in ("test_resnet", "test_convnext"):
        assert f"{model} @ 48 px" in table
    plan = json.loads((tmp_path / "o" / "plan.json").read_text())
    assert plan["epochs_that_fit"] > 0


def test_a_resumed_auto_run_keeps_the_model_its_checkpoint_was_trained_with(tmp_path, single_label_dir,
                                                                            tiny_ladder, monkeypatch):
    from kernelkit.app.cli import main
    # two sessions of one 2-epoch schedule: the second resumes the first's checkpoint. The epochs end
    # each session; the budget only has to be long enough that a busy machine does not cut one short.
    common = [*SMALL, "--data-dir", str(single_label_dir), "--budget", "2m", "--auto-min-epochs", "1",
              "--sessions", "2", "--epochs", "2"]
    first = tmp_path / "first"
    assert main({}, [*common, "--out-dir", str(first)]) == 0
    picked = json.loads((first / "summary.json").read_text())["model"]
    other = "test_convnext" if picked == "test_resnet" else "test_resnet"
    monkeypatch.setattr(autopick, "CPU_MODELS", ((other, 0.01),))  # a fresh pick could only choose `other`
    second = tmp_path / "second"
    assert main({}, [*common, "--out-dir", str(second), "--resume-from", str(first / "last.pt")]) == 0
    summary = json.loads((second / "summary.json").read_text())
    assert summary["model"] == picked and summary["epochs"] == 1, "one more epoch on the same network"


def test_autopick_tunes_and_seeds_the_device_before_it_measures(monkeypatch, tmp_path, single_label_dir):
    """Measured before accel.tune (no cudnn.benchmark, plain AdamW) it picked smaller than it could; and
    under `deterministic` CUBLAS_WORKSPACE_CONFIG set after cuBLAS started is ignored."""
    from kernelkit.build import components
    from kernelkit.core import accel
    from kernelkit.inputs.competition import load_competition
    events = []
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"})
    monkeypatch.setattr(accel, "tune", lambda device, deterministic: events.append(("tune", deterministic)))
    real_seed = components.seed_everything

    def seed(s, deterministic=False):
        real_seed(s, deterministic)
        events.append(("seed", os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
    monkeypatch.setattr(components, "seed_everything", seed)

    def measure(cand, cfg, num_classes, device, steps=3, deadline=0.0):
        events.append(("measure", cand.model))
        return 100.0, 200.0
    monkeypatch.setattr(autopick, "measure", measure)
    monkeypatch.setattr(autopick, "stage_throughput", lambda *a, **k: None)
    cfg = Config(model="auto", img_size=32, deterministic=True)
    comp = load_competition(single_label_dir)
    autopick.choose(cfg, comp, torch.device("cpu"), autopick.RunShape.of(cfg, comp), time.time())
    kinds = [e[0] for e in events]
    assert "measure" in kinds and kinds.index("seed") < kinds.index("measure") and kinds.index("tune") < kinds.index("measure")
    assert ("seed", ":4096:8") in events and ("tune", True) in events
    torch.use_deterministic_algorithms(False)


def test_measure_steps_the_optimizer_training_uses(monkeypatch):
    from kernelkit.model import factory
    made = []
    real = factory.create_optimizer
    monkeypatch.setattr(factory, "create_optimizer", lambda *a, **k: made.append(a) or real(*a, **k))
    cfg = Config(model="test_resnet", img_size=32, batch_size=4)
    autopick.measure(Candidate("test_resnet", 32, 0.01), cfg, 3, torch.device("cpu"), steps=1)
    assert len(made) == 1


@pytest.mark.parametrize("mode,tiles", [("pad", 1), ("tiles", 3)])
def test_measure_times_each_image_as_its_tiles_and_reports_images_per_second(monkeypatch, mode, tiles):
    """Tiles mode: the timed batch holds every tile of its images, as training's does, and the rates
    are per image. A fake clock that advances 1 ms per square makes the rates exact."""
    from kernelkit.build import components
    clock, seen = [0.0], []

    class Squares(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, x):
            seen.append(len(x))
            clock[0] += 0.001 * len(x)
            return x.mean((1, 2, 3))[:, None].repeat(1, 3) * self.w

    monkeypatch.setattr(components, "model_from_config", lambda *a, **k: Squares())
    monkeypatch.setattr(autopick, "_now", lambda device: clock[0])
    cfg = Config(model="test_resnet", img_size=16, batch_size=4, channels_last=False, input_mode=mode, tiles=tiles)
    train_ips, infer_ips = autopick.measure(Candidate("test_resnet", 16, 0.01), cfg, 3, torch.device("cpu"), steps=1)
    assert set(seen) == {4 * tiles, 8 * tiles}, "training batches of 4 images, inference of 8, each as its tiles"
    assert train_ips == pytest.approx(1000 / tiles) and infer_ips == pytest.approx(1000 / tiles)
