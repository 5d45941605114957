"""The command line and the exit contract. Imports nothing heavy until the config is known good,
so a typo is refused in well under a second, before torch is even imported.

    0  a valid submission.csv was written (failures after training started are logged loudly
       and listed in summary.json under "problems")
    2  refused before training: the message names the option, file or folder and what is wrong
    4  --dry-run: the plan does not fit the budget
    1  no submission could be made; the reason is the last thing in the log
"""
from __future__ import annotations

import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from ..core import env
from ..core.config import Config, ConfigError, make_config
from ..core.context import EXIT_NO_SUBMISSION, EXIT_REFUSED, SETUP, RunContext, setup_logging
from ..core.stopping import handle_signals
from ..core.weights import find_weights_folders
from ..inputs.discovery import find_competition

log = logging.getLogger("kernelkit")


def refuse(message: str) -> int:
    """Exit 2 with the reason on stderr (where people look) and in the log."""
    log.error("refused: %s", message)
    print(f"kernelkit: refused: {message}", file=sys.stderr, flush=True)
    return EXIT_REFUSED


def resolve(config_block: dict[str, Any] | None, argv: list[str] | None, t_start: float) -> RunContext:
    """Config and paths, with no side effects beyond creating out_dir. No competition found and no
    data_dir: the demo (with its preset, unless another was chosen), except on Kaggle, where that is
    a refusal (inputs.find_competition)."""
    cfg, args = make_config(config_block, argv)
    out_dir = env.out_dir_for(cfg.out_dir)
    data_dir = Path(cfg.data_dir) if cfg.data_dir else find_competition(env.input_root(), env.on_kaggle())
    is_demo = data_dir is None
    if is_demo and not cfg.preset:
        cfg, args = make_config({**(config_block or {}), "preset": "demo"}, argv)
    found = None
    if searches_weights(cfg):
        found = tuple(find_weights_folders(env.input_root(), skip=data_dir))
        if found:  # as if the user had set it, so the fine-tuning recipe applies (several: autopick ranks)
            cfg, args = make_config({**(config_block or {}), "pretrained_path": str(found[0])}, argv)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"out_dir={str(out_dir)!r} cannot be created: {e}") from e
    return RunContext(cfg, args, data_dir or out_dir / "demo_data", out_dir, is_demo, t_start, weights_found=found)


def searches_weights(cfg: Config) -> bool:
    """On Kaggle, a training run with model=auto and no pretrained_path looks for attached weights
    (pretrained_path=none turns that off)."""
    return cfg.mode == "train" and env.on_kaggle() and cfg.model == "auto" and not cfg.pretrained_path


def main(config_block: dict[str, Any] | None = None, argv: list[str] | None = None,
         started_at: float | None = None) -> int:
    """`started_at`: process start (kernel.py records it before importing torch), so the budget
    counts the imports too."""
    setup_logging()
    try:
        ctx = resolve(config_block, argv, started_at or time.time())
    except ConfigError as e:
        return refuse(str(e))
    with handle_signals() as stop:
        ctx.stop = stop
        return run(ctx)


def run(ctx: RunContext) -> int:
    try:
        from .launch import launch  # torch, timm: only now
        return launch(ctx)
    except KeyboardInterrupt:
        log.error("interrupted twice: stopping without a submission")
        return EXIT_NO_SUBMISSION
    except Exception as e:  # noqa: BLE001
        if ctx.phase == SETUP and isinstance(e, (ConfigError, ValueError, FileNotFoundError, NotADirectoryError)):
            return refuse(f"{e}")
        print_fatal(e)
        return rescue_after_crash(ctx)


def rescue_after_crash(ctx: RunContext) -> int:
    """Past setup, the jobs guard every step themselves; an error escaping them is a bug, and the
    checkpoints on disk still deserve a submission."""
    if ctx.phase == SETUP or ctx.cfg.mode != "train":
        return EXIT_NO_SUBMISSION
    try:
        from .launch import rescue
        return rescue(ctx)
    except Exception as e:  # noqa: BLE001
        print_fatal(e)
        log.error("no submission could be written")
        return EXIT_NO_SUBMISSION


def print_fatal(e: BaseException) -> None:
    """The traceback with source lines: kernel.py registers its bundled modules with linecache, which
    the traceback module reads (the interpreter's default hook reads files from disk, and there are
    none)."""
    log.error("fatal error: %s: %s\n%s", type(e).__name__, e, "".join(traceback.format_exception(e)))
