"""Fine-tuning from weights: the recipe the options left unset take, the input size autopick allows a
pretrained net, and attached weights found on Kaggle without being told (issue #20 items 1 and 4)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import ROOT, make_single_label_csv

from kernelkit.build import autopick
from kernelkit.build.components import build_loss, label_smoothing
from kernelkit.core.config import Config, ConfigError
from kernelkit.core.options import FINETUNE, make_config
from kernelkit.core.weights import find_weights_folders


def timm_folder(path: Path, arch: str = "test_resnet", input_size: int = 160) -> Path:
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=5)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, input_size, input_size)}
    timm.models.save_for_hf(model, str(path), safe_serialization=True)
    return path


def test_weights_bring_the_recipe_for_what_is_unset_and_the_user_wins(tmp_path):
    folder = timm_folder(tmp_path / "w")
    scratch, _ = make_config({}, [])
    tuned, _ = make_config({}, ["--pretrained-path", str(folder)])
    assert tuned.model == "test_resnet"
    for key, value in FINETUNE.items():
        assert getattr(tuned, key) == value != getattr(scratch, key), key
    mine, _ = make_config({"resize_start": 0.5}, ["--pretrained-path", str(folder), "--schedule", "linear"])
    assert mine.resize_start == 0.5 and mine.schedule == "linear" and mine.auto_min_epochs == FINETUNE["auto_min_epochs"]
    off, _ = make_config({}, ["--pretrained-path", "none"])
    assert off.pretrained_path == "none" and off.model == "auto" and off.resize_start == scratch.resize_start


def test_a_preset_keeps_its_values_but_the_users_folder_names_the_model(tmp_path):
    folder = timm_folder(tmp_path / "w")
    cfg, _ = make_config({}, ["--preset", "helsinki14", "--pretrained-path", str(folder), "--model2", ""])
    assert cfg.model == "test_resnet" and cfg.lr == 1e-3 and cfg.img_size == 128  # the preset's own
    with pytest.raises(ConfigError, match="holds 'test_resnet' weights"):  # a model the user named is kept
        make_config({}, ["--preset", "helsinki14", "--pretrained-path", str(folder), "--model", "resnet50",
                         "--model2", ""])


def test_label_smoothing_is_on_for_single_label_fine_tunes_only(tmp_path):
    folder = str(timm_folder(tmp_path / "w"))
    assert label_smoothing(Config(pretrained_path=folder), "multiclass") == 0.1
    assert label_smoothing(Config(pretrained_path=folder), "multilabel") == 0.0
    assert label_smoothing(Config(), "multiclass") == 0.0
    assert label_smoothing(Config(pretrained_path=folder, label_smoothing=0.0), "multiclass") == 0.0
    logits, y, ok = torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([0]), torch.ones(1)
    plain = build_loss(Config(), "multiclass", np.array([0, 1, 2]), 3)(logits, y, ok)
    smooth = build_loss(Config(pretrained_path=folder), "multiclass", np.array([0, 1, 2]), 3)(logits, y, ok)
    assert smooth > plain  # a confident right answer costs more with smoothing
    explicit = build_loss(Config(pretrained_path=folder, loss_args="label_smoothing=0.0"), "multiclass",
                          np.array([0, 1, 2]), 3)(logits, y, ok)
    assert torch.isclose(explicit, plain)


def test_a_pretrained_net_is_never_shrunk_to_tiny_inputs():
    scratch = autopick.ladder("cpu", 32, "test_resnet")
    assert [c.img_size for c in scratch] == [32]  # 32 px digits train at 32 from scratch
    tuned = autopick.ladder("cpu", 32, "test_resnet", weights_size=224)
    # thumbnails: from a quarter of the weights' size, in half-steps: one net's sizes are the only cost steps
    assert [c.img_size for c in tuned] == [64, 80, 96, 112, 128, 144, 160, 192, 224]
    strips = autopick.ladder("cpu", 144, "test_resnet", weights_size=224)
    assert [c.img_size for c in strips] == [128, 144, 160, 192, 224], "larger frames: from the fine-tune floor"
    assert autopick.ladder("cpu", 64, "test_resnet", weights_size=224)[0].img_size == 64, "64 px: 2x at 128"
    assert autopick.ladder("cpu", 65, "test_resnet", weights_size=224)[0].img_size == 128
    costs = [c.cost for c in tuned]
    assert max(b / a for a, b in zip(costs, costs[1:])) < 1.6
    big = autopick.ladder("cuda", 500, "test_resnet", weights_size=224)
    assert min(c.img_size for c in big) == 128 and max(c.img_size for c in big) == 320
    large_weights = autopick.ladder("cpu", 32, "test_resnet", weights_size=800)
    assert [c.img_size for c in large_weights] == [224], "a quarter of 800 px is above the CPU ladder: its top"
    assert autopick.ladder("cpu", 32, "test_resnet", img_size=48, weights_size=224)[0].img_size == 48  # explicit


@pytest.mark.parametrize("settings,weights_px,epochs,says", [
    ([], 160, 2.0, "fewer, at the smallest size this fine-tune takes"),  # ladder 64 ... 160: at its floor
    ([], 64, 2.0, "fewer, at the smallest size this fine-tune takes"),   # one rung (64 px), still its floor
    ([], 160, 0.5, "WARNING: none measured fits"),                       # under one epoch, whatever the size
    (["--img-size", "128"], 160, 2.0, "WARNING: none measured fits"),    # the size the user set: too slow
    (["--model", "test_resnet"], 0, 2.0, "WARNING: none measured fits"),  # from scratch, nothing fits
])
def test_a_too_slow_pick_is_a_warning_except_at_a_fine_tunes_smallest_size(tmp_path, single_label_dir, monkeypatch,
                                                                         caplog, settings, weights_px, epochs, says):
    """Where nothing fits the epochs wanted, a fine-tune at the smallest size it takes has chosen fewer epochs
    over a smaller input, and says so; an explicit size, a from-scratch ladder that fits nothing, or under one
    epoch warns."""
    import time

    from kernelkit.core.context import RunContext
    from kernelkit.core.distributed import DistInfo
    from kernelkit.inputs.competition import load_competition
    monkeypatch.setattr(autopick, "measure", lambda *a, **k: (1.0, 2.0))
    monkeypatch.setattr(autopick, "stage_throughput", lambda *a, **k: None)
    monkeypatch.setattr(autopick.RunShape, "epochs", lambda self, *a: epochs)  # every size: fewer than 4 (10)
    weights = ["--pretrained-path", str(timm_folder(tmp_path / "w", input_size=weights_px))] if weights_px else []
    cfg, _ = make_config({}, [*weights, *settings, "--budget", "2m"])
    comp = load_competition(single_label_dir)
    ctx = RunContext(cfg, None, single_label_dir, tmp_path, False, time.time())
    with caplog.at_level("INFO", logger="kernelkit"):
        autopick._measured_choice(cfg, comp, DistInfo(), autopick.RunShape.of(cfg, comp), ctx, False, ())
    verdict = next(line for line in caplog.text.splitlines() if "autopick: chose" in line)
    assert says in verdict
    assert ("WARNING" in verdict) == says.startswith("WARNING")


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_weights_trained_below_the_fine_tune_floor_still_get_a_ladder(device_type):
    """Hostile input: weights trained at 64 px on 32 px images. A GPU's floor (128 px) lay above the
    ladder's top (the weights' size), which left no candidate at all; the weights' own size caps it."""
    small = autopick.ladder(device_type, 32, "test_resnet", weights_size=64)
    assert [c.img_size for c in small] == [64]
    photos = autopick.ladder(device_type, 500, "test_resnet", weights_size=64)
    assert min(c.img_size for c in photos) == autopick.SIZE_FLOOR[device_type], "large images keep the device's floor"


def test_a_fine_tune_times_the_same_pixels_per_step_at_every_rung():
    """A step's fixed cost weighs on 8 small images more than on 8 large ones, which made the small rungs
    of a fine-tune's ladder look slower than they train; from scratch the ladder keeps its 8 images."""
    n = {px: autopick.cpu_timed_images(px, 1, 32, fine_tune=True) for px in (64, 96, 128, 160, 224)}
    assert n[64] == 32 and n[160] == n[224] == autopick.CPU_TIMED_BATCH  # capped by the batch; never below 8
    assert n[64] >= n[96] > n[128] > n[160]
    assert n[96] * 96 ** 2 >= autopick.CPU_TIMED_PIXELS > (n[96] - 1) * 96 ** 2
    assert autopick.cpu_timed_images(64, 3, 32, fine_tune=True) == 17  # 51 squares: each image is its tiles
    assert autopick.cpu_timed_images(96, 3, 32, fine_tune=True) == autopick.CPU_TIMED_BATCH  # 24 squares already
    assert autopick.cpu_timed_images(64, 1, 32, fine_tune=False) == autopick.CPU_TIMED_BATCH
    assert autopick.cpu_timed_images(64, 1, 4, fine_tune=True) == 4  # a small batch is timed as it is


def test_measure_times_a_fine_tune_at_its_pixel_batch(tmp_path, monkeypatch):
    """measure() feeds the network the images cpu_timed_images asks for (a hook on the forward pass)."""
    from kernelkit.build import components
    folder = str(timm_folder(tmp_path / "w"))
    seen, build = [], components.model_from_config

    def hooked(*args, **kwargs):
        model = build(*args, **kwargs)
        model.register_forward_pre_hook(lambda _m, inputs: seen.append((model.training, len(inputs[0]))))
        return model

    monkeypatch.setattr(components, "model_from_config", hooked)
    plain, cpu = Config(model="test_resnet", batch_size=32), torch.device("cpu")
    runs = [(Config(model="test_resnet", pretrained_path=folder, batch_size=32), ""),
            (plain, ""),
            (plain, folder),  # one of several attached folders: the candidate carries the weights
            (Config(model="test_resnet", pretrained_path=folder, batch_size=32, input_mode="tiles", tiles=3), "")]
    for cfg, weights in runs:
        autopick.measure(autopick.Candidate("test_resnet", 64, 1.0, weights), cfg, 3, cpu, steps=1)
    trained = [n for training, n in seen if training][1::2]  # each run: a warm-up and one timed step
    assert trained == [32, autopick.CPU_TIMED_BATCH, 32, 17 * 3]


def test_the_weights_input_size_comes_from_their_config(tmp_path):
    assert autopick.weights_input_size(str(timm_folder(tmp_path / "w", input_size=160))) == 160
    assert autopick.weights_input_size("") == 0 and autopick.weights_input_size("none") == 0


def kaggle_tree(root: Path) -> Path:
    make_single_label_csv(root / "competitions" / "shapes", n_train=24, n_test=6)
    return root


def test_weights_folders_are_found_where_kaggle_mounts_them(tmp_path):
    root = kaggle_tree(tmp_path / "input")
    model = timm_folder(root / "models" / "alice" / "lite" / "pytorch" / "default" / "1")
    dataset = timm_folder(root / "datasets" / "bob" / "timm-weights" / "resnet")
    hf = root / "datasets" / "carol" / "bert"
    hf.mkdir(parents=True)
    (hf / "config.json").write_text('{"hidden_size": 8}')  # a transformers model: not timm weights
    (hf / "model.safetensors").write_bytes(b"")
    assert find_weights_folders(root) == sorted([model, dataset])
    assert find_weights_folders(root, skip=root / "models") == [dataset]


def run_on_kaggle(tmp_path: Path, root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KERNELKIT_INPUT_ROOT": str(root), "KAGGLE_KERNEL_RUN_TYPE": "Batch",
           "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, str(ROOT / "kernel.py"), "--out-dir", str(tmp_path / "out"),
                           "--epochs", "1", "--img-size", "32", "--num-workers", "0", "--budget", "2m", *args],
                          env=env, capture_output=True, text=True, timeout=240)


def first_lines(proc: subprocess.CompletedProcess, n: int = 3) -> str:
    return "\n".join((proc.stdout + proc.stderr).splitlines()[:n])


def test_on_kaggle_one_attached_weights_folder_is_fine_tuned_and_named_first(tmp_path):
    root = kaggle_tree(tmp_path / "input")
    folder = timm_folder(root / "models" / "alice" / "test-resnet" / "pytorch" / "default" / "1")
    proc = run_on_kaggle(tmp_path, root)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    head = first_lines(proc)
    assert f"found attached timm weights {folder}" in head and "test_resnet" in head, head
    assert "loaded pretrained weights from" in proc.stdout + proc.stderr
    off = run_on_kaggle(tmp_path, root, "--pretrained-path", "none", "--model", "test_resnet")
    assert off.returncode == 0 and "loaded pretrained weights" not in off.stdout + off.stderr
    assert "found attached" not in first_lines(off)


def test_on_kaggle_no_weights_says_they_would_help(tmp_path):
    root = kaggle_tree(tmp_path / "input")
    proc = run_on_kaggle(tmp_path, root, "--model", "auto", "--dry-run")
    head = first_lines(proc)
    assert "none found among the attached inputs" in head and "would help" in head, head


def test_several_attached_folders_share_one_ladder_and_the_choice_names_its_folder(tmp_path):
    a = timm_folder(tmp_path / "a", "test_resnet", input_size=160)
    b = timm_folder(tmp_path / "b", "test_convnext", input_size=224)
    cfg, _ = make_config({}, ["--pretrained-path", str(a)])
    cands = autopick.candidates(cfg, "cpu", 64, (a, b))
    assert {(c.model, c.weights) for c in cands} == {("test_resnet", str(a)), ("test_convnext", str(b))}
    assert max(c.img_size for c in cands if c.weights == str(a)) == 160
    assert max(c.img_size for c in cands if c.weights == str(b)) == 224
    assert [c.cost for c in cands] == sorted(c.cost for c in cands)
    assert "(b)" in str(next(c for c in cands if c.weights == str(b)))
    assert all(not c.weights for c in autopick.candidates(cfg, "cpu", 64, (a,)))  # one: the config's own
