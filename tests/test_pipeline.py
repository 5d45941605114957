"""The image pipeline: fast decode paths, pad/resize geometry, the pre-resized cache (equality with
the direct path, keying, atomicity, bad files), threaded loading, batch augmentations."""
import json
import logging
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import kernelkit.data.cache as cache_mod
import kernelkit.data.images as images_mod
from kernelkit.data.cache import build_cache, open_cache
from kernelkit.data.images import (
    BadImage,
    decode_tensor,
    draft_scale,
    fit_size,
    load_resized,
    load_rgb,
    resize_or_pad_tensor,
    tv_jpeg_decoder,
)
from kernelkit.data.loaders import ImageDataset, ThreadLoader, collate_images, make_loader
from kernelkit.data.transforms import (
    AUG_LEVELS,
    EvalTransform,
    TrainTransform,
    affine_batch,
    color_jitter_batch,
    cutmix,
    hflip_batch,
    mix_batch,
    mixup,
    noise_batch,
    resize_or_pad,
    resized_crop_batch,
)

S = 32


def photo(w, h, seed=0):
    """Smooth structure + noise, so JPEG decoding and resizing do real work."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    arr = np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC), np.int16)
    return Image.fromarray(np.clip(arr + rng.normal(0, 6, (h, w, 1)), 0, 255).astype(np.uint8))


def corpus(root, bad=True):
    """Every decode path, plus (optionally) every kind of bad file. -> (paths, expected ok)."""
    root.mkdir(parents=True, exist_ok=True)
    items = []

    def add(name, img=None, ok=True, **save):
        if img is not None:
            img.save(root / name, **save)
        items.append((str(root / name), ok))

    add("plain.jpg", photo(60, 45), quality=90)                      # torchvision path
    add("strip.jpg", photo(400, 60, 1), quality=90)                  # draft + pad path
    add("gray.jpg", photo(50, 70, 2).convert("L"))
    add("cmyk.jpg", photo(50, 40, 3).convert("CMYK"))
    add("rgba.png", photo(64, 64, 4).convert("RGBA"))
    add("pal.png", photo(30, 90, 5).convert("P"))                    # pad path, PNG
    add("i16.png", Image.fromarray(np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) * 40))
    if bad:
        (root / "empty.jpg").write_bytes(b"")
        (root / "text.jpg").write_bytes(b"this is not an image")
        photo(200, 150, 6).save(root / "trunc.jpg")
        data = (root / "trunc.jpg").read_bytes()
        (root / "trunc.jpg").write_bytes(data[:len(data) // 2])     # header intact, image data cut
        for name in ("empty.jpg", "text.jpg", "trunc.jpg", "missing.jpg"):
            add(name, ok=False)
    return [p for p, _ in items], np.array([ok for _, ok in items])


# ----------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("name", ["plain.jpg", "strip.jpg", "gray.jpg", "cmyk.jpg", "rgba.png", "pal.png", "i16.png"])
def test_every_decode_path_gives_rgb_uint8_of_the_right_size(tmp_path, name):
    paths, _ = corpus(tmp_path, bad=False)
    path = next(p for p in paths if p.endswith(name))
    ref = np.array(load_rgb(path))  # Pillow, full size
    full = decode_tensor(path)
    assert full.dtype == torch.uint8 and full.shape == (3, *ref.shape[:2])
    assert torch.equal(full.permute(1, 2, 0), torch.from_numpy(ref)), "same pixels as Pillow, every decoder"
    for size in (S, 100):
        out = load_resized(path, size)
        assert out.dtype == torch.uint8 and out.shape == (3, size, size)


def test_jpeg_paths_torchvision_for_most_draft_for_big_targets(tmp_path):
    paths, _ = corpus(tmp_path, bad=False)
    assert tv_jpeg_decoder() is not None
    assert decode_tensor(paths[0], S).shape == (3, 45, 60)  # no reduction possible: full decode
    assert decode_tensor(paths[1], S).shape == (3, 15, 100)  # 400x60 strip for a 32x5 target: 1/4 scale
    assert draft_scale(400, 60, *fit_size(400, 60, S)) == 4
    assert draft_scale(300, 400, S * 4, S * 4) == 1  # never below DRAFT_GAP x the target


def test_exif_orientation_applied_on_the_fast_path(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    photo(60, 40).save(tmp_path / "rot.jpg", exif=exif)
    out = decode_tensor(str(tmp_path / "rot.jpg"))
    assert out.shape == (3, 60, 40)
    assert torch.equal(out.permute(1, 2, 0), torch.from_numpy(np.array(load_rgb(str(tmp_path / "rot.jpg")))))


def test_bad_files_name_the_file_and_the_reason(tmp_path, monkeypatch):
    paths, ok = corpus(tmp_path)
    reasons = {"empty.jpg": "empty file", "text.jpg": "not an image", "trunc.jpg": "truncated or corrupt JPEG",
               "missing.jpg": "missing file"}
    for p in np.array(paths)[~ok]:
        name = os.path.basename(p)
        with pytest.raises(BadImage, match=reasons[name]) as e:
            load_resized(p, S)
        assert p in str(e.value)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 60x45 image is now a "bomb"
    with pytest.raises(BadImage, match="decompression bomb"):
        load_resized(paths[0], S)


# ----------------------------------------------------------------------------- geometry
def test_pad_or_stretch_decision_and_offsets():
    assert fit_size(200, 100, 64, 2.0) == (64, 64), "ratio exactly at the threshold: stretched"
    assert fit_size(201, 100, 64, 2.0) == (64, 32), "beyond it: long side fitted, short side padded"
    assert fit_size(100, 500, 64, 2.0) == (13, 64)
    assert fit_size(500, 100, 64, 0) == (64, 64), "pad_aspect=0 always stretches"
    strip = torch.zeros(3, 40, 400, dtype=torch.uint8)
    out = resize_or_pad_tensor(strip, 64, 2.0, fill=255)
    assert out.shape == (3, 64, 64) and out.dtype == torch.uint8
    rows = (out == 255).all(0).all(1)
    assert rows[:29].all() and not rows[29:35].any() and rows[35:].all(), "6 content rows centred, fill around"
    pil = np.asarray(resize_or_pad(Image.new("RGB", (400, 40)), 64, 2.0, 255))
    assert np.array_equal((pil == 255).all(2).all(1), rows.numpy()), "same decision and offsets as Pillow"
    assert (resize_or_pad_tensor(strip, 64, 0) == 0).all()
    assert (resize_or_pad_tensor(torch.zeros(3, 60, 90, dtype=torch.uint8), 64) == 0).all()


# ----------------------------------------------------------------------------- cache
def test_cache_gives_the_direct_path_pixels_and_flags(tmp_path, caplog):
    paths, ok = corpus(tmp_path / "img")
    ev = EvalTransform(S)
    with caplog.at_level(logging.WARNING, logger="kernelkit"):
        cache = build_cache(paths, ev.geometry, tmp_path / "cache")
    assert np.array_equal(cache.ok, ok) and cache.n_cached == len(paths)
    for p in np.array(paths)[~ok]:
        assert p in caplog.text, "each unreadable file is named in the log"
    assert len((cache.dir / "bad.txt").read_text().splitlines()) == (~ok).sum()
    direct = ImageDataset(paths, None, ev, S)
    cached = ImageDataset(paths, None, ev, S, cache=cache)
    for i in range(len(paths)):
        (a, _, ok_a), (b, _, ok_b) = direct[i], cached[i]
        assert a.dtype == b.dtype == torch.uint8 and a.shape == b.shape == (3, S, S)
        assert torch.equal(a, b), paths[i]
        assert float(ok_a) == float(ok_b) == float(ok[i])
    # A later run reuses it: no decoding at all.
    calls = []
    real = cache_mod.load_resized
    cache_mod.load_resized = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        again = build_cache(paths, ev.geometry, tmp_path / "cache")
    finally:
        cache_mod.load_resized = real
    assert again.dir == cache.dir and not calls


def test_stale_cache_is_never_reused(tmp_path):
    paths, _ = corpus(tmp_path / "img", bad=False)
    root = tmp_path / "cache"
    base = build_cache(paths, (S, 2.0, 255), root)
    variants = [
        ((S + 8, 2.0, 255), paths),          # another size
        ((S, 3.0, 255), paths),              # another pad threshold
        ((S, 2.0, 0), paths),                # another fill
        ((S, 2.0, 255), paths[:-1]),         # another file list
        ((S, 2.0, 255), paths[::-1]),        # another order
        ((S, 2.0, 255, 3), paths),           # tiles: columns of 3 squares
    ]
    dirs = {base.dir}
    for geometry, ps in variants:
        assert open_cache(ps, geometry, root) is None
        c = build_cache(ps, geometry, root)
        assert c.dir not in dirs and c.geometry == (*geometry, 1)[:4] and len(c) == len(ps)
        dirs.add(c.dir)
    # A file rewritten in place (new size and mtime) invalidates too.
    photo(60, 45, seed=9).save(paths[0], quality=50)
    assert open_cache(paths, (S, 2.0, 255), root) is None
    fresh = build_cache(paths, (S, 2.0, 255), root)
    assert torch.equal(fresh.get(0)[0], load_resized(paths[0], S))
    # A directory that only looks like a cache (metadata of another key) is not accepted.
    meta = json.loads((fresh.dir / "meta.json").read_text())
    meta["key"] = "0" * 24
    (fresh.dir / "meta.json").write_text(json.dumps(meta))
    assert open_cache(paths, (S, 2.0, 255), root) is None


def _boom_after(n):
    calls = []
    real = images_mod.load_resized

    def load(*a, **k):
        calls.append(1)
        if len(calls) > n:
            raise KeyboardInterrupt("killed mid-build")
        return real(*a, **k)
    return load


def test_a_killed_build_never_leaves_a_complete_looking_cache(tmp_path, monkeypatch):
    paths, _ = corpus(tmp_path / "img", bad=False)
    root, geometry = tmp_path / "cache", (S, 2.0, 255)
    # 1. Killed while decoding, with no chance to clean up (as under kill -9): rmtree disabled.
    monkeypatch.setattr(cache_mod, "load_resized", _boom_after(3))
    monkeypatch.setattr(cache_mod.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(KeyboardInterrupt):
        build_cache(paths, geometry, root)
    leftovers = list(root.iterdir())
    assert leftovers and all(d.name.startswith(".") and ".tmp-" in d.name for d in leftovers)
    assert open_cache(paths, geometry, root) is None
    # 2. Killed after every file was written, just before the rename: still not a cache.
    monkeypatch.setattr(cache_mod, "load_resized", images_mod.load_resized)
    monkeypatch.setattr(cache_mod.os, "rename", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        build_cache(paths, geometry, root)
    assert open_cache(paths, geometry, root) is None
    assert any((d / "meta.json").exists() for d in root.iterdir()), "complete data, but under a temporary name"
    # 3. The next build removes the leftovers of dead builds and produces a correct cache.
    monkeypatch.undo()
    c = build_cache(paths, geometry, root)
    assert [d.name for d in root.iterdir()] == [c.dir.name]
    for i, p in enumerate(paths):
        assert torch.equal(c.get(i)[0], load_resized(p, S))


def test_cache_bounded_by_max_bytes_decodes_the_rest(tmp_path):
    paths, ok = corpus(tmp_path / "img")
    ev = EvalTransform(S)
    c = build_cache(paths, ev.geometry, tmp_path / "cache", max_bytes=4 * 3 * S * S + 100)
    assert c.n_cached == 4 and len(c) == len(paths)
    ds, direct = ImageDataset(paths, None, ev, S, cache=c), ImageDataset(paths, None, ev, S)
    for i in range(len(paths)):
        assert torch.equal(ds[i][0], direct[i][0]) and float(ds[i][2]) == ok[i]
    assert not isinstance(make_loader(ds, 4, False, 0), ThreadLoader), "partly cached: worker processes"


def test_subsets_for_train_and_validation_splits(tmp_path):
    paths, ok = corpus(tmp_path / "img")
    ev = EvalTransform(S)
    c = build_cache(paths, ev.geometry, tmp_path / "cache")
    idx = np.array([5, 0, 9, 2])
    sub = ImageDataset([paths[i] for i in idx], None, ev, S, cache=c.subset(idx))
    for j, i in enumerate(idx):
        assert torch.equal(sub[j][0], load_resized(paths[i], S) if ok[i] else sub[j][0])
        assert float(sub[j][2]) == ok[i]
    with pytest.raises(ValueError, match="geometry"):
        ImageDataset(paths, None, EvalTransform(S + 1), S + 1, cache=c)
    with pytest.raises(ValueError, match="holds"):
        ImageDataset(paths[:3], None, ev, S, cache=c)


def test_cache_and_datasets_pickle_small_for_spawned_workers(tmp_path):
    paths, _ = corpus(tmp_path / "img", bad=False)
    c = build_cache(paths, (S, 2.0, 255), tmp_path / "cache")
    ds = ImageDataset(paths, np.arange(len(paths)), TrainTransform(S, aug="strong"), S, cache=c)
    ds[0]  # opens the memmap in this process
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000, "the memmap is reopened in each worker, never pickled"
    assert torch.equal(pickle.loads(blob).cache.get(3)[0], c.get(3)[0])
    writer = cache_mod.CacheWriter(paths, (S, 2.0, 255), str(c.dir / "images.u8"))
    assert pickle.loads(pickle.dumps(writer)).geometry == (S, 2.0, 255, 1)  # tiles 1: one square


# ----------------------------------------------------------------------------- loading
def test_cached_data_is_loaded_by_threads_with_the_same_batches(tmp_path):
    paths, ok = corpus(tmp_path / "img")
    ev = EvalTransform(S)
    c = build_cache(paths, ev.geometry, tmp_path / "cache")
    targets = np.arange(len(paths))
    cached, direct = ImageDataset(paths, targets, ev, S, cache=c), ImageDataset(paths, targets, ev, S)
    tl = make_loader(cached, 4, False, 2)
    assert isinstance(tl, ThreadLoader) and len(tl) == 3 and tl.batch_size == 4
    a, b = list(tl), list(make_loader(direct, 4, False, 0))
    for (xa, ya, oka), (xb, yb, okb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(oka, okb)
        assert xa.is_contiguous(memory_format=torch.channels_last)
    train = make_loader(ImageDataset(paths, targets, TrainTransform(S), S, cache=c), 4, True, 2, seed=1)
    assert len(train) == 2, "drop_last when training"
    seen = [int(t) for _, y, _ in train for t in y]
    assert len(set(seen)) == 8 and seen != sorted(seen), "shuffled"
    for x, _, _ in train:
        break  # stopping early (the budget ran out) must not hang the thread pool


def test_collate_keeps_channels_last_and_values():
    imgs = [torch.randint(0, 255, (S, S, 3), dtype=torch.uint8).permute(2, 0, 1) for _ in range(3)]
    x, y, ok = collate_images([(im, torch.tensor(i), torch.tensor(1.0)) for i, im in enumerate(imgs)])
    assert x.shape == (3, 3, S, S) and x.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(x[i], imgs[i]) for i in range(3)) and y.tolist() == [0, 1, 2]


# ----------------------------------------------------------------------------- augmentation
def test_train_augmentation_runs_on_cached_tensors(tmp_path):
    paths, _ = corpus(tmp_path / "img", bad=False)
    c = build_cache(paths, (S, 2.0, 255), tmp_path / "cache")
    x = c.get(0)[0]
    for aug in AUG_LEVELS:
        out = TrainTransform(S, aug=aug)(x)
        assert out.shape == (3, S, S) and out.dtype == torch.uint8
    assert torch.equal(TrainTransform(S, aug="none")(x), x)
    import random
    random.seed(0)
    outs = [TrainTransform(S, aug="light")(x) for _ in range(6)]
    assert any(not torch.equal(o, x) for o in outs) and any(not torch.equal(o, x.flip(-1)) for o in outs)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_batch_augmentations_keep_shape_dtype_and_identity_settings(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 3, 24, 40), generator=g, dtype=torch.uint8).to(dtype)
    for f in (hflip_batch, affine_batch, color_jitter_batch, noise_batch, resized_crop_batch):
        out = f(x, generator=g)
        assert out.shape == x.shape and out.dtype == dtype and 0 <= float(out.min()) <= float(out.max()) <= 255
    assert torch.equal(hflip_batch(x, p=1.0), x.flip(-1)) and torch.equal(hflip_batch(x, p=0.0), x)
    assert torch.equal(noise_batch(x, p=0.0), x)
    assert (resized_crop_batch(x, scale=(1, 1), ratio=(40 / 24, 40 / 24)).float() - x.float()).abs().max() < 0.01
    assert (affine_batch(x, degrees=0, translate=0, scale=(1, 1)).float() - x.float()).abs().max() <= 1
    assert (color_jitter_batch(x, 0, 0, 0).float() - x.float()).abs().max() <= 1
    assert not torch.equal(affine_batch(x, degrees=30, generator=g), x)


def test_mixup_and_cutmix_shapes_and_label_mixing():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 16, 20), generator=g, dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    ok = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    perm = torch.tensor([1, 2, 0, 4, 5, 3])
    for fn in (mixup, cutmix):
        xm, ym, okm = fn(x.float(), labels, num_classes=3, ok=ok, lam=0.7, perm=perm)
        assert xm.shape == x.shape and ym.shape == (6, 3)
        assert torch.allclose(ym.sum(1), torch.ones(6)), "one-hot targets still sum to 1"
        assert torch.equal(okm, ok * ok[perm]), "a mix with an unreadable image is not trained on"
    xm, ym, _ = mixup(x.float(), labels, num_classes=3, lam=0.7, perm=perm)
    assert torch.allclose(xm, 0.7 * x.float() + 0.3 * x[perm].float())
    assert torch.allclose(ym[0], torch.tensor([0.7, 0.3, 0.0]))
    # cutmix: the label weight is the share of pixels that really came from the partner
    xm, ym, _ = cutmix(x, labels, num_classes=3, lam=0.75, perm=perm, generator=g)
    from_partner = ((xm != x).any(1) | (x[perm] == x).all(1))[0].float().mean()
    box = 1 - float(ym[0, 0])
    assert 0 < box < 1 and abs(box - float(from_partner)) < 0.05
    # multi-label: multi-hot targets mix linearly, sums mix the same way
    multi = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.float32)
    _, ym, _ = mixup(x, multi, lam=0.6, perm=perm)
    assert torch.allclose(ym, 0.6 * multi + 0.4 * multi[perm])
    assert torch.allclose(ym.sum(1), 0.6 * multi.sum(1) + 0.4 * multi[perm].sum(1))
    xm, ym, okm = mix_batch(x, labels, num_classes=3, generator=g)
    assert xm.dtype == torch.uint8 and ym.shape == (6, 3) and okm is None
    with pytest.raises(ValueError, match="num_classes"):
        mixup(x, labels)


def test_batch_augment_levels_and_mixing():
    import torch

    from kernelkit.data.transforms import BatchAugment
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    ok = torch.ones(6)
    for level in ("", "flip", "light", "medium", "strong"):
        out, t, o = BatchAugment(level)(x, y, ok)
        assert out.shape == x.shape and out.dtype == torch.float32 and torch.equal(t, y)
        assert 0 <= out.min() and out.max() <= 255
    out, t, o = BatchAugment("", mixup_alpha=0.4, num_classes=3)(x, y, ok)
    assert t.shape == (6, 3) and torch.allclose(t.sum(1), torch.ones(6)), "soft targets sum to one"
    with pytest.raises(ValueError, match="unknown batch augmentation"):
        BatchAugment("wild")


def test_soft_targets_reach_cross_entropy():
    import torch

    from kernelkit.model.losses import ce_loss
    logits, y = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    one_hot = torch.nn.functional.one_hot(y, 3).float()
    w = torch.ones(4)
    torch.testing.assert_close(ce_loss(logits, one_hot, w), ce_loss(logits, y, w))
    cw = [1.0, 2.0, 3.0]
    torch.testing.assert_close(ce_loss(logits, one_hot, w, class_weights=cw), ce_loss(logits, y, w, class_weights=cw))
