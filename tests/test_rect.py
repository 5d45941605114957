"""input_mode=rect (issue #20 item 2, "rectangular inputs bucketed by aspect ratio"): every image at one
img_size square's pixel count in the shape of its aspect bucket, packed for the cache, batches grouped by
bucket, predictions back in the dataset's order."""
import json
import logging
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from kernelkit.core.checks import checked_config
from kernelkit.core.config import ConfigError
from kernelkit.data.cache import build_cache
from kernelkit.data.images import (
    RECT,
    RECT_ASPECTS,
    blank_image,
    load_rect,
    pack_rect,
    rect_bucket,
    rect_shape,
    to_rect,
    unpack_rect,
)
from kernelkit.data.loaders import ImageDataset, collate_images, make_loader
from kernelkit.data.sampling import BucketBatchSampler, rect_buckets
from kernelkit.data.transforms import IMAGENET, EvalTransform, TrainTransform, fold_tiles, normalize
from kernelkit.engine.evaluate import predict
from kernelkit.engine.resolution import resize_batch


def rand(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("size", [32, 64, 112, 192, 224, 320, 512])
def test_every_bucket_holds_about_one_square_of_pixels_in_its_aspect(size):
    slack = 0.15 if size >= 64 else 0.3  # sides are multiples of 8: coarse at 32 px
    for b in range(len(RECT_ASPECTS)):
        h, w = rect_shape(b, size)
        assert abs(h * w / size ** 2 - 1) <= slack, (b, h, w)
        assert abs(np.log(w / h / RECT_ASPECTS[b])) < 0.2, "the shape keeps the bucket's aspect"
        assert rect_shape(-b, size) == (w, h), "portrait: the same shape turned"


def test_a_buckets_shape_names_its_bucket_at_every_size():
    """BatchNorm picks its statistics, and progressive resizing its target, from a batch's shape."""
    for size in range(16, 1025, 4):
        for b in range(-len(RECT_ASPECTS) + 1, len(RECT_ASPECTS)):
            h, w = rect_shape(b, size)
            assert rect_bucket(w, h) == b, (size, b, h, w)


def test_buckets_follow_the_aspect_ratio_and_the_orientation():
    assert rect_bucket(64, 64) == 0 and rect_bucket(70, 64) == 0
    assert rect_bucket(320, 64) == 5 and rect_bucket(64, 320) == -5
    assert rect_bucket(128, 64) == 2 and rect_bucket(64, 200) == -3
    assert rect_bucket(6400, 64) == 5, "longer than the last bucket: the last bucket"


def test_a_packed_column_gives_the_image_back_without_a_copy():
    y = rand(48, 248)
    col = pack_rect(y, 112)
    assert col.shape == (3, 115, 112) and col.stride(0) == 1, "a fixed-size channels-last column"
    back = unpack_rect(col)
    assert torch.equal(back, y) and back.data_ptr() == col.data_ptr()
    with pytest.raises(ValueError, match="not a packed rect"):
        unpack_rect(torch.zeros(3, 115, 112, dtype=torch.uint8))


def test_a_strip_keeps_its_scale_where_a_padded_square_shrinks_it():
    """The point of the mode: a 64 x 320 strip at 192 px keeps 1.4x its scale (88 x 432), where pad
    fits its long side to 192 (0.6x)."""
    x = torch.zeros(3, 64, 320, dtype=torch.uint8)
    x[:, 20:44, 100:124] = 200  # a 24 px object
    y = unpack_rect(to_rect(x, 192))
    assert tuple(y.shape[-2:]) == rect_shape(5, 192) == (88, 432)
    rows = (y[0] > 100).any(1).sum().item()
    assert rows >= 30, "the 24 px object is >= 30 px tall, not the ~14 px a padded square leaves"


def test_an_image_longer_than_the_last_bucket_is_padded_not_stretched():
    x = torch.full((3, 16, 256), 200, dtype=torch.uint8)  # 1:16
    y = unpack_rect(to_rect(x, 64, fill=0))
    assert tuple(y.shape[-2:]) == rect_shape(5, 64)
    assert (y[:, 0] == 0).all() and (y[:, y.shape[1] // 2] == 200).all(), "fitted and padded with the fill"


def test_transforms_unpack_and_augment_in_the_buckets_shape():
    x = rand(64, 200)
    ev = EvalTransform(64, 2.0, 255, RECT)
    assert ev.shape == (73, 64) and ev.per_image_work
    want = rect_shape(rect_bucket(200, 64), 64)
    assert tuple(ev(x).shape[-2:]) == want
    assert torch.equal(ev(ev.base(x)), ev(x)), "a cached column passes base unchanged"
    tr = TrainTransform(64, 2.0, 255, "light", RECT)
    got = tr(x)
    assert tuple(got.shape[-2:]) == want and got.stride(0) == 1
    assert tuple(ev.blank().shape) == (3, 64, 64), "an unreadable file: a grey square, unpacked"
    assert tuple(blank_image(64, RECT).shape) == (3, 73, 64), "... packed in the cache"


def test_a_portrait_batch_twice_as_tall_as_wide_is_not_folded_into_tiles():
    x = torch.zeros(4, 3, 272, 136)
    assert fold_tiles(x, 1) == (x, 1)


def test_resize_batch_keeps_a_rect_batchs_aspect():
    x = torch.zeros(2, 3, *rect_shape(5, 192))
    assert tuple(resize_batch(x, 96).shape[-2:]) == rect_shape(5, 96), "the bucket's shape at the stage's size"
    assert tuple(resize_batch(torch.zeros(1, 3, *rect_shape(-3, 192)), 96).shape[-2:]) == rect_shape(-3, 96)
    assert tuple(resize_batch(torch.zeros(2, 3, 64, 64), 48).shape) == (2, 3, 48, 48), "squares as before"


def test_bucket_batches_hold_one_bucket_and_every_image_once():
    buckets = np.array([0, 1, 0, 1, 0, -2, 0, 1, 0, 0, 3])
    ev = BucketBatchSampler(range(len(buckets)), buckets, 3)
    got = list(ev)
    assert all(len({buckets[i] for i in b}) == 1 for b in got)
    assert sorted(ev.order()) == list(range(len(buckets))) and len(got) == len(ev)
    g = torch.Generator().manual_seed(0)
    tr = BucketBatchSampler(torch.utils.data.RandomSampler(range(len(buckets)), generator=g), buckets, 3, min_last=2)
    batches = list(tr)
    assert len(batches) == len(tr) and all(len(b) >= 2 for b in batches), "no batch of one (BatchNorm)"
    assert all(len({buckets[i] for i in b}) == 1 for b in batches)


def strips(root, n=12):
    """PNG files of many shapes; row k's pixels encode k (so order can be checked)."""
    root.mkdir(parents=True, exist_ok=True)
    shapes = [(64, 64), (64, 100), (64, 130), (64, 190), (64, 250), (64, 320), (100, 64), (320, 64)]
    paths = []
    for k in range(n):
        h, w = shapes[k % len(shapes)]
        arr = np.full((h, w, 3), 10 * k, np.uint8)
        p = root / f"im{k:02d}.png"
        Image.fromarray(arr).save(p)
        paths.append(str(p))
    return paths


def test_buckets_come_from_the_headers_and_a_broken_file_is_a_square(tmp_path):
    paths = strips(tmp_path / "im")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    got = rect_buckets(paths + [str(tmp_path / "bad.png")])
    want = [rect_bucket(*Image.open(p).size) for p in paths]
    assert list(got) == want + [0]


class MeanPixel(torch.nn.Module):
    """Any input size -> (N, 1): the mean of the normalised pixels (each test image is one grey level)."""

    def forward(self, x):
        return x.mean((1, 2, 3))[:, None]


@pytest.mark.parametrize("cached", [False, True])
def test_predictions_come_back_in_the_datasets_order(tmp_path, cached):
    paths = strips(tmp_path / "im")
    tf = EvalTransform(32, 2.0, 255, RECT)
    cache = build_cache(paths, tf.geometry, tmp_path / "cache") if cached else None
    ds = ImageDataset(paths, None, tf, 32, cache=cache)
    loader = make_loader(ds, 3, False, 0, buckets=rect_buckets(paths))
    for x, _, _ in loader:
        assert x.shape[0] <= 3
    out = predict(MeanPixel(), loader, torch.device("cpu"), "multilabel", amp=False, pre=IMAGENET)
    one_by_one = [torch.sigmoid(MeanPixel()(normalize(ds[i][0][None], False, IMAGENET))).item()
                  for i in range(len(paths))]
    assert np.allclose(out["probs"][:, 0], one_by_one, atol=1e-5)
    assert np.all(np.diff(out["probs"][:, 0]) > 0), "image k is brighter than image k - 1, as written"


def test_a_blank_joins_its_batch_in_the_batchs_shape():
    a, b = torch.zeros(3, 40, 112, dtype=torch.uint8), torch.full((3, 64, 64), 128, dtype=torch.uint8)
    cl = [x.permute(1, 2, 0).contiguous().permute(2, 0, 1) for x in (a, a, b)]
    images, _, ok = collate_images([(x, torch.tensor(0), torch.tensor(1.0)) for x in cl])
    assert tuple(images.shape) == (3, 3, 40, 112)


def test_the_cache_stores_the_packed_columns(tmp_path):
    paths = strips(tmp_path / "im", 8)
    cache = build_cache(paths, (32, 2.0, 255, RECT), tmp_path / "cache")
    assert cache.row_shape == (37, 32, 3)
    ev = EvalTransform(32, 2.0, 255, RECT)
    for i, p in enumerate(paths):
        x, ok = cache.get(i)
        assert ok and torch.equal(ev(x), unpack_rect(load_rect(p, 32)))


def test_rect_options_are_checked():
    assert checked_config({"input_mode": "rect"}).geometry()[3] == RECT
    assert checked_config({"input_mode": "rect"}).input_tiles() == 1, "one square's compute"
    with pytest.raises(ConfigError, match="takes only its own input size"):
        checked_config({"input_mode": "rect", "model": "test_vit"})


def test_rect_end_to_end_then_offline_inference_from_its_checkpoint(tmp_path, caplog):
    from kernelkit.app.cli import main
    from kernelkit.inputs.competition import load_competition
    from kernelkit.inputs.submission import validate_submission
    from test_tiles import strip_competition
    data = strip_competition(tmp_path / "rect", n_train=32, n_test=8, lengths=(32, 48, 96, 160))  # 1:1 to 1:5
    (data / "test" / "test007.png").write_bytes(b"\x89PNG broken")  # hostile: an unreadable test image
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="kernelkit"):
        assert main({}, ["--model", "test_resnet", "--img-size", "32", "--batch-size", "4", "--num-workers", "0",
                         "--epochs", "2", "--budget", "10m", "--input-mode", "rect", "--data-dir", str(data),
                         "--out-dir", str(out)]) == 0
    assert any("input mode: rect (set)" in r.getMessage() for r in caplog.records)
    assert any(r.getMessage().startswith("rect: ") and "by aspect bucket" in r.getMessage() for r in caplog.records)
    comp = load_competition(data)
    validate_submission(out / "submission.csv", comp)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["input_mode"] == "rect"
    ckpt = torch.load(out / "best.pt", map_location="cpu", weights_only=False)
    assert ckpt["config"]["input_mode"] == "rect", "the checkpoint stores the mode for --mode infer"
    infer = tmp_path / "infer"
    assert main({}, ["--mode", "infer", "--checkpoints", str(out / "best.pt"), "--data-dir", str(data),
                     "--num-workers", "0", "--out-dir", str(infer)]) == 0
    validate_submission(infer / "submission.csv", comp)
    np.testing.assert_allclose(np.load(infer / "test_probs.npy"), np.load(out / "test_probs.npy"), atol=1e-5,
                               err_msg="offline inference predicts, row by row, what the run predicted")


def last_batchnorm(model: torch.nn.Module) -> torch.nn.BatchNorm2d:
    return [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)][-1]


def test_batchnorm_keeps_statistics_per_bucket_through_a_checkpoint_and_a_copy():
    """A rect batch holds one bucket, so BatchNorm trains on that bucket's statistics; evaluation must use
    the same bucket's running statistics, not one average over all (README: +0.07 F2 on square frames)."""
    import copy

    from kernelkit.build.components import model_from_config
    cfg = checked_config({"model": "test_resnet", "input_mode": "rect"})
    model = model_from_config(cfg, 3)
    bn = last_batchnorm(model)
    model.train()
    torch.manual_seed(0)
    model(torch.randn(4, 3, 32, 32) * 3 + 2)  # squares: bright, wide
    model(torch.randn(4, 3, 24, 48))  # 1:2 strips: another distribution
    assert not torch.allclose(bn.rect_mean_0, bn.rect_mean_2), "each bucket its own running statistics"
    assert torch.equal(bn.rect_mean_p2, bn.rect_mean_p3), "buckets not trained keep the weights' own"
    model.eval()
    square, strip = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 24, 48)
    want_square, want_strip = model(square), model(strip)
    model(strip)
    assert torch.allclose(model(square), want_square), "the order of batches does not matter"
    fresh = model_from_config(cfg, 3, with_weights=False)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    assert torch.allclose(fresh(strip), want_strip) and torch.allclose(fresh(square), want_square)
    assert torch.allclose(copy.deepcopy(model)(strip), want_strip), "an EMA copy keeps them"
    plain = model_from_config(checked_config({"model": "test_resnet", "input_mode": "pad"}), 3)
    assert not any("rect_" in k for k in plain.state_dict()), "other modes: the model as timm builds it"


def test_a_buckets_first_batches_replace_the_weights_statistics_then_it_moves_at_the_usual_rate():
    """A rare bucket trains a few batches an epoch: its statistics start as the average of its own
    batches (momentum 1/n), not 90% ImageNet's after one batch."""
    from kernelkit.build.components import model_from_config
    model = model_from_config(checked_config({"model": "test_resnet", "input_mode": "rect"}), 3)
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    model.train()
    x = torch.randn(4, 3, 24, 48) * 2 + 1
    model(x)
    first = bn.rect_mean_2.clone()
    model(x)  # the same batch again: the average of two equal batches is the first
    assert torch.allclose(bn.rect_mean_2, first, atol=1e-6) and bn.momentum == 0.1
    for _ in range(12):
        model(torch.randn(4, 3, 24, 48))
    assert bn.momentum == 0.1 and not torch.allclose(bn.rect_mean_2, first)


def test_a_bucket_sampler_with_no_batch_is_not_swapped_for_a_plain_one(tmp_path):
    """Regression: `batch_sampler or BatchSampler(...)` took an empty bucket sampler (every training bucket
    holding one image) for none and made mixed-shape batches."""
    from kernelkit.data.loaders import ThreadLoader
    paths = strips(tmp_path / "im", 3)  # three images, three buckets
    ds = ImageDataset(paths, np.zeros(3), EvalTransform(32, 2.0, 255, RECT), 32)
    sampler = BucketBatchSampler(range(3), rect_buckets(paths), 4, min_last=2)
    loader = ThreadLoader(ds, 4, batch_sampler=sampler)
    assert len(sampler) == 0 and loader.batch_sampler is sampler and list(loader) == []


@pytest.mark.parametrize("world_size", [2, 3])
def test_data_parallel_ranks_share_one_bucketed_shuffle_and_take_as_many_steps(world_size):
    """Each rank its every world_size-th batch of one shuffle all ranks draw alike: the same number of
    batches on every rank (a collective would hang otherwise), each batch one bucket, every batch of the
    shuffle on some rank (a few repeated to even the count, none cut), a new order per epoch, and a
    bucket's leftover batch (the sequence's last) not always on the same rank."""
    from kernelkit.data.loaders import set_epoch
    from kernelkit.data.sampling import ShardedBatches
    rng = np.random.default_rng(0)
    buckets = rng.choice([0, 0, 0, 1, 2, -3, 5], size=103)
    data = list(range(len(buckets)))

    def draw(epoch: int) -> tuple[list, list[list[list[int]]]]:
        shuffle = torch.utils.data.DistributedSampler(data, 1, 0, shuffle=True, seed=7)
        every = BucketBatchSampler(shuffle, buckets, 8, min_last=2)
        ranks = []
        for rank in range(world_size):
            sharded = ShardedBatches(every, world_size, rank, seed=7)
            set_epoch(SimpleNamespace(batch_sampler=sharded, sampler=None), epoch)
            ranks.append(list(sharded))
            assert len(ranks[-1]) == len(sharded) and sharded.batch_size == 8
        return list(every), ranks

    holders = set()
    for epoch in range(6):
        every, ranks = draw(epoch)
        assert len({len(b) for b in ranks}) == 1 and len(ranks[0]) > 0
        drawn = [tuple(b) for batches in ranks for b in batches]
        assert set(drawn) == {tuple(b) for b in every}, "every batch of the shuffle, on some rank"
        assert len(drawn) - len(every) < world_size, "only the few repeats that even the count"
        assert all(len({int(buckets[i]) for i in batch}) == 1 for batch in drawn)
        assert draw(epoch)[1] == ranks, "a rank draws the same batches whenever it asks"
        holders |= {r for r, batches in enumerate(ranks) if tuple(every[-1]) in map(tuple, batches)}
    assert draw(0)[1] != draw(1)[1], "each epoch its own shuffle"
    assert len(holders) > 1, "the last batch of the sequence moves between ranks"


def test_ranks_merge_their_per_bucket_statistics_weighted_by_the_batches_each_trained():
    """Under data parallelism each rank keeps the statistics of its own batches, and a rare bucket's one
    batch lands on one rank: at an epoch's end every rank takes each bucket's average over the ranks that
    trained it, weighted by their batch counts (a rank that never saw it must not pull it back to the
    weights' statistics). Two ranks simulated in one process: each one's sum is its own plus the other's."""
    import copy

    from kernelkit.build.components import model_from_config
    from kernelkit.model.factory import BUCKET_COUNTS, merge_bucket_norms
    cfg = checked_config({"model": "test_resnet", "input_mode": "rect"})
    ranks = [model_from_config(cfg, 3, with_weights=False) for _ in range(2)]
    ranks[1].load_state_dict(ranks[0].state_dict())
    emas = [copy.deepcopy(m) for m in ranks]
    torch.manual_seed(0)
    for model, batches in zip(ranks, ([(32, 32)] * 1, [(32, 32)] * 3 + [(24, 48)])):
        model.train()
        for h, w in batches:
            model(torch.randn(2, 3, h, w) * 2 + 1)
    bn = [last_batchnorm(model) for model in ranks]
    ema_bn = [last_batchnorm(ema) for ema in emas]
    for r, ema in enumerate(ema_bn):  # an EMA's statistics lag the model's: their own values, one per rank
        ema.rect_mean_0.fill_(10.0 * (r + 1))
        ema.rect_mean_2.fill_(-5.0 * (r + 1))
    assert bn[0].__dict__[BUCKET_COUNTS] == {0: 1} and bn[1].__dict__[BUCKET_COUNTS] == {0: 3, 2: 1}
    before = [{k: v.clone() for k, v in b._buffers.items()} for b in bn]
    payloads = []
    for model, ema in zip(ranks, emas):
        merge_bucket_norms(model, (ema,), lambda t: payloads.append(t.clone()) or t)  # its own sum: no change
    for r in (0, 1):
        assert all(torch.allclose(v, before[r][k]) for k, v in bn[r]._buffers.items()), "one rank alone: unchanged"
    for r, (model, ema) in enumerate(zip(ranks, emas)):
        merge_bucket_norms(model, (ema,), lambda t, other=payloads[1 - r]: t + other)
    want_square = (1 * before[0]["rect_mean_0"] + 3 * before[1]["rect_mean_0"]) / 4
    for r in (0, 1):
        assert torch.allclose(bn[r].rect_mean_0, want_square, atol=1e-6), "weighted by batch counts"
        assert torch.allclose(bn[r].rect_mean_2, before[1]["rect_mean_2"]), "only the rank that trained it"
        assert torch.equal(bn[r].rect_mean_p3, before[r]["rect_mean_p3"]), "trained by none: as it was"
        assert torch.allclose(ema_bn[r].rect_mean_0, torch.full_like(ema_bn[r].rect_mean_0, (10 + 3 * 20) / 4)) \
            and torch.allclose(ema_bn[r].rect_mean_2, torch.full_like(ema_bn[r].rect_mean_2, -10.0)), \
            "the EMA copies merge alike, weighted by the model's batch counts"
    assert torch.allclose(bn[0].rect_mean_2, bn[1].rect_mean_2)


def test_the_inference_reserve_counts_reading_the_test_headers(tmp_path, monkeypatch, single_label_dir):
    """rect reads every test image's header before predicting: the probe times that set-up on its own
    images and the reserve keeps it for all of them (a lower bound that holds on any machine: each
    header read is slowed by 20 ms)."""
    from kernelkit.app.train_job import measure_reserve
    from kernelkit.build import assemble
    from kernelkit.engine.budget import InferenceReserve
    from kernelkit.inputs.competition import load_competition
    comp = load_competition(single_label_dir)
    cfg = checked_config({"model": "test_resnet", "img_size": 32, "batch_size": 2, "num_workers": 0,
                          "input_mode": "rect"})
    import timm
    model = timm.create_model("test_resnet", num_classes=comp.num_classes).eval()
    reserve = InferenceReserve(len(comp.test_ids), 0, 1)
    base = reserve.overhead_s
    real = assemble.rect_buckets

    def slow_headers(paths):
        time.sleep(0.02 * len(paths))
        return real(paths)
    monkeypatch.setattr(assemble, "rect_buckets", slow_headers)
    measure_reserve(cfg, comp, model, torch.device("cpu"), reserve)
    assert reserve.overhead_s - base >= 0.02 * len(comp.test_ids) * 0.99
