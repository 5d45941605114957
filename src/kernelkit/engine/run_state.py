"""Run bookkeeping in out_dir: when the run started, whether it finished, which checkpoint to resume.

A run killed mid-way (kill -9, a lost Kaggle session) and started again in the same out_dir
continues from last.pt, and the time the killed process spent still counts against the budget.
A finished run's checkpoints are kept as *.prev.pt so a new run never mixes them with its own.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..core.fileio import TEMP_GLOB, write_json
from .checkpoint import BEST, LAST

log = logging.getLogger("kernelkit")


def _record(path: Path, data: dict) -> None:
    """Bookkeeping must not stop a run: on a full disk the run goes on, only a restart loses its start time."""
    try:
        write_json(path, data)
    except Exception as e:  # noqa: BLE001
        log.error("could not write %s (%s); a restart after a kill would not resume", path.name, e)

STATE_FILE = "run_state.json"
CHECKPOINTS = (LAST, BEST)


def remove_partial_files(out_dir: Path) -> None:
    """Temp files of a save that was killed half-way; the real checkpoints are intact beside them."""
    for tmp in out_dir.glob(TEMP_GLOB):
        log.info("removing partial file %s left by an interrupted save", tmp.name)
        tmp.unlink(missing_ok=True)


def begin_run(out_dir: Path, resume: bool, started_at: float) -> tuple[float, Path | None]:
    """-> (run start time for the budget clock, checkpoint to resume from or None)."""
    remove_partial_files(out_dir)
    state_path = out_dir / STATE_FILE
    last = resumable(out_dir, resume)
    if last is not None:
        state = json.loads(state_path.read_text())
        _record(state_path, {**state, "restarts": int(state.get("restarts", 0)) + 1})
        return float(state["run_start"]), last
    archive_checkpoints(out_dir)
    _record(state_path, {"run_start": started_at, "finished": False, "restarts": 0})
    return started_at, None


def resumable(out_dir: Path, resume: bool) -> Path | None:
    """last.pt of an unfinished run in out_dir, when resuming is on; no side effects."""
    state_path, last = out_dir / STATE_FILE, out_dir / LAST
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    return last if resume and state and not state.get("finished") and last.is_file() else None


def run_start(out_dir: Path, default: float) -> float:
    """When the run in out_dir started (possibly in a process killed since); `default` if unknown."""
    try:
        return float(json.loads((out_dir / STATE_FILE).read_text())["run_start"])
    except (OSError, ValueError, KeyError):
        return default


def archive_checkpoints(out_dir: Path) -> None:
    for name in CHECKPOINTS:
        p = out_dir / name
        if p.is_file():
            os.replace(p, p.with_suffix(".prev.pt"))
            log.info("kept the previous run's %s as %s", name, p.with_suffix(".prev.pt").name)


def finish_run(out_dir: Path) -> None:
    state_path = out_dir / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    _record(state_path, {**state, "finished": True})
