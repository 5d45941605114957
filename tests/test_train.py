import math
import time

import numpy as np
import torch

from kernelkit.budget import BudgetClock, InferenceReserve
from kernelkit.competition import load_competition
from kernelkit.data import ImageDataset, make_loader, split_indices
from kernelkit.losses import get_loss
from kernelkit.models import create_model
from kernelkit.train import FitOptions, fit
from kernelkit.transforms import EvalTransform, TrainTransform


def _setup(data_dir, size=32, batch=16):
    torch.manual_seed(0)
    comp = load_competition(data_dir)
    tr, va = split_indices(comp.train_targets, 0.25, seed=0)
    paths = comp.train_paths
    train = ImageDataset([paths[i] for i in tr], comp.train_targets[tr], TrainTransform(size, aug="flip"), size)
    val = ImageDataset([paths[i] for i in va], comp.train_targets[va], EvalTransform(size), size)
    model = create_model("test_resnet", comp.num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    return comp, make_loader(train, batch, True, 0), make_loader(val, 32, False, 0), comp.train_targets[va], model, opt, scaler


def test_fixed_epochs_learn_single_label_and_save_checkpoints(single_label_dir, tmp_path):
    comp, tl, vl, vt, model, opt, scaler = _setup(single_label_dir)
    out = tmp_path / "out"
    out.mkdir()
    clock = BudgetClock(600)
    result = fit(model, tl, vl, vt, task=comp.task, loss_fn=get_loss("auto", comp.task), optimizer=opt,
                 scaler=scaler, device=torch.device("cpu"), clock=clock, reserve=InferenceReserve(12, len(vt), 2),
                 opts=FitOptions(lr=3e-3, epochs=8), out_dir=out, extra={"classes": comp.classes})
    assert result["stop_reason"] == "epochs" and len(result["history"]) == 8
    assert result["state"].best_score >= 0.8, result["history"]  # chance is 1/3
    assert result["history"][-1]["train_loss"] < result["history"][0]["train_loss"]
    assert result["state"].progress == 15 / 16 and opt.param_groups[0]["lr"] < 3e-3 * 0.1
    assert {p.name for p in out.iterdir()} == {"best.pt", "last.pt", "history.csv", "val_probs.npy"}


def test_multilabel_threshold_is_searched(multilabel_dir, tmp_path):
    comp, tl, vl, vt, model, opt, scaler = _setup(multilabel_dir)
    result = fit(model, tl, vl, vt, task=comp.task, loss_fn=get_loss("auto", comp.task), optimizer=opt,
                 scaler=scaler, device=torch.device("cpu"), clock=BudgetClock(600),
                 reserve=InferenceReserve(12, len(vt), 2), opts=FitOptions(lr=3e-3, epochs=2), out_dir=tmp_path)
    row = result["history"][-1]
    assert 0 < row["threshold"] < 1 and 0 <= row["val_score"] <= 1


def test_budget_stops_training_mid_epoch_with_lr_near_zero(single_label_dir, tmp_path):
    comp, tl, vl, vt, model, opt, scaler = _setup(single_label_dir, batch=2)
    reserve = InferenceReserve(12, len(vt), 2, overhead_s=0.0)
    reserve.startup_s = 0.0
    clock = BudgetClock(3.0, 0.0)
    t0 = time.time()
    result = fit(model, tl, vl, vt, task=comp.task, loss_fn=get_loss("auto", comp.task), optimizer=opt,
                 scaler=scaler, device=torch.device("cpu"), clock=clock, reserve=reserve,
                 opts=FitOptions(lr=1e-3, warmup=0.1), out_dir=tmp_path)
    assert result["stop_reason"] == "budget"
    assert time.time() - t0 < 5.0, "training must stop at the deadline, not run on"
    assert result["state"].progress > 0.8
    # the last step taken was late in the decay (how late depends on the step time of a busy machine)
    assert opt.param_groups[0]["lr"] < 0.5e-3
    assert (tmp_path / "last.pt").is_file()


def test_nonfinite_loss_skips_the_update(single_label_dir, tmp_path):
    comp, tl, vl, vt, model, opt, scaler = _setup(single_label_dir)
    calls = {"n": 0}
    ce = get_loss("ce", "multiclass")

    def sometimes_nan(logits, y, ok):
        calls["n"] += 1
        return ce(logits, y, ok) * (math.nan if calls["n"] == 2 else 1.0)

    result = fit(model, tl, vl, vt, task=comp.task, loss_fn=sometimes_nan, optimizer=opt, scaler=scaler,
                 device=torch.device("cpu"), clock=BudgetClock(600), reserve=InferenceReserve(12, len(vt), 2),
                 opts=FitOptions(epochs=1), out_dir=tmp_path)
    assert result["state"].nonfinite_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_unreadable_training_images_are_skipped_and_counted(single_label_dir, tmp_path):
    (single_label_dir / "train" / "tr0000.jpg").write_bytes(b"")
    (single_label_dir / "train" / "tr0005.jpg").write_bytes(b"GIF89a garbage")
    comp = load_competition(single_label_dir)
    ds = ImageDataset(comp.train_paths, comp.train_targets, EvalTransform(32), 32)
    oks = np.array([float(ds[i][2]) for i in range(len(ds))])
    assert oks.sum() == len(ds) - 2 and oks[0] == 0 and oks[5] == 0


def test_clip_grad_clips_every_step(single_label_dir, tmp_path, monkeypatch):
    comp, tl, vl, vt, model, opt, scaler = _setup(single_label_dir)
    norms = []
    real = torch.nn.utils.clip_grad_norm_

    def recording(params, max_norm, *a, **k):
        total = real(params, max_norm, *a, **k)
        norms.append((float(total), max_norm))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    fit(model, tl, vl, vt, task=comp.task, loss_fn=get_loss("ce", comp.task), optimizer=opt, scaler=scaler,
        device=torch.device("cpu"), clock=BudgetClock(600), reserve=InferenceReserve(12, len(vt), 2),
        opts=FitOptions(epochs=1, clip_grad=0.5), out_dir=tmp_path)
    assert len(norms) == len(tl) and all(m == 0.5 for _, m in norms)
    after = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).norm()
    assert after <= 0.5 + 1e-4, "the gradient the optimizer used was clipped"
