import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

PALETTE = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 220, 30), (200, 40, 220)]


def colour_image(cls: int, rng: np.random.Generator, size=(40, 32)) -> Image.Image:
    """An image whose colour tells its class, so tiny models can learn it in seconds."""
    base = np.array(PALETTE[cls % len(PALETTE)], np.int16)
    arr = np.clip(base + rng.integers(-30, 31, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def make_single_label_csv(root: Path, n_train=60, n_test=12, n_classes=3, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    rows = []
    for i in range(n_train):
        c = i % n_classes
        colour_image(c, rng).save(root / "train" / f"tr{i:04d}.jpg")
        rows.append((f"tr{i:04d}", str(10 + c)))
    pd.DataFrame(rows, columns=["id", "category_id"]).to_csv(root / "train.csv", index=False)
    ids = [f"te{i:04d}" for i in range(n_test)]
    for i, t in enumerate(ids):
        colour_image(i % n_classes, rng).save(root / "test" / f"{t}.jpg")
    pd.DataFrame({"id": ids, "predicted": "0"}).to_csv(root / "sample_submission.csv", index=False)
    return root


def make_folder(root: Path, n_per_class=15, n_test=9, classes=("beach", "forest", "highway"), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for k, c in enumerate(classes):
        (root / "train" / c).mkdir(parents=True)
        for i in range(n_per_class):
            colour_image(k, rng).save(root / "train" / c / f"{c}_{i}.jpg")
    (root / "test").mkdir()
    for i in range(n_test):
        colour_image(i % len(classes), rng).save(root / "test" / f"img{i:03d}.jpg")
    return root


def make_multilabel_csv(root: Path, n_train=60, n_test=12, n_labels=4, seed=0) -> Path:
    """iMet layout. Label k present -> a coloured square in quadrant k; some images have none."""
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()

    def draw(labels):
        arr = np.full((32, 48, 3), 128, np.uint8)
        for k in labels:
            y, x = divmod(k, 2)
            arr[y * 16:(y + 1) * 16, x * 24:(x + 1) * 24] = PALETTE[k % len(PALETTE)]
        return Image.fromarray(arr)

    rows = []
    for i in range(n_train):
        labels = [k for k in range(n_labels) if rng.random() < 0.4]
        draw(labels).save(root / "train" / f"{i:08x}.png")
        rows.append((f"{i:08x}", " ".join(map(str, labels))))
    pd.DataFrame(rows, columns=["id", "attribute_ids"]).to_csv(root / "train.csv", index=False)
    pd.DataFrame({"attribute_id": range(n_labels),
                  "attribute_name": [f"tag::t{k}" for k in range(n_labels)]}).to_csv(root / "labels.csv", index=False)
    ids = [f"f{i:07x}" for i in range(n_test)]
    for t in ids:
        draw([k for k in range(n_labels) if rng.random() < 0.4]).save(root / "test" / f"{t}.png")
    pd.DataFrame({"id": ids, "attribute_ids": "0"}).to_csv(root / "sample_submission.csv", index=False)
    return root


@pytest.fixture(autouse=True)
def disk_margin_off(monkeypatch):
    """The image cache leaves 1 GiB of disk free for a run's checkpoints; the suite's caches are a few
    MB, so they are built on a nearly full disk too (CI once ran with under 1 GiB free). The kernel
    subprocesses keep the margin; test_trust covers a disk with no room at all."""
    from kernelkit.data import cache
    monkeypatch.setattr(cache, "FREE_DISK_MARGIN", 0)


@pytest.fixture
def single_label_dir(tmp_path):
    return make_single_label_csv(tmp_path / "inat")


@pytest.fixture
def folder_dir(tmp_path):
    return make_folder(tmp_path / "scene")


@pytest.fixture
def multilabel_dir(tmp_path):
    return make_multilabel_csv(tmp_path / "imet")


# The tiny run most end-to-end tests share: a random-init timm test model at 32 px, in-process
# loading (workers are exercised by the kernel's own subprocess tests).
TINY_MODEL = ["--model", "test_resnet", "--img-size", "32", "--batch-size", "16", "--lr", "3e-3"]
TINY = [*TINY_MODEL, "--num-workers", "0"]
# The same run with model and img_size left at 'auto' (the defaults): autopick times the ladder.
TINY_AUTO = ["--batch-size", "16", "--num-workers", "0"]


@pytest.fixture
def tiny_ladder(monkeypatch):
    """autopick's ladder cut down to two tiny models and three sizes, so 'auto' measures in seconds."""
    from kernelkit.build import autopick
    monkeypatch.setattr(autopick, "CPU_MODELS", (("test_resnet", 0.01), ("test_convnext", 0.02)))
    monkeypatch.setattr(autopick, "CPU_SIZES", (32, 48, 64))


@pytest.fixture
def tiny_auto(tiny_ladder):
    return list(TINY_AUTO)


@pytest.fixture(scope="session")
def lite0_dir(tmp_path_factory) -> Path:
    """Real ImageNet EfficientNet-Lite0 as a timm weights folder (tests/pretrained.py), written once."""
    from pretrained import lite0_folder
    return lite0_folder(tmp_path_factory.mktemp("weights") / "tf_efficientnet_lite0")
