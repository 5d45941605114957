"""What one run knows about itself: its config, where it reads and writes, when it started, its
stop flag, and which phase it is in (the exit status depends on it)."""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .config import Config
from .stopping import StopFlag

log = logging.getLogger("kernelkit")

SETUP, TRAINING, PREDICTING = "setup", "training", "predicting"

# The exit contract (Kaggle fails a run on any non-zero status).
EXIT_OK = 0  # a valid submission.csv was written (problems after training started are logged loudly)
EXIT_NO_SUBMISSION = 1  # nothing valid could be written; the reason is the last thing in the log
EXIT_REFUSED = 2  # refused before training: a bad option, data or sample submission, named in the message
EXIT_PLAN_DOES_NOT_FIT = 4  # --dry-run: the plan does not fit the budget


class Phase:
    """The run's phase, one object shared by every copy of its context (like the stop flag): a job
    that works on a copy (autopick's, with the concrete model) moves the whole run on, so the
    command line and the launcher, which hold the original, rescue instead of refusing."""

    def __init__(self, name: str = SETUP):
        self.name = name


@dataclass
class RunContext:
    cfg: Config
    args: argparse.Namespace
    data_dir: Path
    out_dir: Path
    is_demo: bool
    t_start: float
    stop: StopFlag = field(default_factory=StopFlag)
    stage: Phase = field(default_factory=Phase)
    # The attached inputs were searched for timm weights folders (on Kaggle, model=auto, no pretrained_path):
    # what was found (several: autopick ranks them), or None when there was no search.
    weights_found: tuple[Path, ...] | None = None
    # input_mode auto chose tiles: the mode autopick takes instead when the tiles do not fit their epochs
    # ('' = none: the mode was set, or is not tiles).
    input_mode_fallback: str = ""
    # Header statistics of a sample of the training images (decide.reports.image_sizes), read once by
    # input_mode auto and reused by aug auto; None when nothing has read them.
    train_image_sizes: dict | None = None

    @property
    def phase(self) -> str:
        """Failures in SETUP are refusals (exit 2); later ones must still leave a submission."""
        return self.stage.name

    @phase.setter
    def phase(self, name: str) -> None:
        self.stage.name = name


def setup_logging() -> None:
    """Timestamped lines on stdout, unless the host (pytest, a notebook that set up logging)
    already handles records: then ours propagate to it instead of printing twice."""
    log = logging.getLogger("kernelkit")
    log.setLevel(logging.INFO)
    if not log.handlers and not logging.getLogger().handlers:
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(h)
