"""The failure policy, in one place: what a failure costs depends on when it happens.

- Before training starts (phase SETUP), a bad option, data folder, sample submission or resume
  checkpoint is a refusal: exit 2 within seconds, the message naming what to change (`refuse`,
  `is_refusal`; under data parallelism rank 0 leaves the verdict in summary.json, `refuse_in_rank`).
- Once training has started, each later step runs under `Outcome.guard`: a failure is logged
  loudly, listed in summary.json under "problems", and costs only itself.
- The test prediction falls back from best.pt to last.pt to the weights in memory
  (`prediction_sources`, then the job's model).
- An exception that still escapes a job after start-up is a bug, but the checkpoints on disk
  still deserve a submission: `after_crash` logs it and predicts from the best one (`rescue`), as
  the launcher does when its ranks end without a submission and one process cannot carry on.
- The exit status follows: 0 when a valid submission was written, else 1 (`exit_status`).

The phase lives in one object shared by every copy of the run's context (`RunContext.phase`), so
a job working on a copy (autopick's, with the concrete model) moves the whole run past SETUP.
Nothing heavy at module level: the command line refuses through here before torch is imported.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..core.config import ConfigError
from ..core.context import EXIT_NO_SUBMISSION, EXIT_OK, EXIT_REFUSED, PREDICTING, SETUP, RunContext
from ..core.fileio import write_json

log = logging.getLogger("kernelkit")

# What a refusal looks like: the user's setting, data or file is wrong (raised before training only).
REFUSALS = (ConfigError, ValueError, FileNotFoundError, NotADirectoryError)


@dataclass
class Outcome:
    """What the job reports: summary.json's content, and whether a valid submission exists."""
    summary: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    submitted: bool = False

    def problem(self, what: str) -> None:
        """Something failed after training started: loud in the log, recorded in the summary."""
        log.error("!!! %s\n%s", what, traceback.format_exc())
        self.problems.append(what)

    def guard(self, what: str, fn: Callable, *args, **kwargs) -> Any:
        """Run a step that must not cost the submission; None when it fails."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            self.problem(f"{what} failed: {type(e).__name__}: {e}")
            return None

    def exit_status(self) -> int:
        return exit_status(self.submitted)


def exit_status(submitted: bool) -> int:
    return EXIT_OK if submitted else EXIT_NO_SUBMISSION


def refuse(message: str) -> int:
    """Exit 2 with the reason on stderr (where people look) and in the log."""
    log.error("refused: %s", message)
    print(f"kernelkit: refused: {message}", file=sys.stderr, flush=True)
    return EXIT_REFUSED


def is_refusal(ctx: RunContext, e: BaseException) -> bool:
    return ctx.phase == SETUP and isinstance(e, REFUSALS)


def refuse_in_rank(ctx: RunContext, e: BaseException, is_main: bool) -> int:
    """A data-parallel rank refused: rank 0 leaves the verdict for the launcher in summary.json."""
    if is_main:
        log.error("refused: %s", e)
        write_json(ctx.out_dir / "summary.json", {"exit_status": EXIT_REFUSED, "refused": str(e)})
    return EXIT_REFUSED


def after_crash(ctx: RunContext, e: BaseException) -> int:
    """An exception escaped the job: a refusal before training, else logged and rescued from disk."""
    if is_refusal(ctx, e):
        return refuse(f"{e}")
    print_fatal(e)
    if ctx.phase == SETUP or ctx.cfg.mode != "train":
        return EXIT_NO_SUBMISSION
    try:
        return rescue(ctx)
    except Exception as again:  # noqa: BLE001
        print_fatal(again)
        log.error("no submission could be written")
        return EXIT_NO_SUBMISSION


def prediction_sources(out_dir: Path) -> list[Path]:
    """The checkpoints to predict from, in the order to try them: best.pt, then last.pt."""
    from ..engine.checkpoint import BEST, LAST
    return [p for p in (Path(out_dir) / BEST, Path(out_dir) / LAST) if p.is_file()]


def rescue(ctx: RunContext) -> int:
    """Training ended without a submission: predict from its best checkpoint."""
    from ..build.assemble import open_competition
    from ..core import distributed
    from ..engine.budget import BudgetClock, budget_seconds
    from ..engine.run_state import run_start
    from .infer_job import run_infer
    sources = prediction_sources(ctx.out_dir)
    if not sources:
        log.error("training ended without a submission and left no checkpoint to predict from")
        return EXIT_NO_SUBMISSION
    log.error("!!! training ended without a submission; predicting from %s", sources[0])
    cfg = dataclasses.replace(ctx.cfg, mode="infer", checkpoints=str(sources[0]))
    rctx = dataclasses.replace(ctx, cfg=cfg)
    rctx.phase = PREDICTING
    summary = run_infer(rctx, open_competition(rctx), distributed.SINGLE.device(),
                        BudgetClock(*budget_seconds(cfg), start_time=run_start(ctx.out_dir, ctx.t_start)))
    write_json(ctx.out_dir / "summary.json", {**summary, "exit_status": EXIT_OK, "rescued": True})
    return EXIT_OK


def print_fatal(e: BaseException) -> None:
    """The traceback with source lines: kernel.py registers its bundled modules with linecache, which
    the traceback module reads (the interpreter's default hook reads files from disk, and there are
    none)."""
    log.error("fatal error: %s: %s\n%s", type(e).__name__, e, "".join(traceback.format_exception(e)))
