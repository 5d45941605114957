import math

import numpy as np
import torch

from kernelkit.build.assemble import build_training_data
from kernelkit.build.components import build_parts
from kernelkit.core.checks import checked_config
from kernelkit.data.loaders import ImageDataset
from kernelkit.data.transforms import EvalTransform
from kernelkit.engine.budget import BudgetClock, InferenceReserve
from kernelkit.engine.checkpoint import Checkpointer
from kernelkit.engine.trainer import FitOptions, Trainer, TrainParts, Validation
from kernelkit.inputs.competition import load_competition
from kernelkit.model.losses import get_loss


def run_fit(model, tl, vl, vt, *, task, loss_fn, optimizer, scaler, device, clock, reserve, opts, out_dir,
            ema=None, dist=None):
    """The library's Trainer as the train job drives it, with checkpoints in out_dir."""
    parts = TrainParts(model, optimizer, scaler, loss_fn, ema)
    saver = Checkpointer(out_dir, {"task": task})
    trainer = Trainer(parts, opts, clock, reserve, device, saver)
    result = trainer.fit(tl, Validation(vl, vt, task) if vl is not None else None)
    saver.flush()  # as the train job does before reading a checkpoint back
    return result


def _setup(data_dir, size=32, batch=16):
    """A tiny run's loaders, model, optimizer and scaler, made by the factories the train job uses
    (build.assemble, build.components) from a checked config, not wired by hand."""
    torch.manual_seed(0)
    comp = load_competition(data_dir)
    cfg = checked_config({"model": "test_resnet", "img_size": size, "batch_size": batch, "lr": 3e-3, "weight_decay": 0.01,
                          "aug": "flip", "val_fraction": 0.25, "seed": 0, "num_workers": 0, "cache_images": False,
                          "channels_last": False})
    device = torch.device("cpu")
    data = build_training_data(cfg, comp, device)
    parts = build_parts(cfg, comp.task, comp.num_classes, data.train_targets, device, data.gpu_aug)
    return comp, data.train_loader, data.val_loader, data.val_targets, parts.model, parts.optimizer, parts.scaler


def test_fixed_epochs_learn_single_label_and_save_checkpoints(single_label_dir, tmp_path):
    comp, tl, vl, vt, model, opt, scaler = _setup(single_label_dir)
    out = tmp_path / "out"
    out.mkdir()
    clock = BudgetClock(600)
    result = run_fit(model, tl, vl, vt, task=comp.task, loss_fn=get_loss("auto", comp.task), optimizer=opt,
                 scaler=scaler, device=torch.device("cpu"), clock=clock, reserve=InferenceReserve(12, len(vt), 2),
                 opts=FitOptions(lr=3e-3, epochs=8), out_dir=out)
    assert result.stop_reason == "epochs" and len(result.history) == 8
    assert result.state.best_score >= 0.8, result.history  # chance is 1/3
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.state.progress == 15 / 16 and opt.param_groups[0]["lr"] < 3e-3 * 0.1
    assert {p.name for p in out.iterdir()} == {"best.pt", "last.pt"}, "results come back in memory, not as files"
    assert result.best_val_probs.shape == (len(vt), comp.num_classes)


def test_multilabel_threshold_is_searched(multilabel_dir, tmp_path):
    comp, tl, vl, vt, model, opt, scaler = _setup(multilabel_dir)
    result = run_fit(model, tl, vl, vt, task=comp.task, loss_fn=get_loss("auto", comp.task), optimizer=opt,
                 scaler=scaler, device=torch.device("cpu"), clock=BudgetClock(600),
                 reserve=InferenceReserve(12, len(vt), 2), opts=FitOptions(lr=3e-3, epochs=2), out_dir=tmp_path)
    row = result.history[-1]
    assert 0 < row["threshold"] < 1 and 0 <= row["val_score"] <= 1


def test_budget_stops_training_mid_epoch_with_lr_near_zero(single_label_dir, tmp_path):
    comp, tl, vl, vt, model, opt, scaler = _setup(single_label_dir, batch=2)
    reserve = InferenceReserve(12, len(vt), 2, overhead_s=0.0)
    reserve.startup_s = 0.0
    clock = BudgetClock(3.0, 0.0)
    result = run_fit(model, tl, vl, vt, task=comp.task, loss_fn=get_loss("auto", comp.task), optimizer=opt,
                 scaler=scaler, device=torch.device("cpu"), clock=clock, reserve=reserve,
                 opts=FitOptions(lr=1e-3, warmup=0.1), out_dir=tmp_path)
    assert result.stop_reason == "budget"
    assert result.history[-1]["train_images"] < len(tl.dataset), "stopped mid-epoch"
    # Relations, not speeds: the schedule (a function of time) was near its end when the clock
    # stopped training, the LR was decaying, and the stop came at the deadline, not a step later.
    assert result.state.progress > 0.8 and opt.param_groups[0]["lr"] < 1e-3
    # When training stopped, by the clock itself; the epoch's validation after it runs at the speed of
    # a (possibly busy) machine, and is the inference reserve's business.
    assert result.history[-1]["elapsed_s"] < clock.total_s + 2.0
    assert (tmp_path / "last.pt").is_file()


def test_nonfinite_loss_skips_the_update(single_label_dir, tmp_path):
    comp, tl, vl, vt, model, opt, scaler = _setup(single_label_dir)
    calls = {"n": 0}
    ce = get_loss("ce", "multiclass")

    def sometimes_nan(logits, y, ok):
        calls["n"] += 1
        return ce(logits, y, ok) * (math.nan if calls["n"] == 2 else 1.0)

    result = run_fit(model, tl, vl, vt, task=comp.task, loss_fn=sometimes_nan, optimizer=opt, scaler=scaler,
                 device=torch.device("cpu"), clock=BudgetClock(600), reserve=InferenceReserve(12, len(vt), 2),
                 opts=FitOptions(epochs=1), out_dir=tmp_path)
    assert result.state.nonfinite_steps == 1
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
    run_fit(model, tl, vl, vt, task=comp.task, loss_fn=get_loss("ce", comp.task), optimizer=opt, scaler=scaler,
        device=torch.device("cpu"), clock=BudgetClock(600), reserve=InferenceReserve(12, len(vt), 2),
        opts=FitOptions(epochs=1, clip_grad=0.5), out_dir=tmp_path)
    assert len(norms) == len(tl) and all(m == 0.5 for _, m in norms)
    after = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).norm()
    assert after <= 0.5 + 1e-4, "the gradient the optimizer used was clipped"


def test_linear_probe_keeps_the_backbone_and_ema_is_saved(single_label_dir, tmp_path):
    from kernelkit.engine.checkpoint import load_checkpoint
    from kernelkit.model.factory import create_ema, head_parameters
    comp, tl, vl, vt, model, opt, scaler = _setup(single_label_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    head_ids = {id(p) for p in head_parameters(model)}
    head_names = {n for n, p in model.named_parameters() if id(p) in head_ids}
    ema = create_ema(model, 0.9)
    run_fit(model, tl, vl, vt, task=comp.task, loss_fn=get_loss("ce", comp.task), optimizer=opt, scaler=scaler,
        device=torch.device("cpu"), clock=BudgetClock(600), reserve=InferenceReserve(12, len(vt), 2),
        opts=FitOptions(epochs=2, freeze_until=1.0), out_dir=tmp_path, ema=ema)
    after = model.state_dict()
    for name, p in model.named_parameters():
        if name in head_names:
            assert not torch.equal(before[name], after[name]), f"head {name} trained"
        else:
            assert torch.equal(before[name], after[name]), f"backbone {name} changed under a linear probe"
    ckpt = load_checkpoint(tmp_path / "best.pt")
    assert "ema" in ckpt and set(ckpt["ema"]) == set(ckpt["model"])
    head_name = next(iter(head_names))
    assert not torch.equal(ckpt["ema"][head_name], ckpt["model"][head_name]), "the EMA lags the weights"


def test_two_stage_fine_tune_unfreezes_half_way(single_label_dir, tmp_path, caplog):
    comp, tl, vl, vt, model, opt, scaler = _setup(single_label_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level("INFO", logger="kernelkit"):
        run_fit(model, tl, vl, vt, task=comp.task, loss_fn=get_loss("ce", comp.task), optimizer=opt, scaler=scaler,
            device=torch.device("cpu"), clock=BudgetClock(600), reserve=InferenceReserve(12, len(vt), 2),
            opts=FitOptions(epochs=4, freeze_until=0.5, unfreeze_blocks=1), out_dir=tmp_path)
    text = caplog.text
    assert text.index("backbone frozen") < text.index("unfreezing the last 1 backbone blocks")
    stem = next(n for n, p in model.named_parameters() if p.ndim == 4)
    assert torch.equal(before[stem], model.state_dict()[stem]), "the stem stays frozen (only the last block opens)"
