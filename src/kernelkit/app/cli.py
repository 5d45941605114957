"""The command line and the exit contract (the policy behind it: `failure`). Imports nothing heavy until the config is known good,
so a typo is refused in well under a second, before torch is even imported.

    0  a valid submission.csv was written (failures after training started are logged loudly
       and listed in summary.json under "problems")
    2  refused before training: the message names the option, file or folder and what is wrong
    4  --dry-run: the plan does not fit the budget
    1  no submission could be made; the reason is the last thing in the log
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..core import env
from ..core.clock import at as clock_at
from ..core.clock import now as clock_now
from ..core.config import Config, ConfigError
from ..core.context import EXIT_NO_SUBMISSION, RunContext, setup_logging
from ..core.options import make_config
from ..core.stopping import handle_signals
from ..core.weights import find_weights_folders
from ..inputs.discovery import find_competition
from .failure import after_crash, refuse

log = logging.getLogger("kernelkit")


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
        ctx = resolve(config_block, argv, clock_at(started_at) if started_at else clock_now())
    except ConfigError as e:
        return refuse(str(e))
    with handle_signals() as stop:
        ctx.stop = stop
        return run(ctx)


def run(ctx: RunContext) -> int:
    try:
        from .ranks import torchrun_rank  # torch: only now
        rank = torchrun_rank(ctx)
        from .launch import launch  # timm and the jobs
        return launch(ctx, rank)
    except KeyboardInterrupt:
        log.error("interrupted twice: stopping without a submission")
        return EXIT_NO_SUBMISSION
    except Exception as e:  # noqa: BLE001
        return after_crash(ctx, e)
