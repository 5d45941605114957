import numpy as np
import pytest
from PIL import Image

from kernelkit.data.images import BadImage, load_rgb
from kernelkit.data.transforms import EvalTransform, TrainTransform, resize_or_pad, tta_views


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    img = Image.new("RGB", (20, 10), (200, 100, 50)).convert(mode)
    ext = ".jpg" if mode in ("L", "CMYK") else ".png"
    img.save(tmp_path / f"x{ext}")
    out = load_rgb(str(tmp_path / f"x{ext}"))
    assert out.mode == "RGB" and out.size == (20, 10)


def test_transparent_pixels_become_fill(tmp_path):
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "a.png")
    assert load_rgb(str(tmp_path / "a.png"), fill=255).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_keeps_contrast(tmp_path):
    arr = np.array([[0, 65535]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "g.png")
    out = np.asarray(load_rgb(str(tmp_path / "g.png")))
    assert out[0, 0, 0] == 0 and out[0, 1, 0] == 255


@pytest.mark.parametrize("content", [b"", b"not an image at all", None])
def test_bad_files_raise_bad_image_naming_the_file(tmp_path, content):
    path = tmp_path / "bad.jpg"
    if content is None:  # truncated JPEG
        Image.new("RGB", (64, 64), (1, 2, 3)).save(path)
        path.write_bytes(path.read_bytes()[:100])
    else:
        path.write_bytes(content)
    with pytest.raises(BadImage, match="bad.jpg"):
        load_rgb(str(path))
    with pytest.raises(BadImage, match="missing"):
        load_rgb("")


def test_resize_or_pad_pads_strips_and_stretches_normal_images():
    strip = Image.new("RGB", (400, 40), (0, 0, 0))
    out = np.asarray(resize_or_pad(strip, 64, pad_aspect=2.0, fill=255))
    assert out.shape == (64, 64, 3)
    assert (out[0] == 255).all() and (out[32] == 0).all(), "padding above, content in the middle"
    normal = np.asarray(resize_or_pad(Image.new("RGB", (90, 60), (0, 0, 0)), 64))
    assert normal.shape == (64, 64, 3) and (normal == 0).all()
    stretched = np.asarray(resize_or_pad(strip, 64, pad_aspect=0))
    assert (stretched == 0).all()


def test_transforms_give_uint8_chw_and_eval_is_deterministic():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    ev = EvalTransform(32)
    a, b = ev(img), ev(img)
    assert a.shape == (3, 32, 32) and a.dtype.is_floating_point is False and (a == b).all()
    for aug in ("none", "flip", "light"):
        assert TrainTransform(32, aug=aug)(img).shape == (3, 32, 32)
    with pytest.raises(ValueError):
        TrainTransform(32, aug="heavy")


def test_tta_views():
    import torch
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    ident, hflip = tta_views(2)
    assert torch.equal(ident(x), x) and torch.equal(hflip(x)[..., 0], x[..., -1])
    assert len(tta_views(4)) == 4
    with pytest.raises(ValueError):
        tta_views(0)
