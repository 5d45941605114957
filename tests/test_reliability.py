"""Issue 5: faults and bad input lose nothing."""
import errno
import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY
from PIL import Image
from test_train import _setup, run_fit

import kernelkit.engine.checkpoint as checkpoint_module
from kernelkit.app.cli import main
from kernelkit.engine.budget import BudgetClock, InferenceReserve
from kernelkit.engine.checkpoint import load_checkpoint
from kernelkit.engine.trainer import FitOptions, OutOfMemory
from kernelkit.model.losses import get_loss


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_gradient(single_label_dir, tmp_path):
    comp, tl, vl, vt, model, opt, scaler = _setup(single_label_dir)
    real_forward = model.forward
    sizes = []

    def forward_that_fits_8(x):
        sizes.append(len(x))
        if len(x) > 8:
            raise OutOfMemory("CUDA out of memory (simulated)")
        return real_forward(x)

    model.forward = forward_that_fits_8
    result = run_fit(model, tl, vl, vt, task=comp.task, loss_fn=get_loss("ce", comp.task), optimizer=opt, scaler=scaler,
                 device=torch.device("cpu"), clock=BudgetClock(600), reserve=InferenceReserve(12, len(vt), 2),
                 opts=FitOptions(epochs=2), out_dir=tmp_path)
    state = result.state
    assert state.micro_batches == 2 and state.step == 2 * len(tl)
    assert sizes.count(16) == 1, "after the first failure no training batch of 16 is tried again"
    assert result.history[-1]["val_score"] is not None, "validation split its batch of 15 too"
    assert all(np.isfinite(r["train_loss"]) for r in result.history)


def test_micro_batches_give_the_full_batch_gradient(single_label_dir):
    from kernelkit.engine.budget import BudgetClock
    from kernelkit.engine.trainer import FitState, Trainer, TrainParts
    comp, tl, vl, vt, model, opt, scaler = _setup(single_label_dir)
    model.eval()  # no batch-norm statistics in play: the two gradients must match exactly
    x, y, ok = next(iter(tl))
    ok[3] = 0
    from kernelkit.data.transforms import IMAGENET, normalize
    x = normalize(x, False, IMAGENET)
    grads = []
    for pieces in (1, 4):
        trainer = Trainer(TrainParts(model, opt, scaler, get_loss("ce", "multiclass")), FitOptions(),
                          BudgetClock(600), InferenceReserve(1, 1, 1), torch.device("cpu"),
                          state=FitState(micro_batches=pieces))
        loss = trainer.forward_backward(x, y, ok)
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# torch.save raises RuntimeError (not OSError) when the disk fills mid-write: both must be survived.
DISK_FULL = [OSError(errno.ENOSPC, "No space left on device"),
             RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                          "data/3: file write failed")]


@pytest.mark.parametrize("error", DISK_FULL, ids=["OSError", "RuntimeError"])
def test_disk_full_while_saving_keeps_the_previous_checkpoint_and_training_goes_on(
        multilabel_dir, tmp_path, monkeypatch, error):
    out = tmp_path / "out"
    real_save = torch.save
    calls = {"n": 0}

    def save_until_disk_full(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] > 2:  # two writes succeed (which ones is the writer queue's business), then the disk is full
            f.write(b"partial")
            raise error
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(checkpoint_module.torch, "save", save_until_disk_full)
    status = main({}, [*TINY, "--data-dir", str(multilabel_dir), "--out-dir", str(out), "--epochs", "3",
                       "--budget", "5m"])
    assert status == 0
    kept = [p for p in (out / "best.pt", out / "last.pt") if p.is_file()]
    assert kept and all(load_checkpoint(p)["epoch"] >= 1 for p in kept), "the last good checkpoints are intact"
    assert not list(out.glob(".*.tmp*")), "the partial file is removed"
    assert len(pd.read_csv(out / "history.csv")) == 3, "training went on after the failed saves"
    assert len(pd.read_csv(out / "submission.csv")) == 12
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed_saves"] >= 3 and summary["epochs"] == 3 and summary["exit_status"] == 0


def _bad_images(folder, names):
    """The zoo of files that break naive pipelines, by name."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    (folder / names[0]).write_bytes(b"")  # zero bytes
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / names[1])
    (folder / names[1]).write_bytes((folder / names[1]).read_bytes()[:300])  # truncated JPEG
    (folder / names[2]).write_text("id,label\nthis is not an image\n")  # text file named .jpg
    Image.new("P", (40, 30), 3).save(folder / names[3].replace(".jpg", ".png"))  # palette PNG
    Image.new("RGBA", (40, 30), (255, 0, 0, 0)).save(folder / names[4].replace(".jpg", ".png"))  # alpha
    Image.fromarray(np.full((30, 40), 40000, np.uint16)).save(folder / names[5].replace(".jpg", ".png"))  # 16-bit
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(folder / names[6])  # CMYK JPEG
    Image.new("RGB", (1, 4000), (0, 0, 255)).save(folder / names[7].replace(".jpg", ".png"))  # 1 x 4000 strip
    # names[8]: listed in the CSV, no file on disk


def test_bad_images_in_train_and_test_lose_no_row(single_label_dir, tmp_path):
    train_names = [f"bad{i}.jpg" for i in range(9)]
    test_names = [f"tbad{i}.jpg" for i in range(9)]
    _bad_images(single_label_dir / "train", train_names)
    _bad_images(single_label_dir / "test", test_names)
    df = pd.read_csv(single_label_dir / "train.csv", dtype=str)
    extra = pd.DataFrame({"id": [n.split(".")[0] for n in train_names], "category_id": "10"})
    pd.concat([df, extra]).to_csv(single_label_dir / "train.csv", index=False)
    sample = pd.read_csv(single_label_dir / "sample_submission.csv", dtype=str)
    sample = pd.concat([sample, pd.DataFrame({"id": [n.split(".")[0] for n in test_names], "predicted": "0"})])
    sample.to_csv(single_label_dir / "sample_submission.csv", index=False)

    out = tmp_path / "out"
    # batch 17 divides the 68 readable-or-not training images: no batch is dropped, each file is seen every epoch
    status = main({}, [*TINY, "--data-dir", str(single_label_dir), "--out-dir", str(out), "--epochs", "2",
                       "--budget", "5m", "--val-fraction", "0", "--batch-size", "17"])
    assert status == 0
    sub = pd.read_csv(out / "submission.csv", dtype=str)
    assert sub.id.tolist() == sample.id.tolist() and sub.predicted.notna().all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_images"] == 60 + 8, "the id without a file is dropped, the rest are kept"
    assert summary["bad_train_images"] == 3 * 2, "zero-byte, truncated and text files skipped every epoch"


@pytest.mark.parametrize("content,match", [
    ("id,category_id\nok1,1\nok1,2\n", "duplicated"),
    ("\ufeffid,category_id\n  a1 , 1 \n", None),  # BOM and whitespace are tolerated
    ("id\na1\n", "two columns"),
    ("id,category_id\na1,\n", "row 2: empty label"),
    ("id,category_id\n../../etc/passwd,1\n", "row 2.*path"),
])
def test_bad_single_label_csvs(tmp_path, content, match):
    from kernelkit.inputs.competition import load_competition
    (tmp_path / "train").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "a1.jpg")
    (tmp_path / "train.csv").write_text(content, encoding="utf-8")
    if match is None:
        comp = load_competition(tmp_path, "single_label_csv")
        assert comp.train_paths[0].endswith("a1.jpg") and comp.classes == ["1"]
    else:
        with pytest.raises(ValueError, match=match):
            load_competition(tmp_path, "single_label_csv")


@pytest.mark.parametrize("content,match", [
    ("id,attribute_ids\nx1,1 2\nx1,3\n", "duplicated"),
    ("id\nx1\n", "two columns"),
    ("id,attribute_ids\nx1,7\n", "row 2: label '7'"),
])
def test_bad_multilabel_csvs(tmp_path, content, match):
    from kernelkit.inputs.competition import load_competition
    (tmp_path / "train").mkdir()
    (tmp_path / "train.csv").write_text(content)
    pd.DataFrame({"attribute_id": [1, 2, 3], "attribute_name": ["a", "b", "c"]}).to_csv(
        tmp_path / "labels.csv", index=False)
    with pytest.raises(ValueError, match=match):
        load_competition(tmp_path, "multilabel_csv")


def test_a_crash_after_training_started_with_model_auto_is_rescued_from_best_pt(
        single_label_dir, tmp_path, monkeypatch, tiny_auto):
    """Issue 21: with model=auto the job runs on autopick's copy of the run context. An error that
    escapes the job after training started is a bug, not the user's setting: the run predicts from
    best.pt and exits 0 instead of refusing (exit 2) with nothing submitted."""
    import kernelkit.app.train_job as train_job

    def finish_that_fails(*args, **kwargs):
        raise ValueError("a bug after training")

    monkeypatch.setattr(train_job, "finish", finish_that_fails)
    out = tmp_path / "out"
    status = main({}, [*tiny_auto, "--data-dir", str(single_label_dir), "--out-dir", str(out), "--epochs", "1",
                       "--budget", "2m", "--tta", "1"])
    assert status == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rescued"] is True and summary["checkpoints"][0]["checkpoint"] == str(out / "best.pt")
    sub = pd.read_csv(out / "submission.csv")
    assert len(sub) == len(pd.read_csv(single_label_dir / "sample_submission.csv"))


def test_prediction_out_of_memory_splits_the_batch_once_for_every_batch_after(monkeypatch):
    """A test batch that does not fit is split in halves until it does, and the batches after it start
    at that split: one out-of-memory for the run, not one (and an empty_cache) per batch."""
    from kernelkit.data.transforms import IMAGENET
    from kernelkit.engine.evaluate import predict
    sizes = []

    class FitsFour(torch.nn.Module):
        def forward(self, x):
            sizes.append(len(x))
            if len(x) > 4:
                raise OutOfMemory("CUDA out of memory (simulated)")
            return x.mean((2, 3))[:, :2]

    images = torch.randint(0, 255, (30, 3, 8, 8), dtype=torch.uint8)
    loader = [(images[i:i + 10], torch.zeros(10), torch.ones(10)) for i in range(0, 30, 10)]
    out = predict(FitsFour(), loader, torch.device("cpu"), "multilabel", amp=False, pre=IMAGENET)
    assert out["probs"].shape == (30, 2) and out["ok"].all()
    # the first batch: 10 and 5 do not fit, 4 pieces of 3, 3, 3, 1 do; the next two start at 4 pieces
    assert sizes == [10, 5] + [3, 3, 3, 1] * 3, sizes
