"""Checkpoints: one owner for their names, one atomic write, a versioned format.

Format history (`format_version`):
  1  (no key) model, ema, optimizer, scaler, epoch, step, progress, best_score, threshold,
     elapsed, run_start, rng, config, classes, task; optionally threshold_rule.
  2  + format_version and seed; older files load through `migrate`.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import torch

from .fileio import atomic_write

log = logging.getLogger("kernelkit")

FORMAT_VERSION = 2
BEST, LAST = "best.pt", "last.pt"


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """weights_only=True: a checkpoint cannot run code when it is loaded."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001  (UnpicklingError and friends; re-raised with context)
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise ValueError(f"{path}: refusing checkpoint with pickled objects (weights_only=True): {e}") from e
        raise
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path}: not a kernelkit checkpoint (no 'model' entry)")
    return migrate(ckpt)


def migrate(ckpt: dict[str, Any]) -> dict[str, Any]:
    """Bring an older checkpoint to the current format; newer ones are refused clearly."""
    version = int(ckpt.get("format_version", 1))
    if version > FORMAT_VERSION:
        raise ValueError(f"checkpoint format {version} is newer than this kernel understands ({FORMAT_VERSION}); "
                         "use the kernel.py that wrote it")
    if version == 1:
        ckpt = {**ckpt, "format_version": 2, "seed": ckpt.get("config", {}).get("seed")}
    return ckpt


class Checkpointer:
    """Writes best.pt / last.pt in `out_dir` with the run's metadata (config dict, classes, task,
    seed). A failed write is logged and counted, never raised: training goes on, and the previous
    file is intact because the write is atomic."""

    def __init__(self, out_dir: Path, meta: dict[str, Any]):
        self.out_dir, self.meta = Path(out_dir), dict(meta)
        self.failures = 0

    def path(self, name: str) -> Path:
        return self.out_dir / name

    def save(self, name: str, payload: dict[str, Any]) -> bool:
        try:
            save_checkpoint({**payload, **self.meta, "format_version": FORMAT_VERSION}, self.path(name))
            return True
        except Exception as e:  # noqa: BLE001  (torch.save raises RuntimeError on a full disk, not OSError)
            self.failures += 1
            log.error("could not save %s (%s: %s); the previous %s stays usable, training continues",
                      name, type(e).__name__, e, name)
            return False

    def update(self, name: str, **fields: Any) -> bool:
        """Add fields (e.g. the final threshold rule) to an existing checkpoint."""
        path = self.path(name)
        if not path.is_file():
            return False
        try:
            ckpt = load_checkpoint(path)
        except Exception as e:  # noqa: BLE001
            log.error("could not read %s back to update it (%s)", name, e)
            return False
        return self.save(name, {**ckpt, **fields})



def best_available(out_dir: Path) -> Path | None:
    """best.pt, else last.pt, else None: what to predict from when training left no submission."""
    return next((p for p in (Path(out_dir) / BEST, Path(out_dir) / LAST) if p.is_file()), None)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        # A checkpoint from a machine with more GPUs (T4 x2 -> one GPU): restore what exists here.
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
