"""/kaggle/input as users really attach things: the competition is found, or the run is refused.

Each tree is built the way Kaggle mounts it: classic /kaggle/input/<slug>, newer
/kaggle/input/competitions/<slug> (sometimes one folder deeper), /kaggle/input/datasets/<owner>/<slug>,
Kaggle Models under <model>/pytorch/<variation>/<version>/, pre-resized copies and earlier outputs.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, colour_image, make_single_label_csv

from kernelkit.core.config import ConfigError
from kernelkit.inputs.competition import load_competition
from kernelkit.inputs.discovery import find_competition


def comp(path: Path) -> Path:
    """A small competition (train.csv, train/, test/, sample_submission.csv)."""
    return make_single_label_csv(path, n_train=6, n_test=3)


def train_only(path: Path) -> Path:
    """A pre-resized copy of the training images: train/ and nothing to predict."""
    (path / "train").mkdir(parents=True)
    colour_image(0, np.random.default_rng(0)).save(path / "train" / "a.jpg")
    return path


def weights_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"architecture": "resnet18"}')
    (path / "model.safetensors").write_bytes(b"")
    return path


def test_classic_layout(tmp_path):
    c = comp(tmp_path / "imet-2019-fgvc6")
    weights_folder(tmp_path / "convnext" / "pytorch" / "default" / "1")
    assert find_competition(tmp_path, on_kaggle=True) == c


def test_competitions_folder_wins_over_a_decoy_that_sorts_first(tmp_path):
    comp(tmp_path / "aaa-imet-resized")  # a full copy of a competition, attached as a dataset
    train_only(tmp_path / "aab-resized-train")
    c = comp(tmp_path / "competitions" / "imet-2019-fgvc6")
    assert find_competition(tmp_path, on_kaggle=True) == c


def test_competition_nested_one_folder_deeper(tmp_path):
    c = comp(tmp_path / "competitions" / "imet-2019-fgvc6" / "data")
    assert find_competition(tmp_path, on_kaggle=True) == c


def test_dataset_under_owner_slug(tmp_path):
    c = comp(tmp_path / "datasets" / "alice" / "scene-15")
    weights_folder(tmp_path / "datasets" / "bob" / "timm-resnet18")
    assert find_competition(tmp_path, on_kaggle=True) == c


def test_a_train_only_decoy_is_not_a_competition(tmp_path):
    train_only(tmp_path / "a-resized")
    c = comp(tmp_path / "the-competition")
    assert find_competition(tmp_path, on_kaggle=True) == c


def test_an_earlier_output_with_demo_data_is_never_taken(tmp_path):
    comp(tmp_path / "my-earlier-run" / "demo_data")
    (tmp_path / "my-earlier-run" / "submission.csv").write_text("id,predicted\n")
    with pytest.raises(ConfigError, match="never runs on Kaggle") as e:
        find_competition(tmp_path, on_kaggle=True)
    assert "my-earlier-run" in str(e.value)  # the listing shows what was attached
    assert find_competition(tmp_path, on_kaggle=False) is None  # locally: the demo


def test_two_equally_good_candidates_are_refused_by_name(tmp_path):
    a, b = comp(tmp_path / "copy-a"), comp(tmp_path / "copy-b")
    with pytest.raises(ConfigError, match="several attached folders") as e:
        find_competition(tmp_path, on_kaggle=True)
    assert str(a) in str(e.value) and str(b) in str(e.value) and "data_dir" in str(e.value)


def test_nothing_attached(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        find_competition(tmp_path / "missing", on_kaggle=True)
    assert find_competition(tmp_path / "missing", on_kaggle=False) is None
    weights_folder(tmp_path / "only-weights")
    with pytest.raises(ConfigError, match="only-weights"):
        find_competition(tmp_path, on_kaggle=True)


def test_image_folders_are_not_walked(tmp_path, monkeypatch):
    """A folder with thousands of images is data, not a folder of datasets: the scan stays fast."""
    import kernelkit.inputs.discovery as inputs
    monkeypatch.setattr(inputs, "MAX_ENTRIES", 5)
    big = tmp_path / "pile"
    for i in range(8):
        (big / f"d{i}").mkdir(parents=True)
    comp(big / "d0" / "comp")  # would be found if the scan walked into the pile
    assert find_competition(tmp_path, on_kaggle=False) is None


def run_kernel(tmp_path: Path, input_root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KERNELKIT_INPUT_ROOT": str(input_root), "KAGGLE_KERNEL_RUN_TYPE": "Batch"}
    return subprocess.run([sys.executable, str(ROOT / "kernel.py"), "--out-dir", str(tmp_path / "out"), *args],
                          env=env, capture_output=True, text=True, timeout=120)


def test_kernel_on_kaggle_with_no_competition_refuses_instead_of_running_the_demo(tmp_path):
    root = tmp_path / "input"
    comp(root / "earlier-output" / "demo_data")
    r = run_kernel(tmp_path, root)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "no competition found" in r.stderr and "earlier-output" in r.stderr
    assert not (tmp_path / "out" / "demo_data").exists() and not (tmp_path / "out" / "submission.csv").exists()


def test_kernel_on_kaggle_refuses_an_ambiguous_choice(tmp_path):
    root = tmp_path / "input"
    comp(root / "copy-a")
    comp(root / "copy-b")
    r = run_kernel(tmp_path, root)
    assert r.returncode == 2 and "several attached folders" in r.stderr


# --- layouts beyond train/ and test/ ---------------------------------------------------------------

def cassava_like(root: Path, n=6) -> Path:
    """train_images/ + test_images/, ids carrying the extension, label column `label`, a sample whose
    id column is `image_id`."""
    rng = np.random.default_rng(0)
    (root / "train_images").mkdir(parents=True)
    (root / "test_images").mkdir()
    rows = []
    for i in range(n):
        colour_image(i % 2, rng).save(root / "train_images" / f"{1000 + i}.jpg")
        rows.append((f"{1000 + i}.jpg", i % 2))
    pd.DataFrame(rows, columns=["image_id", "label"]).to_csv(root / "train.csv", index=False)
    colour_image(0, rng).save(root / "test_images" / "2216849948.jpg")
    pd.DataFrame({"image_id": ["2216849948.jpg"], "label": [4]}).to_csv(root / "sample_submission.csv", index=False)
    return root


def test_train_images_and_test_images_folders_are_detected(tmp_path):
    c = load_competition(cassava_like(tmp_path / "cassava"))
    assert len(c.train_paths) == 6 and all("train_images" in p for p in c.train_paths)
    assert c.test_ids == ["2216849948.jpg"] and "test_images" in c.test_paths[0]
    assert c.id_column == "image_id" and c.pred_column == "label" and c.classes == ["0", "1"]
    assert find_competition(tmp_path, on_kaggle=True) == tmp_path / "cassava"


def test_two_training_folders_are_refused_unless_named(tmp_path):
    root = cassava_like(tmp_path / "c")
    (root / "train").mkdir()
    with pytest.raises(ValueError, match="several image folders .*train_images="):
        load_competition(root)
    assert len(load_competition(root, train_images="train_images").train_paths) == 6
    with pytest.raises(FileNotFoundError, match="train_images='nope'"):
        load_competition(root, train_images="nope")


def test_a_stem_shared_by_two_files_is_refused_unless_image_ext_says_which(tmp_path):
    root = make_single_label_csv(tmp_path / "d", n_train=6, n_test=3)
    rng = np.random.default_rng(1)
    colour_image(2, rng).save(root / "train" / "tr0001.png")  # tr0001.jpg exists too
    with pytest.raises(ValueError, match="tr0001.*image_ext="):
        load_competition(root)
    c = load_competition(root, image_ext=".jpg")
    assert all(p.endswith(".jpg") for p in c.train_paths) and len(c.train_paths) == 6
    c = load_competition(root, image_ext=".png")
    assert c.train_paths == [str(root / "train" / "tr0001.png")]  # the others are missing, and logged


def test_image_ext_is_a_checked_choice():
    from kernelkit.core.options import make_config
    with pytest.raises(SystemExit):
        make_config(None, ["--image-ext", "jpg"])  # argparse: not one of the choices (".jpg")
    with pytest.raises(ConfigError, match="image_ext"):
        make_config({"image_ext": "jpeg"}, [])
