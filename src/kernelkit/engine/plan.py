"""Dry-run planner: measure throughput on a few batches, then lay the full budget out.

Throughput is measured on the machine the dry run runs on; run it on the Kaggle accelerator (a
short interactive session) for a plan that holds there.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .budget import InferenceReserve, fmt_seconds


@dataclass
class Plan:
    budget_s: float
    margin_s: float
    setup_s: float
    train_images_per_s: float
    infer_images_per_s: float
    n_train: int
    n_val: int
    n_test: int
    tta: int
    epoch_s: float
    inference_s: float
    train_s: float
    epochs_that_fit: float
    epochs_requested: int
    fits: bool
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        rows = [
            ("budget", fmt_seconds(self.budget_s)),
            ("safety margin", fmt_seconds(self.margin_s)),
            ("setup (imports, data index, model)", fmt_seconds(self.setup_s)),
            ("training throughput", f"{self.train_images_per_s:.1f} images/s"),
            ("inference throughput", f"{self.infer_images_per_s:.1f} image-views/s"),
            ("one epoch (train + validation)", f"{fmt_seconds(self.epoch_s)} for {self.n_train} + {self.n_val} images"),
            (f"inference ({self.n_test} test images x {self.tta} TTA views + final validation)",
             fmt_seconds(self.inference_s)),
            ("time left for training", fmt_seconds(self.train_s)),
            ("epochs that fit", f"{self.epochs_that_fit:.1f}"
             + (f" (requested {self.epochs_requested})" if self.epochs_requested else " (schedule follows the clock)")),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"  {k:<{width}}  {v}" for k, v in rows]
        lines += [f"  WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)


def make_plan(*, budget_s: float, margin_s: float, setup_s: float, train_ips: float, reserve: InferenceReserve,
              n_train: int, epochs: int = 0) -> Plan:
    """The budget laid out with the live run's own numbers: inference is `reserve.seconds()`, what
    training keeps back (measured speeds, loader start-ups, overhead, the weight average's extra
    work), so the plan predicts what training will do."""
    infer_ips = reserve.test_ips or reserve.val_ips
    if not infer_ips:
        raise ValueError("a plan needs a measured inference speed (reserve.test_ips)")
    val_s = reserve.n_val / (reserve.val_ips or infer_ips)
    epoch_s = n_train / train_ips + val_s
    inference_s = reserve.seconds()
    train_s = budget_s - margin_s - setup_s - inference_s
    fit_epochs = max(0.0, train_s / epoch_s)
    warnings = []
    if train_s <= 0:
        warnings.append("no time left to train: inference alone needs more than the budget; "
                        "lower tta, img_size or pick a faster model")
    elif fit_epochs < 1:
        warnings.append(f"less than one epoch fits ({fit_epochs:.2f}); the schedule still ends at the deadline")
    if epochs and epochs > fit_epochs:
        warnings.append(f"epochs={epochs} does not fit: ~{fit_epochs:.1f} do; training will stop at the deadline "
                        "with the LR not yet decayed (use epochs=0 to schedule over time)")
    return Plan(budget_s=budget_s, margin_s=margin_s, setup_s=setup_s, train_images_per_s=train_ips,
                infer_images_per_s=infer_ips, n_train=n_train, n_val=reserve.n_val, n_test=reserve.n_test,
                tta=reserve.tta, epoch_s=epoch_s, inference_s=inference_s, train_s=train_s, epochs_that_fit=fit_epochs,
                epochs_requested=epochs, fits=not warnings, warnings=warnings)
