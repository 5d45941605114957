"""input_mode auto is compute-aware: tiles cost `tiles` squares an image, and where the autopick finds
no size at which they fit their epochs the run takes one stretched square per image (squeeze) instead,
keeps it across a resume, and predicts with it; an explicit mode is never swapped (issue #20)."""
import json
import logging

import numpy as np
import pytest
from PIL import Image
from test_finetune import timm_folder
from test_tiles import strip_competition

from kernelkit.build import autopick
from kernelkit.core.checks import checked_config
from kernelkit.data.transforms import EvalTransform
from kernelkit.engine.checkpoint import load_checkpoint

SQUARE_IPS = 200.0


def speeds(tiles_ips: float, tiles_ips_above_64: float | None = None, square_ips_above_64: float = SQUARE_IPS,
           edge: int = 64, square_edge: int | None = None):
    """autopick.measure on a machine where one square per image trains at SQUARE_IPS images/s
    (`square_ips_above_64` past 64 px) and an image as tiles at `tiles_ips` (`tiles_ips_above_64` past
    64 px, or past `edge`, and one square past `square_edge` when given; real timings would make the
    choice depend on the machine's load); `.calls` lists what was timed, (size, tiles) each."""
    def fake_measure(cand, cfg, num_classes, device, steps=autopick.TIMED_STEPS, deadline=float("inf")):
        fake_measure.calls.append((cand.img_size, cfg.input_tiles()))
        ips = SQUARE_IPS if cand.img_size <= (square_edge or edge) else square_ips_above_64
        if cfg.input_tiles() > 1:
            ips = tiles_ips if cand.img_size <= edge or tiles_ips_above_64 is None else tiles_ips_above_64
        return ips, 2 * ips
    fake_measure.calls = []
    return fake_measure


def run(data, out, *flags):
    from kernelkit.app.cli import main
    return main({}, ["--batch-size", "8", "--num-workers", "0", "--epochs", "1", "--budget", "2m",
                     "--data-dir", str(data), "--out-dir", str(out), *flags])


@pytest.fixture(autouse=True)
def rect_unavailable(monkeypatch):
    """Auto takes tiles (and their fallback) where rect cannot run: compile=true, a model of fixed
    input size. These tests exercise that path on a convolutional model, one process."""
    from kernelkit.build import input_mode
    monkeypatch.setattr(input_mode, "fixed_size_architecture", lambda name: bool(name) and name != "auto")


@pytest.fixture
def strips_and_weights(tmp_path):
    # 1:3 strips (all 'long'), and a tiny timm weights folder: a fine-tune, so auto takes tiles first.
    # Weights trained at 160 px: the tiles' ladder runs 64 ... 160 px (autopick.CPU_FINETUNE_SIZES: 32 px
    # short sides are thumbnails at FINETUNE_FLOOR), one square's 128 ... 160 px (96 px long sides are not).
    return strip_competition(tmp_path / "strips"), timm_folder(tmp_path / "weights", input_size=160)


def test_too_slow_tiles_fall_back_to_squeeze_end_to_end(strips_and_weights, tmp_path, monkeypatch, caplog):
    data, weights = strips_and_weights
    timed = speeds(tiles_ips=0.02)
    monkeypatch.setattr(autopick, "measure", timed)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="kernelkit"):
        assert run(data, out, "--pretrained-path", str(weights)) == 0
    assert "input mode: tiles x3" in caplog.text and "squeeze if the autopick finds them too slow" in caplog.text
    assert "input mode squeeze instead of tiles x3" in caplog.text
    assert "WARNING: none measured fits" not in caplog.text, "a fallback is not a warning"
    assert "fewer, at the smallest size" not in caplog.text, "one square per image fits: no excuse needed"
    assert timed.calls[0] == (64, 3) and [c for c in timed.calls if c[1] == 3] == [(64, 3)], \
        "tiles: only the smallest size is timed (no larger one fits when it does not), and only once"
    assert len(set(timed.calls)) == len(timed.calls) > 2, "then the squeeze ladder, each size timed once"
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["input_mode"], summary["tiles"]) == ("squeeze", 1)
    assert json.loads((out / "config.json").read_text())["input_mode"] == "squeeze"
    stored = load_checkpoint(out / "best.pt")["config"]
    assert (stored["input_mode"], stored["tiles"]) == ("squeeze", 0), "--mode infer predicts as training saw"
    from kernelkit.app.cli import main
    infer = tmp_path / "infer"
    assert main({}, ["--mode", "infer", "--checkpoints", str(out / "best.pt"), "--data-dir", str(data),
                     "--out-dir", str(infer), "--num-workers", "0"]) == 0
    np.testing.assert_allclose(np.load(infer / "test_probs.npy"), np.load(out / "test_probs.npy"), atol=1e-5)


def test_tiles_that_fit_only_at_the_smallest_size_fall_back_too(strips_and_weights, tmp_path, monkeypatch, caplog):
    data, weights = strips_and_weights
    timed = speeds(tiles_ips=SQUARE_IPS, tiles_ips_above_64=0.02)
    monkeypatch.setattr(autopick, "measure", timed)
    with caplog.at_level(logging.INFO, logger="kernelkit"):
        assert run(data, tmp_path / "out", "--pretrained-path", str(weights)) == 0
    assert "the tiles fit 1 epochs only at the smallest size (64 px)" in caplog.text
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["input_mode"], summary["img_size"]) == ("squeeze", 160), "one square, at the top of the ladder"
    tiles = [c for c in timed.calls if c[1] == 3]
    assert tiles[0] == (64, 3) and tiles.count((64, 3)) == 1, "64 px timed once, before and in the search"
    assert len(tiles) > 1 and all(size > 64 for size, _ in tiles[1:]), "the search timed larger tiles, none fitting"


def test_one_square_at_the_fine_tune_floor_wins_over_tiles_at_their_thumbnail_floor(strips_and_weights, tmp_path,
                                                                                      monkeypatch, caplog):
    """The tiles' 32 px short sides start their ladder at 64 px; one square per image (96 px long sides, not
    thumbnails) starts at FINETUNE_FLOOR. A square there with fewer epochs than wanted beats the tiles at
    64 px: for strips size beat epochs (squeeze 128 px, 5 epochs, against 80 px, 9: README)."""
    data, weights = strips_and_weights
    floor = autopick.FINETUNE_FLOOR
    monkeypatch.setattr(autopick, "measure", speeds(tiles_ips=SQUARE_IPS, tiles_ips_above_64=0.02,
                                                    square_ips_above_64=0.02, square_edge=floor))
    with caplog.at_level(logging.INFO, logger="kernelkit"):
        assert run(data, tmp_path / "out", "--pretrained-path", str(weights)) == 0
    assert "input mode squeeze instead of tiles x3" in caplog.text and "keeping tiles" not in caplog.text
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["input_mode"], summary["img_size"]) == ("squeeze", floor)


def test_tiles_stay_when_one_square_fits_under_half_the_epochs(strips_and_weights, tmp_path, monkeypatch, caplog):
    data, weights = strips_and_weights
    monkeypatch.setattr(autopick, "measure", speeds(tiles_ips=SQUARE_IPS, tiles_ips_above_64=0.02,
                                                    square_ips_above_64=0.02))
    with caplog.at_level(logging.INFO, logger="kernelkit"):
        assert run(data, tmp_path / "out", "--pretrained-path", str(weights)) == 0
    assert "keeping tiles x3 at 64 px: one square per image fits under half the epochs" in caplog.text
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["input_mode"], summary["img_size"]) == ("tiles", 64)


def test_tiles_stay_when_one_square_fits_no_larger_size(tmp_path, monkeypatch, caplog):
    """Strips with 80 px short sides (not thumbnails): both ladders start at FINETUNE_FLOOR. Tiles that fit only
    there, under half the weights' size, measure one square per image; it fits no larger size, so tiles stay."""
    data = strip_competition(tmp_path / "strips")
    for path in data.rglob("*.png"):
        with Image.open(path) as img:
            wide = img.resize((img.width * 5 // 2, img.height * 5 // 2))
        wide.save(path)
    weights = timm_folder(tmp_path / "weights", input_size=320)
    floor = autopick.FINETUNE_FLOOR
    monkeypatch.setattr(autopick, "measure", speeds(tiles_ips=SQUARE_IPS, tiles_ips_above_64=0.02,
                                                    square_ips_above_64=0.02, edge=floor))
    with caplog.at_level(logging.INFO, logger="kernelkit"):
        assert run(data, tmp_path / "out", "--pretrained-path", str(weights)) == 0
    assert f"the tiles fit 1 epochs only at the smallest size ({floor} px)" in caplog.text
    assert f"keeping tiles x3 at {floor} px: one square per image fits no larger size" in caplog.text
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["input_mode"], summary["img_size"]) == ("tiles", floor)


def test_tiles_that_fit_stay_and_an_explicit_mode_is_never_swapped(strips_and_weights, tmp_path, monkeypatch,
                                                                   caplog):
    data, weights = strips_and_weights
    monkeypatch.setattr(autopick, "measure", speeds(tiles_ips=SQUARE_IPS / 3))
    with caplog.at_level(logging.INFO, logger="kernelkit"):
        assert run(data, tmp_path / "fast", "--pretrained-path", str(weights)) == 0
    fast = json.loads((tmp_path / "fast" / "summary.json").read_text())
    assert (fast["input_mode"], fast["img_size"]) == ("tiles", 160)
    assert "instead of tiles" not in caplog.text
    caplog.clear()
    monkeypatch.setattr(autopick, "measure", speeds(tiles_ips=0.02))
    with caplog.at_level(logging.INFO, logger="kernelkit"):
        assert run(data, tmp_path / "set", "--pretrained-path", str(weights), "--input-mode", "tiles") == 0
    assert json.loads((tmp_path / "set" / "summary.json").read_text())["input_mode"] == "tiles"
    assert "instead of tiles" not in caplog.text and "WARNING: none measured fits" in caplog.text


def test_a_resumed_run_keeps_the_input_mode_its_checkpoint_trained_with(strips_and_weights, tmp_path,
                                                                         monkeypatch):
    data, weights = strips_and_weights
    two_sessions = ["--pretrained-path", str(weights), "--sessions", "2", "--epochs", "2"]
    monkeypatch.setattr(autopick, "measure", speeds(tiles_ips=0.02))
    assert run(data, tmp_path / "first", *two_sessions) == 0
    monkeypatch.setattr(autopick, "measure", speeds(tiles_ips=SQUARE_IPS))  # a fresh pick would keep tiles now
    second = tmp_path / "second"
    assert run(data, second, *two_sessions, "--resume-from", str(tmp_path / "first" / "last.pt")) == 0
    summary = json.loads((second / "summary.json").read_text())
    assert summary["input_mode"] == "squeeze" and summary["epochs"] == 1, "one more epoch, images as before"


def test_a_resumed_run_that_does_not_measure_keeps_the_input_mode_too(strips_and_weights, tmp_path, monkeypatch,
                                                                       caplog):
    """With img_size given on resume nothing is measured, so no fallback can happen: auto's fresh answer
    for these strips is tiles, and the squeeze-trained model would have gone on training on tiles."""
    data, weights = strips_and_weights
    two_sessions = ["--pretrained-path", str(weights), "--sessions", "2", "--epochs", "2"]
    monkeypatch.setattr(autopick, "measure", speeds(tiles_ips=0.02))
    assert run(data, tmp_path / "first", *two_sessions) == 0
    first = json.loads((tmp_path / "first" / "config.json").read_text())
    assert first["input_mode"] == "squeeze"
    monkeypatch.setattr(autopick, "measure", speeds(tiles_ips=SQUARE_IPS))
    second = tmp_path / "second"
    with caplog.at_level(logging.INFO, logger="kernelkit"):
        assert run(data, second, *two_sessions, "--img-size", str(first["img_size"]),
                   "--resume-from", str(tmp_path / "first" / "last.pt")) == 0
    assert "input mode: squeeze (as the run this one resumes trained)" in caplog.text
    assert "autopick:" not in caplog.text.split("input mode: squeeze (as the run")[1], "nothing measured"
    summary = json.loads((second / "summary.json").read_text())
    assert summary["input_mode"] == "squeeze" and summary["epochs"] == 1
    # a fresh run with the same settings takes the tiles: the checkpoint, not the rule, decided above
    fresh = tmp_path / "fresh"
    assert run(data, fresh, *two_sessions, "--img-size", str(first["img_size"])) == 0
    assert json.loads((fresh / "config.json").read_text())["input_mode"] == "tiles"


def test_a_checkpoint_the_run_will_not_continue_does_not_set_the_input_mode(strips_and_weights, tmp_path,
                                                                            monkeypatch, caplog):
    """A killed run restarted in its out_dir with another schedule starts fresh (resume.check_resume):
    its input mode then comes from the rule and the autopick, not from the checkpoint it discards."""
    from kernelkit.engine.run_state import STATE_FILE
    data, weights = strips_and_weights
    out = tmp_path / "out"
    monkeypatch.setattr(autopick, "measure", speeds(tiles_ips=0.02))
    assert run(data, out, "--pretrained-path", str(weights), "--sessions", "2", "--epochs", "2") == 0
    assert json.loads((out / "config.json").read_text())["input_mode"] == "squeeze"
    state = json.loads((out / STATE_FILE).read_text())
    (out / STATE_FILE).write_text(json.dumps({**state, "finished": False}))  # as if it had been killed
    monkeypatch.setattr(autopick, "measure", speeds(tiles_ips=SQUARE_IPS))  # the tiles fit now
    with caplog.at_level(logging.INFO, logger="kernelkit"):
        assert run(data, out, "--pretrained-path", str(weights), "--sessions", "2", "--epochs", "3") == 0
    assert "as the run this one resumes trained" not in caplog.text
    assert "starting fresh" in caplog.text
    assert json.loads((out / "config.json").read_text())["input_mode"] == "tiles"


def test_an_explicit_other_mode_on_resume_wins_and_is_warned_about(strips_and_weights, tmp_path, caplog):
    data, weights = strips_and_weights
    two_sessions = ["--pretrained-path", str(weights), "--img-size", "64", "--sessions", "2", "--epochs", "2"]
    assert run(data, tmp_path / "first", *two_sessions, "--input-mode", "squeeze") == 0
    second = tmp_path / "second"
    with caplog.at_level(logging.INFO, logger="kernelkit"):
        assert run(data, second, *two_sessions, "--input-mode", "pad",
                   "--resume-from", str(tmp_path / "first" / "last.pt")) == 0
    assert "trained on input_mode squeeze; this run feeds it pad" in caplog.text
    assert json.loads((second / "summary.json").read_text())["input_mode"] == "pad", "the user's choice wins"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kernelkit"):  # the same mode: no warning
        assert run(data, tmp_path / "third", *two_sessions, "--input-mode", "squeeze",
                   "--resume-from", str(tmp_path / "first" / "last.pt")) == 0
    assert "this run feeds it" not in caplog.text


@pytest.mark.parametrize("damage", [{"input_mode": "banana"}, {"input_mode": "tiles", "tiles": "x3"},
                                    {"input_mode": "tiles", "tiles": 50}])
def test_a_damaged_input_mode_in_the_resumed_checkpoint_is_decided_by_the_rule(strips_and_weights, tmp_path,
                                                                              monkeypatch, caplog, damage):
    """Hostile input: the checkpoint to resume names no mode this version knows. The rule decides (tiles,
    with its fallback measured), the resume goes on, and the log says the modes differ."""
    import torch
    data, weights = strips_and_weights
    two_sessions = ["--pretrained-path", str(weights), "--sessions", "2", "--epochs", "2"]
    monkeypatch.setattr(autopick, "measure", speeds(tiles_ips=SQUARE_IPS))
    assert run(data, tmp_path / "first", *two_sessions) == 0
    last = tmp_path / "first" / "last.pt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    ckpt["config"].update(damage)
    torch.save(ckpt, last)
    second = tmp_path / "second"
    with caplog.at_level(logging.INFO, logger="kernelkit"):
        assert run(data, second, *two_sessions, "--resume-from", str(last)) == 0
    assert "as the run this one resumes trained" not in caplog.text
    assert "trained on input_mode an unreadable mode; this run feeds it tiles" in caplog.text
    summary = json.loads((second / "summary.json").read_text())
    assert summary["input_mode"] == "tiles" and summary["epochs"] == 1


def test_squeeze_stretches_every_image_where_pad_pads_long_ones(tmp_path):
    path = str(tmp_path / "strip.png")
    Image.fromarray(np.zeros((20, 100, 3), np.uint8)).save(path)  # 1:5, black: padding shows as the white fill
    pad = EvalTransform(*checked_config({"input_mode": "pad", "img_size": 40}).geometry())
    squeeze = EvalTransform(*checked_config({"input_mode": "squeeze", "img_size": 40, "pad_aspect": 2.0}).geometry())
    for view in (lambda t: t.load(path), lambda t: t(Image.open(path))):  # decoding for the cache, and per image
        padded, squeezed = view(pad), view(squeeze)
        assert padded.shape == squeezed.shape == (3, 40, 40)
        assert int(padded.max()) == 255 and int(squeezed.max()) == 0, "squeeze ignores pad_aspect: no padding"
    assert checked_config({"input_mode": "squeeze"}).input_tiles() == 1
