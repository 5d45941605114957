"""aug=auto: flip for thumbnails (images enlarged 2x or more to img_size), light otherwise; an explicit
level always wins, and what was chosen is logged, saved in config.json and in the checkpoints."""
import json
import logging

import pytest
import torch

from kernelkit.build.augmentation import choose_augmentation
from kernelkit.build.autopick import THUMBNAIL_UPSCALE
from kernelkit.core.checks import checked_config
from kernelkit.core.config import ConfigError


def sizes(short: float, long: float) -> dict:
    return {"short_side_median": short, "long_side_median": long}


@pytest.mark.parametrize("frame,img_size,tiles,want", [
    (sizes(32, 32), 160, 0, "flip"),  # 32 px digits fine-tuned at 160 px: 5x
    (sizes(32, 40), 96, 0, "flip"),  # pad: the long side is what reaches img_size (2.4x)
    (sizes(32, 40), 64, 0, "light"),  # 1.6x
    (sizes(32, 32), 32, 0, "light"),  # from scratch at the images' own size
    (sizes(64, 200), 160, 0, "light"),  # iMet-like strips padded into a square: shrunk
    (sizes(64, 200), 96, 3, "light"),  # the same strips as tiles: the short side at 96 px (1.5x)
    (sizes(40, 200), 96, 3, "flip"),  # tiles of 40 px squares at 96 px (2.4x)
    ({}, 160, 0, "light"),  # no readable header: the default
])
def test_auto_takes_flip_only_where_the_images_are_enlarged_at_least_twice(frame, img_size, tiles, want):
    aug, why = choose_augmentation("auto", frame, img_size, tiles)
    assert aug == want, why
    if frame:  # the reason names the enlargement it was decided on
        side = frame["short_side_median"] if tiles else frame["long_side_median"]
        assert f"({img_size / side:.1f}x)" in why or f"{img_size / side:.1f}x to" in why
        assert (img_size / side >= THUMBNAIL_UPSCALE) == ("thumbnails" in why)


@pytest.mark.parametrize("explicit", ["none", "flip", "light", "medium", "strong"])
def test_an_explicit_level_is_kept_whatever_the_images(explicit):
    assert choose_augmentation(explicit, sizes(8, 8), 224)[0] == explicit
    assert choose_augmentation(explicit, sizes(2000, 3000), 224)[0] == explicit


def test_aug_values_are_checked_at_start():
    assert checked_config({}).aug == "auto"
    with pytest.raises(ConfigError, match="aug"):
        checked_config({"aug": "crop"})


@pytest.mark.parametrize("args,want,auto", [
    (["--img-size", "96"], "flip", True),  # 40 x 32 images at 96 px: thumbnails
    (["--img-size", "32"], "light", True),  # at their own size
    (["--img-size", "96", "--aug", "light"], "light", False),  # the user's choice wins, no auto line
])
def test_the_choice_is_logged_saved_and_used_end_to_end(args, want, auto, single_label_dir, tmp_path, caplog):
    from kernelkit.app.cli import main
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="kernelkit"):
        assert main({}, ["--model", "test_resnet", "--batch-size", "8", "--num-workers", "0", "--epochs", "1",
                         "--budget", "10m", "--data-dir", str(single_label_dir), "--out-dir", str(out), *args]) == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("augmentation: ")]
    assert bool(lines) == auto and all(f"augmentation: {want} (aug=auto)" in ln for ln in lines)
    assert json.loads((out / "config.json").read_text())["aug"] == want
    ckpt = torch.load(out / "best.pt", map_location="cpu", weights_only=False)
    assert ckpt["config"]["aug"] == want, "the checkpoint keeps the resolved level"


def test_building_the_data_directly_resolves_auto_the_same_way(single_label_dir):
    from kernelkit.build.assemble import build_training_data
    from kernelkit.inputs.competition import load_competition
    comp = load_competition(single_label_dir)
    for img_size, want in ((96, "flip"), (32, "light")):
        cfg = checked_config({"data_dir": str(single_label_dir), "img_size": img_size, "num_workers": 0,
                              "cache_images": False, "model": "test_resnet"})
        data = build_training_data(cfg, comp, torch.device("cpu"))
        assert data.train_loader.dataset.transform.aug == want


def test_input_mode_and_aug_auto_read_the_image_headers_once(single_label_dir, tmp_path, monkeypatch):
    """Both choices come from the same sample of headers; on Kaggle's mounted inputs each read of
    500 headers costs seconds, so aug auto takes the statistics input_mode auto read."""
    from kernelkit.app.cli import main
    from kernelkit.build import input_mode
    calls = []
    real = input_mode.image_sizes

    def counting(paths, *args, **kwargs):
        calls.append(len(paths))
        return real(paths, *args, **kwargs)

    monkeypatch.setattr(input_mode, "image_sizes", counting)
    out = tmp_path / "out"
    assert main({}, ["--model", "test_resnet", "--img-size", "96", "--batch-size", "8", "--num-workers", "0",
                     "--epochs", "1", "--budget", "10m", "--data-dir", str(single_label_dir),
                     "--out-dir", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["aug"] == "flip" and config["input_mode"] == "pad", "both resolved from the headers"
    assert len(calls) == 1, calls
