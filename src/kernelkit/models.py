"""timm models by name; pretrained weights only ever from a local file."""
from __future__ import annotations

import logging
from pathlib import Path

from . import env  # noqa: F401  (sets HF_HUB_OFFLINE before timm is imported)
import timm
import torch

log = logging.getLogger("kernelkit")


def create_model(name: str, num_classes: int, pretrained_path: str = "", drop_rate: float = 0.0) -> torch.nn.Module:
    """Build `name` with a fresh `num_classes` head.

    With `pretrained_path`, timm loads that file through `pretrained_cfg_overlay` and drops the
    classifier when its size differs, so ImageNet weights give a new head for our classes.
    """
    if name not in timm.list_models() and not timm.is_model(name):
        raise ValueError(f"timm has no model {name!r} (timm {timm.__version__})")
    kwargs = dict(num_classes=num_classes, drop_rate=drop_rate)
    if pretrained_path:
        path = Path(pretrained_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"pretrained_path {path} not found; attach the weights as a Kaggle dataset and point to the file")
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
        log.info("loaded pretrained weights from %s", path)
    else:
        model = timm.create_model(name, pretrained=False, **kwargs)
    return model
