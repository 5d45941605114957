"""Validation during progressive resizing, and the 'not learning' warning (issue #20 item 3).

The data make the size matter: the class is the period of the stripes (2, 4 or 8 px). A network
trained at half size sees periods 1 (grey), 2 and 4, so validated at full size it reads each class
as the next one: near chance for a run that learns. Validating at the training size during the
small stage keeps the signal honest. Fixed epochs, fixed seeds: nothing depends on the clock.
"""
import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from kernelkit.data.loaders import make_loader
from kernelkit.data.transforms import IMAGENET
from kernelkit.decide.rules import keeps_up
from kernelkit.decide.thresholds import prior_baseline
from kernelkit.engine.budget import BudgetClock, InferenceReserve
from kernelkit.engine.evaluate import predict
from kernelkit.engine.resolution import ResolutionSchedule
from kernelkit.engine.trainer import FitOptions, Trainer, TrainParts, Validation
from kernelkit.model.factory import create_model
from kernelkit.model.losses import get_loss

SIZE, PERIODS = 32, (2, 4, 8)


class Stripes(Dataset):
    """uint8 (3, 32, 32) stripes of period PERIODS[label], random phase and orientation, light noise."""

    def __init__(self, n: int, seed: int, shuffle_labels: bool = False):
        rng = np.random.default_rng(seed)
        self.labels = np.arange(n) % len(PERIODS)
        self.images = []
        for c in self.labels:
            p = PERIODS[c]
            line = ((np.arange(SIZE) + rng.integers(p)) % p < p // 2).astype(np.float32) * 180 + 40
            img = np.tile(line, (SIZE, 1)) if rng.random() < 0.5 else np.tile(line[:, None], (1, SIZE))
            img = np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)
            self.images.append(torch.from_numpy(np.repeat(img[None], 3, 0)))
        if shuffle_labels:
            self.labels = rng.permutation(self.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], torch.tensor(int(self.labels[i])), torch.tensor(1.0)


def fit(shuffle_labels: bool, resolution: ResolutionSchedule | None, epochs: int = 8):
    torch.manual_seed(0)
    train, val = Stripes(240, 1, shuffle_labels), Stripes(240, 2, shuffle_labels)
    model = create_model("test_resnet", len(PERIODS))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    parts = TrainParts(model, opt, torch.amp.GradScaler("cuda", enabled=False), get_loss("auto", "multiclass"))
    opts = FitOptions(lr=3e-3, epochs=epochs, resolution=resolution, learn_check_at=0.25)
    trainer = Trainer(parts, opts, BudgetClock(3600), InferenceReserve(0, len(val), 1), torch.device("cpu"))
    prior = prior_baseline("multiclass", train.labels, val.labels)
    v = Validation(make_loader(val, 60, False, 0), val.labels, "multiclass", prior)
    return trainer.fit(make_loader(train, 16, True, 0, seed=0), v), prior


SCHEDULE = ResolutionSchedule(SIZE, 0.5, 0.75, min_px=8)  # 16 px, then 24, then 32 from p=0.75


def test_schedule_starts_at_half_size():
    assert SCHEDULE.sizes()[0] == SIZE // 2 and SCHEDULE.size_at(0.3) == SIZE // 2


def test_no_warning_on_a_learning_run_with_progressive_resizing():
    result, prior = fit(False, SCHEDULE)
    assert result.warnings == [], result.history
    small = [r for r in result.history if r.get("val_px")]
    assert small and all(r["val_px"] == r["train_px"] < SIZE for r in small), "small stages validate at their size"
    assert max(r["val_score"] for r in small if r["progress"] <= 0.25) > prior + 0.3, "the early signal shows learning"
    full = [r for r in result.history if "val_px" not in r]
    assert full and result.state.best_px == SIZE, "the best checkpoint is chosen among full-size validations"
    assert_best_of(result, full)


def test_warning_fires_when_labels_are_shuffled():
    result, _ = fit(True, SCHEDULE, epochs=4)  # checked at the end of epoch 0 (16 px)
    assert len(result.warnings) == 1 and "not learning" in result.warnings[0], result.history


def test_full_size_validation_would_have_misread_the_run():
    """Why: the same training, validated at full size during the small stage (what the trainer did
    before), scores near the prior; at the training size it shows the learning."""
    torch.manual_seed(0)
    train, val = Stripes(240, 1), Stripes(240, 2)
    net = create_model("test_resnet", len(PERIODS))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    parts = TrainParts(net, opt, torch.amp.GradScaler("cuda", enabled=False), get_loss("auto", "multiclass"))
    small_only = ResolutionSchedule(SIZE, 0.5, full_at=1.0, stages=2, min_px=8)  # 16 px for the whole run
    trainer = Trainer(parts, FitOptions(lr=3e-3, epochs=2, resolution=small_only), BudgetClock(3600),
                      InferenceReserve(0, len(val), 1), torch.device("cpu"))
    trainer.fit(make_loader(train, 16, True, 0, seed=0), None)
    assert trainer.train_px == SIZE // 2
    loader = make_loader(val, 60, False, 0)
    acc = {px: float((predict(net, loader, torch.device("cpu"), "multiclass", amp=False, pre=IMAGENET,
                              size=px)["probs"].argmax(1) == val.labels).mean()) for px in (SIZE // 2, 0)}
    assert acc[SIZE // 2] > acc[0] + 0.3, acc
    assert acc[0] < 1 / 3 + 0.1, acc


@pytest.mark.parametrize("resolution", [None])
def test_runs_without_resizing_keep_one_best(resolution):
    result, _ = fit(False, resolution, epochs=3)
    assert result.warnings == [] and result.state.best_px == 0
    assert_best_of(result, result.history)


def assert_best_of(result, rows):
    """best.pt: the latest epoch within noise of the peak before it (decide.rules.keeps_up); the peak is the max."""
    scores = [r["val_score"] for r in rows]
    assert result.state.peak_score == max(scores)
    kept = [s for i, s in enumerate(scores) if keeps_up(s, max(scores[:i], default=float("-inf")), 240)]
    assert result.state.best_score == kept[-1]
