import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from test_kernel import _env, kernel_dir  # noqa: F401  (fixture)

from kernelkit.core import env
from kernelkit.model.factory import create_model

ROOT = Path(__file__).resolve().parents[1]
TIMM09 = ROOT / ".cache" / "timm09"


def test_offline_flag_is_set_before_timm_is_used():
    assert os.environ["HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pretrained_weights_from_a_local_file_get_a_new_head(tmp_path, suffix):
    torch.manual_seed(0)
    imagenet = timm.create_model("test_resnet", num_classes=1000)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(imagenet.state_dict(), path)
    else:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in imagenet.state_dict().items()}, str(path))
    model = create_model("test_resnet", 5, str(path))
    name, weight = next((n, p) for n, p in imagenet.named_parameters() if p.ndim == 4)
    torch.testing.assert_close(dict(model.named_parameters())[name], weight)
    assert model.get_classifier().out_features == 5


def test_model_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="attach the weights"):
        create_model("test_resnet", 3, str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="timm has no model 'resnet_999'"):
        create_model("resnet_999", 3)


def test_version_check_names_what_is_too_old():
    env.check_versions({"torch": "2.4.0+cu121", "timm": "0.9.16"})
    with pytest.raises(RuntimeError, match=r"timm 0.6.13 \(need >= 0.9\)"):
        env.check_versions({"torch": "2.4.0", "timm": "0.6.13"})


@pytest.mark.skipif(not (TIMM09 / "timm").is_dir(), reason="scripts/test.sh installs timm 0.9.16 in .cache/timm09")
def test_kernel_runs_with_timm_0_9(kernel_dir, tmp_path):  # noqa: F811
    env_vars = {**_env(), "PYTHONPATH": str(TIMM09)}
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "kernel.py", "--model", "resnet10t", "--img-size", "32",
                           "--demo-images", "100", "--epochs", "1", "--num-workers", "0", "--budget", "2m",
                           "--out-dir", str(out)], cwd=kernel_dir, env=env_vars, capture_output=True, text=True,
                          timeout=240)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0 and "timm 0.9.16" in proc.stdout
    assert (out / "submission.csv").is_file()


def test_heads_and_concatenated_backbones():
    from kernelkit.model.factory import FeatureHeadModel, build_model
    x = torch.randn(3, 3, 32, 32)
    plain = build_model("test_resnet", 4)
    assert not isinstance(plain, FeatureHeadModel) and plain(x).shape == (3, 4)
    mlp = build_model("test_resnet", 4, head="mlp", head_hidden=16)
    assert isinstance(mlp.head[0], torch.nn.BatchNorm1d) and mlp.head[1].out_features == 16
    both = build_model("test_resnet", 4, second_model="test_convnext")
    feats = sum(b.num_features for b in both.backbones)
    assert both.head[-1].in_features == feats and both(x).shape == (3, 4)
    with pytest.raises(ValueError, match="unknown head"):
        build_model("test_resnet", 4, head="attention")


def test_set_trainable_by_blocks():
    from kernelkit.model.factory import backbone_blocks, build_model, head_parameters, set_trainable
    model = build_model("test_resnet", 4)
    blocks = backbone_blocks(model)
    head = sum(p.numel() for p in head_parameters(model))
    assert set_trainable(model, 0) == head, "linear probe: only the head trains"
    last = sum(p.numel() for p in blocks[-1])
    assert set_trainable(model, 1) == head + last
    assert not any(p.requires_grad for p in blocks[0])
    assert set_trainable(model, None) == sum(p.numel() for p in model.parameters())


def test_layer_decay_scales_lower_blocks_down():
    from kernelkit.model.factory import build_model, create_optimizer
    opt = create_optimizer(build_model("test_resnet", 4), 1e-3, 0.05, layer_decay=0.5)
    scales = [g["lr_scale"] for g in opt.param_groups]
    assert scales == sorted(scales) and scales[-1] == 1.0 and scales[0] < 0.1
    no_decay = [g for g in opt.param_groups if g["weight_decay"] == 0]
    assert no_decay, "norms and biases get no weight decay"


def test_ema_decay_warms_up_so_short_runs_are_not_stuck_at_the_initial_weights():
    """With a fixed 0.999, 30 updates keep 97% of the random init: the helsinki14 preset (ema=0.999)
    validated and predicted at the label prior on short runs."""
    from kernelkit.model.factory import create_ema, ema_decay
    assert ema_decay(0.999, 0) == 0.1 and ema_decay(0.999, 10**6) == 0.999
    assert [round(ema_decay(0.999, n), 3) for n in (10, 100, 1000)] == [0.55, 0.918, 0.991]
    model = timm.create_model("test_resnet")
    ema = create_ema(model, 0.999)
    target = {n: p.detach() + 1.0 for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(target[n])
    for _ in range(30):
        ema.update(model)
    name = next(iter(target))
    gap = (dict(ema.module.named_parameters())[name] - target[name]).abs().max().item()
    assert gap < 0.05 and ema.updates == 30 and ema.decay == ema_decay(0.999, 29)
