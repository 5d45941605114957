"""Pretrained weights as Kaggle users attach them (a timm / HF folder, a Kaggle Model version), and the
model's own input statistics, from training through --mode infer."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from conftest import ROOT
from test_kernel import _env, kernel_dir  # noqa: F401  (fixture)

from kernelkit.core.config import ConfigError
from kernelkit.core.options import make_config
from kernelkit.core.weights import resolve_weights
from kernelkit.engine import evaluate as infer
from kernelkit.engine import trainer as train
from kernelkit.model.factory import create_model, preprocess_of

TIMM09 = ROOT / ".cache" / "timm09"
HALF = (0.5, 0.5, 0.5)


def timm_folder(path: Path, arch: str = "resnet10t", num_classes: int = 7, mean=HALF, std=HALF) -> Path:
    """What timm.models.save_for_hf writes, with a pretrained_cfg whose mean/std are not ImageNet's
    (resnet10t's own are; timm 0.9 has no test_* models)."""
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=num_classes)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": mean, "std": std, "interpolation": "bicubic"}
    timm.models.save_for_hf(model, str(path), safe_serialization=True)
    return path


def first_conv(model: torch.nn.Module) -> tuple[str, torch.Tensor]:
    return next((n, p.detach().clone()) for n, p in model.named_parameters() if p.ndim == 4)


def test_the_folder_is_what_save_for_hf_writes(tmp_path):
    folder = timm_folder(tmp_path / "w")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architecture"] == "resnet10t" and (folder / "model.safetensors").is_file()
    src = resolve_weights(folder)
    assert src.architecture == "resnet10t" and src.num_classes == 7 and src.file.name == "model.safetensors"
    assert src.overlay()["file"] == str(folder / "model.safetensors") and "hf_hub_id" not in src.overlay()


def test_a_kaggle_models_version_folder_is_found_below_the_model_folder(tmp_path):
    version = timm_folder(tmp_path / "test-resnet" / "pytorch" / "in1k" / "1")
    assert resolve_weights(tmp_path / "test-resnet").file == version / "model.safetensors"
    timm_folder(tmp_path / "test-resnet" / "pytorch" / "in1k" / "2")
    with pytest.raises(ValueError, match="several timm model folders"):
        resolve_weights(tmp_path / "test-resnet")


def test_folders_that_are_not_weights_are_refused_clearly(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json and no weights file"):
        resolve_weights(tmp_path / "empty")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "resnet.pth").write_bytes(b"x")
    assert resolve_weights(bare).file == bare / "resnet.pth" and resolve_weights(bare).architecture == ""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"hidden_size": 3}')  # a transformers config, not timm's
    (bad / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="no 'architecture' entry"):
        resolve_weights(bad)


def test_the_architecture_comes_from_config_json_and_a_mismatch_is_refused_at_start(tmp_path):
    folder = timm_folder(tmp_path / "w")
    cfg, _ = make_config({"pretrained_path": str(folder)}, [])  # model left at its default, auto
    assert cfg.model == "resnet10t"
    cfg, _ = make_config({"model": "", "pretrained_path": str(folder)}, [])
    assert cfg.model == "resnet10t"
    cfg, _ = make_config({"model": "resnet10t.some_tag", "pretrained_path": str(folder)}, [])
    assert cfg.model == "resnet10t.some_tag"
    with pytest.raises(ConfigError, match="holds 'resnet10t' weights .* model='resnet50'"):
        make_config({"model": "resnet50", "pretrained_path": str(folder)}, [])
    with pytest.raises(ConfigError, match="model is empty"):
        make_config({"model": ""}, [])
    with pytest.raises(ConfigError, match="does not exist"):
        make_config({"pretrained_path": str(tmp_path / "nope")}, [])


def test_weights_from_a_folder_load_with_a_new_head_and_bring_their_statistics(tmp_path):
    folder = timm_folder(tmp_path / "w")
    saved = timm.create_model("resnet10t", num_classes=7)
    saved.load_state_dict(__import__("safetensors.torch").torch.load_file(str(folder / "model.safetensors")))
    model = create_model("resnet10t", 3, str(folder))
    name, weight = first_conv(saved)
    torch.testing.assert_close(dict(model.named_parameters())[name], weight)
    assert model.get_classifier().out_features == 3
    pre = preprocess_of(model)
    assert pre.mean == HALF and pre.std == HALF and pre.interpolation == "bicubic"
    assert preprocess_of(timm.create_model("resnet10t")).mean == (0.485, 0.456, 0.406)  # the default differs


LOAD_ON_OLD_TIMM = """
import sys, torch, timm
sys.path.insert(0, {src!r})
from kernelkit.model.factory import create_model, preprocess_of
from kernelkit.core.options import make_config
cfg, _ = make_config({{"model": "", "pretrained_path": {folder!r}}}, [])
m = create_model(cfg.model, 3, cfg.pretrained_path)
ref = torch.load({ref!r})
name = next(n for n, p in m.named_parameters() if p.ndim == 4)
assert torch.equal(dict(m.named_parameters())[name].detach(), ref[name]), "weights not loaded"
assert m.get_classifier().out_features == 3
print("timm", timm.__version__, cfg.model, preprocess_of(m).mean)
"""


@pytest.mark.skipif(not (TIMM09 / "timm").is_dir(), reason="scripts/test.sh installs timm 0.9.16 in .cache/timm09")
def test_a_timm_folder_loads_on_timm_0_9(tmp_path):
    folder = timm_folder(tmp_path / "w")
    ref = tmp_path / "ref.pt"
    torch.save(dict(timm.create_model("resnet10t", num_classes=7, pretrained=True,
                                      pretrained_cfg_overlay=resolve_weights(folder).overlay()).state_dict()), ref)
    code = LOAD_ON_OLD_TIMM.format(src=str(ROOT / "src"), folder=str(folder), ref=str(ref))
    proc = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(TIMM09), "HF_HUB_OFFLINE": "1",
                                                               "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "timm 0.9.16 resnet10t (0.5, 0.5, 0.5)" in proc.stdout, proc.stdout


@pytest.mark.skipif(not (TIMM09 / "timm").is_dir(), reason="scripts/test.sh installs timm 0.9.16 in .cache/timm09")
def test_kernel_trains_from_a_timm_folder_with_no_model_on_timm_0_9(tmp_path, kernel_dir, single_label_dir):  # noqa: F811
    folder = timm_folder(tmp_path / "w")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "kernel.py", "--data-dir", str(single_label_dir),
                           "--pretrained-path", str(folder), "--img-size", "32", "--epochs", "1", "--num-workers", "0",
                           "--budget", "2m", "--out-dir", str(out)], cwd=kernel_dir,
                          env={**_env(), "PYTHONPATH": str(TIMM09)}, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "timm 0.9.16" in proc.stdout and "loaded pretrained weights from" in proc.stdout
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert ckpt["config"]["model"] == "resnet10t" and ckpt["preprocess"]["mean"] == list(HALF)
    assert (out / "submission.csv").is_file() and (out / "model" / "config.json").is_file()


def test_training_and_infer_normalise_with_the_weights_statistics(tmp_path, single_label_dir, monkeypatch):
    """pretrained_path = a timm folder with mean/std 0.5 and no model: the run builds the folder's
    architecture, normalises every training, validation, weight-average (BatchNorm pass and its
    validation) and test batch with 0.5, stores it in the checkpoint, and --mode infer uses it too."""
    from kernelkit.app.cli import main
    from kernelkit.engine import swa
    seen = []

    def spy(batch, channels_last, pre):
        seen.append(pre.mean)
        return real(batch, channels_last, pre)

    real = train.normalize
    monkeypatch.setattr(train, "normalize", spy)
    monkeypatch.setattr(infer, "normalize", spy)
    monkeypatch.setattr(swa, "normalize", spy)
    folder = timm_folder(tmp_path / "weights")
    out = tmp_path / "out"
    common = ["--data-dir", str(single_label_dir), "--num-workers", "0", "--img-size", "32", "--budget", "2m"]
    assert main({}, [*common, "--model", "", "--pretrained-path", str(folder), "--epochs", "2", "--swa", "0.75",
                     "--batch-size", "8", "--out-dir", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["swa"], "the weight average was concluded"
    assert seen and set(seen) == {HALF}, set(seen)
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert ckpt["config"]["model"] == "resnet10t" and ckpt["preprocess"]["mean"] == list(HALF)
    seen.clear()
    assert main({}, [*common, "--mode", "infer", "--checkpoints", str(out / "best.pt"),
                     "--out-dir", str(tmp_path / "infer")]) == 0
    assert seen and set(seen) == {HALF}
    assert (tmp_path / "infer" / "submission.csv").is_file()
