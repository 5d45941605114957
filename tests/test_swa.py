"""End-of-schedule weight averaging (swa.py)."""
import json

import torch
from conftest import TINY
from test_train import _setup
from torch.optim.swa_utils import update_bn

from kernelkit.app.cli import main
from kernelkit.data.transforms import IMAGENET, normalize
from kernelkit.engine.checkpoint import load_checkpoint
from kernelkit.engine.swa import WeightAverage, recompute_batchnorm
from kernelkit.inputs.competition import load_competition
from kernelkit.inputs.submission import validate_submission


def test_average_starts_at_its_share_of_the_schedule_and_batchnorm_matches_torch(single_label_dir):
    comp, tl, vl, vt, model, opt, scaler = _setup(single_label_dir)
    avg = WeightAverage(model, 0.25)
    avg.update(model, 0.5)
    assert avg.n == 0, "before the last quarter nothing is averaged"
    for p in (0.8, 0.9):
        with torch.no_grad():
            for w in model.parameters():
                w.add_(0.1)
        avg.update(model, p)
    assert avg.n == 2
    first = next(avg.module.parameters())
    assert torch.allclose(first, next(model.parameters()) - 0.05), "the mean of the two snapshots"
    # The validation loader: the same batches twice (the training loader shuffles and augments).
    ours = recompute_batchnorm(avg.module, vl, torch.device("cpu"), False, IMAGENET, max_batches=10**6)
    assert ours == len(vl)
    reference = WeightAverage(model, 0.25)
    reference.avg.load_state_dict(avg.state_dict())
    update_bn([normalize(x, False, IMAGENET) for x, _, _ in vl], reference.module)
    bn = [m for m in avg.module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    ref = [m for m in reference.module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and all(torch.allclose(a.running_mean, b.running_mean, atol=1e-5) and
                      torch.allclose(a.running_var, b.running_var, atol=1e-4) for a, b in zip(bn, ref))
    assert all(m.momentum == 0.1 for m in bn), "momentum put back"


def test_a_run_with_swa_averages_other_weights_and_still_submits_in_budget(single_label_dir, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level("INFO", logger="kernelkit"):
        assert main({}, [*TINY, "--data-dir", str(single_label_dir), "--out-dir", str(out), "--budget", "3m",
                         "--epochs", "3", "--swa", "0.5", "--tta", "1"]) == 0
    validate_submission(out / "submission.csv", load_competition(single_label_dir))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["wall_s"] <= 180 and not summary["problems"]
    assert summary["swa"]["snapshots"] >= 2 and summary["swa"]["score"] is not None
    last = load_checkpoint(out / "last.pt")
    average = {k.removeprefix("module."): v for k, v in last["swa"].items() if k.startswith("module.")}
    assert int(last["swa"]["n_averaged"]) >= 2
    differ = [k for k, v in last["model"].items() if v.is_floating_point() and not torch.equal(v, average[k])]
    assert differ, "the averaged weights are not the last weights"
    verdict = [r.message for r in caplog.records if r.message.startswith("weight average of")]
    assert len(verdict) == 1 and "last weights" in verdict[0], "both scores logged"
    best = load_checkpoint(out / "best.pt")
    if "the average predicts" in verdict[0]:
        weights = [k for k in average if "running_" not in k and "num_batches" not in k]  # BatchNorm recomputed
        assert all(torch.equal(best["model"][k], average[k]) for k in weights), "best.pt holds the average"
        assert any(not torch.equal(best["model"][k], average[k]) for k in average if "running_var" in k)
    else:
        assert "kept the trained weights" in verdict[0]


def test_average_of_a_batchnorm_model_survives_the_cuda_foreach_path(monkeypatch):
    """On CUDA AveragedModel sends BatchNorm's int64 num_batches_tracked through _foreach_addcdiv_,
    which raises on the second update; forcing that path on CPU shows it. Floating tensors must be
    averaged, integer buffers copied."""
    import torch.optim.swa_utils as swa_utils
    monkeypatch.setattr(swa_utils, "_get_foreach_kernels_supported_devices", lambda: ["cpu", "cuda"])
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    avg = WeightAverage(model, 1.0)
    seen = []
    for step in range(3):
        with torch.no_grad():
            model(torch.randn(2, 3, 8, 8))  # train mode: running stats and num_batches_tracked move
            for w in model.parameters():
                w.add_(1.0)
        avg.update(model, 0.5)
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
    assert avg.n == 3 and int(avg.avg.n_averaged) == 3
    for k, v in avg.module.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, sum(s[k] for s in seen) / 3, atol=1e-6), k
        else:
            assert v.dtype == torch.int64 and torch.equal(v, seen[-1][k]), "integer buffers are copied"
    restored = WeightAverage(model, 1.0)
    restored.load_state_dict(avg.state_dict())
    assert restored.n == 3
