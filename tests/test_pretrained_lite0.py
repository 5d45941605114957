"""The offline ImageNet EfficientNet-Lite0 (tests/pretrained.py) is a real pretrained model, and kernel.py
fine-tunes from its timm folder when given only the folder."""
import json

import numpy as np
import torch
from PIL import Image
from pretrained import ARCH, _source_state_dict, convert, lite0_model
from test_kernel import kernel_dir, run_kernel  # noqa: F401  (fixture)

from kernelkit.core.weights import resolve_weights

DAISY = 985  # ImageNet class index


def _as_input(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img.convert("RGB").resize((224, 224), Image.BICUBIC), np.float32) / 255.0
    return ((torch.from_numpy(arr).permute(2, 0, 1) - 0.5) / 0.5)[None]


def test_the_mapping_covers_every_tensor_and_refuses_a_mismatch():
    import timm
    src, dst = _source_state_dict(), timm.create_model(ARCH).state_dict()
    out = convert(src, dst)
    assert list(out) == list(dst) and len(out) == 296
    assert all(torch.equal(a, b) for a, b in zip(src.values(), out.values()))
    shifted = dict(list(dst.items())[1:] + list(dst.items())[:1])
    try:
        convert(src, shifted)
    except ValueError as e:
        assert "does not fit" in str(e)
    else:
        raise AssertionError("a shifted mapping was accepted")


def test_the_converted_weights_classify_a_real_photo():
    from sklearn.datasets import load_sample_image  # a bundled photo of a daisy-like flower, offline
    model = lite0_model()
    with torch.no_grad():
        photo = model(_as_input(Image.fromarray(load_sample_image("flower.jpg"))))
        flat = model(torch.zeros(1, 3, 224, 224))
    assert torch.isfinite(photo).all() and torch.isfinite(flat).all()
    assert int(photo.argmax()) == DAISY
    # a grey frame carries no object: the trained net is far less sure of it than of the photo
    assert photo.softmax(-1).max() > 10 * flat.softmax(-1).max()


def test_the_folder_is_a_timm_weights_folder(lite0_dir):
    cfg = json.loads((lite0_dir / "config.json").read_text())
    assert cfg["architecture"] == ARCH and tuple(cfg["pretrained_cfg"]["mean"]) == (0.5, 0.5, 0.5)
    assert cfg["pretrained_cfg"]["input_size"] == [3, 224, 224]
    src = resolve_weights(lite0_dir)
    assert src.architecture == ARCH and src.file.name == "model.safetensors"


def test_kernel_fine_tunes_from_the_folder_with_model_auto(tmp_path, kernel_dir, lite0_dir, single_label_dir):  # noqa: F811
    out = tmp_path / "out"
    proc = run_kernel(kernel_dir, "--data-dir", str(single_label_dir), "--pretrained-path", str(lite0_dir),
                      "--model", "auto", "--img-size", "64", "--epochs", "1", "--num-workers", "0", "--budget", "4m",
                      "--out-dir", str(out), timeout=480)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "loaded pretrained weights from" in proc.stdout
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert ckpt["config"]["model"] == ARCH and ckpt["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    assert (out / "submission.csv").is_file()
    # frozen_stages auto: the stride-2 and stride-4 stages come back exactly as ImageNet left them,
    # BatchNorm statistics included; the rest fine-tuned
    assert "frozen for the whole run: the stem and the stages at stride <= 4" in proc.stdout
    imagenet, tuned = lite0_model().state_dict(), ckpt["model"]
    early = [k for k in imagenet if k.startswith(("conv_stem.", "bn1.", "blocks.0.", "blocks.1."))]
    assert any(k.endswith("running_var") for k in early)
    assert all(torch.equal(imagenet[k], tuned[k]) for k in early)
    # a trained stage's statistics follow these images (a tiny run's one step may be at LR ~0: weights can stay)
    assert not torch.equal(imagenet["blocks.6.0.bn1.running_mean"], tuned["blocks.6.0.bn1.running_mean"])
