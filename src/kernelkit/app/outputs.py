"""What the train job leaves in out_dir after the submission: the inference weights, and on Kaggle
no image cache (everything in /kaggle/working is saved as output)."""
from __future__ import annotations

import logging

import torch

from ..build.assemble import cache_root
from ..core import env
from ..core.context import RunContext
from ..core.storage import checkpoint_bytes, remove_cache_from_output
from ..engine.budget import BudgetClock
from ..engine.checkpoint import INFERENCE_DIR, Checkpointer, export_inference, load_checkpoint
from .failure import Outcome

log = logging.getLogger("kernelkit")

# Reading the checkpoint back (just written: mostly in the page cache) and writing a third of it took
# 0.13 s for the demo's 134 MB best.pt here; 200 MB/s and 1 s of overhead leave room for a slow disk.
EXPORT_BYTES_PER_S = 200e6


def export_seconds(model: torch.nn.Module, ema: bool) -> float:
    """What export_submitted will cost, kept in the inference reserve from the first step."""
    n_params = sum(p.numel() for p in model.parameters())
    return 1.0 + 2 * checkpoint_bytes(n_params, ema) / EXPORT_BYTES_PER_S


def export_submitted(saver: Checkpointer, outcome: Outcome, clock: BudgetClock) -> None:
    """The checkpoint the submission came from, as an inference folder (weights only: a fraction of
    best.pt, which also holds the optimizer), when the budget has room for it."""
    saver.flush()
    path = saver.path(str(outcome.summary.get("checkpoint", "")))
    if not outcome.submitted or not path.is_file():
        return
    if clock.remaining() < 1.0 + 2 * path.stat().st_size / EXPORT_BYTES_PER_S:
        log.warning("no time left to write the inference weights; %s holds them", path.name)
        return
    folder = export_inference(load_checkpoint(path), saver.path(INFERENCE_DIR))
    log.info("inference weights: %s (from %s; --mode infer --checkpoints %s)", folder, path.name, folder)


def finish_outputs(ctx: RunContext, saver: Checkpointer, outcome: Outcome, clock: BudgetClock) -> None:
    outcome.guard("writing the inference weights", export_submitted, saver, outcome, clock)
    if env.on_kaggle():
        outcome.guard("removing the image cache from the output", remove_cache_from_output, cache_root(ctx.cfg),
                      ctx.out_dir)
