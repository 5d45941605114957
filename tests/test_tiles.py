"""input_mode=tiles (issue #20 item 2): geometry, cache, loaders, the model's max over tiles, auto choice."""
import numpy as np
import pytest
import torch
from PIL import Image

from kernelkit.build.input_mode import choose_input_mode
from kernelkit.core.checks import checked_config
from kernelkit.core.config import ConfigError
from kernelkit.data.cache import build_cache
from kernelkit.data.images import fit_strip, tile_offsets, to_tiles
from kernelkit.data.loaders import ImageDataset, make_loader
from kernelkit.data.transforms import IMAGENET, EvalTransform, TrainTransform, fold_tiles, pool_tiles
from kernelkit.engine.evaluate import predict


def rand(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


def test_a_strip_at_scale_is_cut_into_its_squares():
    x = rand(64, 192)
    t = to_tiles(x, 64, 3)
    assert t.shape == (3, 192, 64) and t.stride(0) == 1, "a channels-last column of 3 squares"
    for k in range(3):
        assert torch.equal(t[:, 64 * k:64 * (k + 1)], x[:, :, 64 * k:64 * (k + 1)])
    y = rand(192, 64, 1)  # portrait: along the height
    assert torch.equal(to_tiles(y, 64, 3), y.contiguous())


def test_short_images_overlap_and_long_ones_shrink_to_fit():
    assert tile_offsets(64, 64, 3) == [0, 0, 0] and tile_offsets(128, 64, 3) == [0, 32, 64]
    assert fit_strip(320, 64, 64, 3) == (192, 38), "1:5 into 3 squares: shrunk to a long side of 3 * 64"
    t = to_tiles(torch.full((3, 64, 320), 7, dtype=torch.uint8), 64, 3, fill=255)
    assert t.shape == (3, 192, 64)
    assert (t[:, :13] == 255).all() and (t[:, 64:64 + 13] == 255).all(), "the short side padded with fill"
    assert (t[:, 30:34] == 7).all()
    sq = to_tiles(rand(50, 50), 64, 2)
    assert torch.equal(sq[:, :64], sq[:, 64:]), "a square image gives the same square twice"


def test_fold_and_pool_keep_each_image_with_its_tiles():
    cols = torch.stack([to_tiles(rand(64, 192, s), 64, 3) for s in range(2)])
    squares, t = fold_tiles(cols, 3)
    assert t == 3 and squares.shape == (6, 3, 64, 64)
    assert torch.equal(squares[4], cols[1][:, 64:128])
    assert fold_tiles(torch.zeros(2, 3, 32, 32), 1)[1] == 1
    assert fold_tiles(torch.zeros(2, 3, 64, 32), 1)[1] == 1, "a 2:1 portrait rect batch is not two tiles"
    logits = torch.tensor([[0., 5.], [3., 1.], [1., 1.], [-1., 0.], [2., 2.], [0., 9.]])
    assert torch.equal(pool_tiles(logits, 3), torch.tensor([[3., 5.], [2., 9.]]))


def test_train_augmentation_runs_per_tile():
    x = to_tiles(rand(64, 192), 64, 3)
    out = TrainTransform(64, aug="light", tiles=3)(x)
    assert out.shape == (3, 192, 64)
    none = TrainTransform(64, aug="none", tiles=3)(x)
    assert torch.equal(none, x)


@pytest.fixture
def strips(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(64, 64), (200, 50), (40, 160), (300, 60)]):
        p = tmp_path / f"im{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    return [*paths, str(tmp_path / "bad.jpg")]


def test_the_cache_stores_columns_and_serves_what_decoding_gives(strips, tmp_path):
    tf = EvalTransform(32, tiles=3)
    cache = build_cache(strips, tf.geometry, tmp_path / "cache")
    assert cache.row_shape == (96, 32, 3) and cache.tiles == 3
    plain = ImageDataset(strips, None, tf, 32)
    cached = ImageDataset(strips, None, tf, 32, cache=cache)
    for i in range(len(strips)):
        a, b = plain[i], cached[i]
        assert a[0].shape == (3, 96, 32) and torch.equal(a[0], b[0]) and float(a[2]) == float(b[2])
    assert float(plain[4][2]) == 0.0, "an unreadable file is a blank column with ok=0"
    batch = cached.batch([0, 1, 2])
    assert batch[0].shape == (3, 3, 96, 32) and torch.equal(batch[0][1], plain[1][0])
    square = build_cache(strips, EvalTransform(32).geometry, tmp_path / "cache")
    assert square.dir != cache.dir and square.row_shape == (32, 32, 3)


class Tiny(torch.nn.Module):
    """Class 0's logit: the brightest pixel of the input; class 1: minus the mean."""

    def forward(self, x):
        return torch.stack([x.amax((1, 2, 3)), -x.mean((1, 2, 3))], 1)


def test_predict_takes_the_max_over_an_images_tiles(strips):
    tf = EvalTransform(32, tiles=3)
    ds = ImageDataset(strips[:4], None, tf, 32)
    out = predict(Tiny(), make_loader(ds, 3, False, 0), torch.device("cpu"), "multilabel", amp=False,
                  pre=IMAGENET)
    assert out["probs"].shape == (4, 2)
    for i in range(4):
        tiles = fold_tiles(ds[i][0][None], 3)[0]
        from kernelkit.data.transforms import normalize
        want = torch.sigmoid(Tiny()(normalize(tiles, False, IMAGENET)).amax(0))
        assert np.allclose(out["probs"][i], want.numpy(), atol=1e-5)


def sizes(aspects: list[float]) -> dict:
    a = np.array(aspects)
    return {"sampled": len(a), "long_share": float((a > 2.0).mean()),
            "aspect_quantiles": {f"p{q}": float(np.percentile(a, q)) for q in (50, 75, 90)}}


def test_auto_takes_rect_or_tiles_for_long_images_when_fine_tuning_and_pad_from_scratch():
    """As measured on the hard task (README): rect, then tiles, won fine-tuning lite0; pad won from scratch.
    Tiles where rect cannot run (rect_ok False: compile, a fixed-size model)."""
    long = sizes([1.0] * 5 + [2.5, 3.0, 4.0, 5.0, 5.0])
    mode, tiles, why = choose_input_mode(long, pretrained=True)
    assert (mode, tiles) == ("rect", 0) and "50%" in why and "pretrained" in why
    mode, tiles, why = choose_input_mode(long, pretrained=True, rect_ok=False)
    assert (mode, tiles) == ("tiles", 3) and "50%" in why and "pretrained" in why
    assert choose_input_mode(sizes([1.0] * 9 + [5.0]), pretrained=True)[:2] == ("pad", 0)
    assert choose_input_mode(sizes([1.0] * 5 + [2.2] * 5), pretrained=True, rect_ok=False)[:2] == ("tiles", 2)
    mode, tiles, why = choose_input_mode(long)
    assert (mode, tiles) == ("pad", 0) and "50%" in why and "input_mode=tiles" in why
    mode, tiles, why = choose_input_mode(sizes([1.0] * 9 + [5.0]))
    assert (mode, tiles) == ("pad", 0) and "input_mode=tiles" not in why
    assert choose_input_mode(sizes([1.0] * 5 + [5.0] * 5), "tiles")[:2] == ("tiles", 3), "count from the p75 aspect"
    assert choose_input_mode(sizes([1.0] * 5 + [2.2] * 5), "tiles")[:2] == ("tiles", 2)
    assert choose_input_mode(sizes([1.0] * 10), "tiles")[:2] == ("tiles", 2), "the user's choice wins"
    assert choose_input_mode(sizes([5.0] * 10), "pad")[:2] == ("pad", 0)
    assert choose_input_mode(sizes([5.0] * 10), "tiles", 5)[:2] == ("tiles", 5)
    assert choose_input_mode({}, "auto")[0] == "pad"


def test_tile_options_are_checked():
    with pytest.raises(ConfigError, match="tiles=9"):
        checked_config({"tiles": 9})
    with pytest.raises(ConfigError, match="mixup"):
        checked_config({"input_mode": "tiles", "mixup": 0.4})
    with pytest.raises(ConfigError):
        checked_config({"input_mode": "square"})
    assert checked_config({"input_mode": "tiles", "tiles": 4}).input_tiles() == 4
    assert checked_config({}).input_tiles() == 1, "auto before it is resolved (and old checkpoints): one square"


def strip_competition(root, n_train=24, n_test=6, lengths=(96,)):
    """single_label_csv of 32 px high strips `lengths` long (1:3 by default; several: drawn per image),
    either orientation, a red or a blue 24 px patch in each."""
    import pandas as pd
    rng = np.random.default_rng(0)
    for sub in ("train", "test"):
        (root / sub).mkdir(parents=True)
    rows = []
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            c = i % 2
            long = int(rng.choice(lengths)) if len(lengths) > 1 else lengths[0]
            arr = np.full((32, long, 3), 128, np.uint8)
            x = int(rng.integers(0, long - 24))
            arr[4:28, x:x + 24] = (220, 30, 30) if c else (30, 30, 220)
            img = Image.fromarray(arr if rng.random() < 0.5 else arr.transpose(1, 0, 2))
            img.save(root / split / f"{split}{i:03d}.png")
            if split == "train":
                rows.append((f"{split}{i:03d}", f"c{c}"))
    pd.DataFrame(rows, columns=["id", "label"]).to_csv(root / "train.csv", index=False)
    pd.DataFrame({"id": [f"test{i:03d}" for i in range(n_test)], "label": "c0"}).to_csv(
        root / "sample_submission.csv", index=False)
    return root


def test_tiles_end_to_end_with_the_count_from_the_aspect_ratios(tmp_path, caplog):
    import json
    import logging

    from kernelkit.app.cli import main
    from kernelkit.inputs.competition import load_competition
    from kernelkit.inputs.submission import validate_submission
    data = strip_competition(tmp_path / "strips")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="kernelkit"):
        assert main({}, ["--model", "test_resnet", "--img-size", "32", "--batch-size", "8", "--num-workers", "0",
                         "--epochs", "1", "--budget", "10m", "--input-mode", "tiles", "--data-dir", str(data),
                         "--out-dir", str(out)]) == 0
    assert any("input mode: tiles x3" in r.getMessage() and "100% of 24 sampled" in r.getMessage()
               for r in caplog.records)
    validate_submission(out / "submission.csv", load_competition(data))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["input_mode"] == "tiles" and summary["tiles"] == 3
    ckpt = torch.load(out / "best.pt", map_location="cpu", weights_only=False)
    assert ckpt["config"]["input_mode"] == "tiles", "the checkpoint stores the resolved mode for --mode infer"


@pytest.mark.parametrize("settings,want", [
    ({"pretrained_path": "LITE0"}, "rect"),  # fine-tuning on long images: rect
    ({"pretrained_path": "LITE0", "mixup": 0.4}, "rect"),  # a batch is one shape: its images mix
    ({"pretrained_path": "none"}, "pad"),  # 'none' is random init (no weights), so pad as from scratch
    ({"pretrained_path": "LITE0", "compile": True}, "tiles"),  # a static graph per shape: not rect's dozen
    ({"pretrained_path": "LITE0", "compile": True, "mixup": 0.4}, "pad"),  # ... and tiles cannot be mixed
])
def test_auto_input_mode_takes_rect_or_tiles_only_for_a_real_fine_tune(settings, want, strips, tmp_path, lite0_dir):
    from types import SimpleNamespace

    from kernelkit.build.input_mode import resolve_input_mode
    from kernelkit.core.context import RunContext
    settings = {k: (str(lite0_dir) if v == "LITE0" else v) for k, v in settings.items()}
    cfg = checked_config({"model": "tf_efficientnet_lite0", **settings})
    ctx = RunContext(cfg, None, tmp_path, tmp_path, False, 0.0)
    long_strips = [p for p in strips[1:] if not p.endswith(".jpg")]  # all 1:4 or 1:5
    got = resolve_input_mode(ctx, SimpleNamespace(train_paths=long_strips, classes=["0", "1"])).cfg
    assert got.input_mode == want and (got.tiles >= 2) == (want == "tiles")
