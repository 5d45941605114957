"""One launch path for one process, spawned ranks (Kaggle's T4 x2: no torchrun in a script
kernel) and torchrun, with one failure policy: a failing rank stops every rank, and if the
training processes ended without a valid submission while a checkpoint exists, the launcher
predicts from it."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import time

import torch

from ..build import autopick
from ..build.input_mode import resolve_input_mode
from ..core import distributed, env
from ..core.config import ConfigError, budget_seconds
from ..core.context import (
    EXIT_NO_SUBMISSION,
    EXIT_OK,
    EXIT_PLAN_DOES_NOT_FIT,
    EXIT_REFUSED,
    PREDICTING,
    SETUP,
    TRAINING,
    Outcome,
    RunContext,
    setup_logging,
)
from ..core.distributed import DistInfo
from ..core.fileio import write_json
from ..core.stopping import handle_signals
from ..core.weights import weights_lines
from ..engine.budget import BudgetClock, fmt_seconds
from ..engine.checkpoint import best_available
from ..engine.run_state import finish_run, run_start
from ..inputs.competition import Competition, check_submission_writable, load_competition
from .blend_job import run_blend
from .demo import make_demo_competition, score_demo_submission
from .infer_job import run_infer
from .train_job import run_train

log = logging.getLogger("kernelkit")


def timm_version() -> str:
    import timm
    return timm.__version__


def announce(ctx: RunContext) -> None:
    for line in weights_lines(ctx.cfg.model, ctx.cfg.pretrained_path, ctx.weights_found, ctx.cfg.mode == "train"):
        log.info(line)
    env.check_versions({"torch": torch.__version__, "timm": timm_version()})
    log.info("kernelkit: torch %s, timm %s, %s, config:\n%s", torch.__version__, timm_version(),
             "on Kaggle" if env.on_kaggle() else "local", ctx.cfg.pretty())
    try:
        ctx.cfg.save(ctx.out_dir / "config.json")
    except Exception as e:  # noqa: BLE001  (a full disk here must not cost the run; the log has the config)
        log.error("!!! could not write config.json (%s)", e)
    if ctx.is_demo:
        log.info("no competition data found: running the built-in demo (set data_dir= for a real competition)")
        make_demo_competition(ctx.data_dir, ctx.cfg.demo_images, max(50, ctx.cfg.demo_images // 5), ctx.cfg.seed)


def open_competition(ctx: RunContext) -> Competition:
    """The data, and proof that a submission can be written for it, before anything slow runs."""
    cfg = ctx.cfg
    comp = load_competition(ctx.data_dir, cfg.format, id_column=cfg.id_column, label_column=cfg.label_column,
                            train_images=cfg.train_images, test_images=cfg.test_images, image_ext=cfg.image_ext)
    check_submission_writable(comp, ctx.out_dir)
    return comp


def data_parallel_processes(ctx: RunContext) -> int:
    """How many training processes: the user's ddp_procs, or one per visible GPU. Options that data
    parallelism cannot do yet keep an automatic choice at one process; an explicit one is refused."""
    cfg = ctx.cfg
    if cfg.mode != "train" or ctx.args.dry_run:
        return 1
    procs = distributed.wanted_processes(cfg.ddp_procs)
    blockers = [k for k in ("freeze", "balanced_sampling") if getattr(cfg, k) > 0]
    if procs > 1 and blockers:
        if cfg.ddp_procs > 1:
            raise ConfigError(f"ddp_procs={cfg.ddp_procs} cannot be combined with {' and '.join(blockers)} yet; "
                              "set ddp_procs=1")
        log.warning("%s is not supported with data-parallel training yet: training in one process",
                    " and ".join(blockers))
        return 1
    return procs


def launch(ctx: RunContext) -> int:
    info = distributed.from_torchrun()
    if info is not None:  # started by torchrun: one process per rank already
        info = dataclasses.replace(info, backend=distributed.default_backend(ctx.cfg.ddp_backend))
        return run_rank(ctx, info)
    procs = data_parallel_processes(ctx)
    if procs == 1:
        return run_rank(ctx, distributed.SINGLE)
    announce(ctx)  # once, before the ranks start: the demo data must exist for all of them
    open_competition(ctx)  # a refusal here, in the launcher, is an exit 2 like any other
    (ctx.out_dir / "summary.json").unlink(missing_ok=True)  # the ranks' verdict, not an earlier run's
    ctx.phase = TRAINING
    status = launch_ranks(ctx, procs)
    return status if status in (EXIT_OK, EXIT_REFUSED) else rescue(ctx)


def launch_ranks(ctx: RunContext, procs: int) -> int:
    """Spawn one process per rank; a SIGTERM to us is passed on to them. -> rank 0's exit status."""
    import torch.multiprocessing as mp
    port = distributed.free_port()
    log.info("starting %d data-parallel processes (%s)", procs, distributed.default_backend(ctx.cfg.ddp_backend))
    # Spawned interpreters inherit an ignored SIGTERM until their own handler is up, so a signal
    # forwarded while a rank is still importing torch does not kill it (it is re-sent below).
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        procs_ctx = mp.start_processes(rank_worker, args=(procs, port, ctx), nprocs=procs, join=False,
                                       start_method="spawn")
    finally:
        signal.signal(signal.SIGTERM, previous)
    try:
        while not procs_ctx.join(timeout=2.0):
            if ctx.stop.requested:  # idempotent in the ranks; repeated for ranks that were still starting
                for p in procs_ctx.processes:
                    if p.is_alive():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(p.pid, signal.SIGTERM)
    except Exception:  # noqa: BLE001  (a rank failed: join has stopped the others)
        log.exception("a data-parallel rank failed; every rank was stopped")
    summary = ctx.out_dir / "summary.json"
    return int(json.loads(summary.read_text()).get("exit_status", EXIT_NO_SUBMISSION)) if summary.is_file() \
        else EXIT_NO_SUBMISSION


def rank_worker(rank: int, world_size: int, port: int, ctx: RunContext) -> None:
    """Entry of a spawned rank (module level, so spawn can import it). Any failure ends the process
    non-zero, which makes the launcher stop every rank: nobody waits on a dead peer. Rank 0 leaves
    its verdict in summary.json (2 for a refusal)."""
    setup_logging()
    if rank:
        log.setLevel(logging.WARNING)
    info = DistInfo(rank, world_size, rank, distributed.default_backend(ctx.cfg.ddp_backend))
    with handle_signals() as stop:
        ctx = dataclasses.replace(ctx, stop=stop, phase=SETUP)
        try:
            status = run_rank(ctx, info, init_method=f"tcp://127.0.0.1:{port}", announced=True)
        except (ConfigError, ValueError, FileNotFoundError) as e:
            if ctx.phase != SETUP:
                raise
            if info.is_main:
                log.error("refused: %s", e)
                write_json(ctx.out_dir / "summary.json", {"exit_status": EXIT_REFUSED, "refused": str(e)})
            status = EXIT_REFUSED
    if status != EXIT_OK:
        raise SystemExit(status)


def run_rank(ctx: RunContext, info: DistInfo, init_method: str = "env://", announced: bool = False) -> int:
    if info.enabled:
        if info.rank:
            log.setLevel(logging.WARNING)
        distributed.init(info, init_method)
    try:
        if info.is_main and not announced:
            announce(ctx)
        distributed.barrier(info)
        return run_job(ctx, info)
    finally:
        distributed.shutdown(info)


def run_job(ctx: RunContext, info: DistInfo) -> int:
    out_dir = ctx.out_dir
    comp = open_competition(ctx)
    if ctx.cfg.mode in ("infer", "blend"):
        summary = (run_blend(ctx, comp) if ctx.cfg.mode == "blend" else
                   run_infer(ctx, comp, info.device(), BudgetClock(*budget_seconds(ctx.cfg), start_time=ctx.t_start)))
        write_json(out_dir / "summary.json", {**summary, "exit_status": EXIT_OK})
        log.info("done in %s: %s", fmt_seconds(time.time() - ctx.t_start), summary)
        return EXIT_OK
    ctx = resolve_input_mode(ctx, comp)  # before autopick: tiles cost their count in throughput
    ctx = autopick.resolve(ctx, comp, info, every=ctx.args.dry_run)  # model/img_size 'auto' -> concrete
    cfg = ctx.cfg
    if ctx.args.dry_run:
        from .dry_run import dry_run
        plan = dry_run(ctx, comp, info.device())
        write_json(out_dir / "plan.json", plan.to_dict())
        log.info("dry-run plan for %s on %s:\n%s", cfg.model, info.device(), plan.table())
        return EXIT_OK if plan.fits else EXIT_PLAN_DOES_NOT_FIT
    outcome = run_train(ctx, comp, info)
    if not info.is_main:
        return EXIT_OK
    return report(ctx, comp, outcome, info)


def report(ctx: RunContext, comp: Competition, outcome: Outcome, info: DistInfo) -> int:
    cfg, out_dir, s = ctx.cfg, ctx.out_dir, outcome.summary
    status = EXIT_OK if outcome.submitted else EXIT_NO_SUBMISSION
    outcome.guard("finishing the run state", finish_run, out_dir)
    s.update(wall_s=round(time.time() - run_start(ctx.out_dir, ctx.t_start), 1), exit_status=status, world_size=info.world_size,
             problems=outcome.problems, stopped_by=ctx.stop.signal_name or None, model=cfg.model, img_size=cfg.img_size,
             input_mode=cfg.input_mode, tiles=cfg.input_tiles())
    if ctx.is_demo and outcome.submitted:
        s["demo_test_score"] = outcome.guard("demo score", score_demo_submission, ctx.data_dir, out_dir, comp)
    outcome.guard("writing summary.json", write_json, out_dir / "summary.json", s)
    metric = f"F{cfg.beta:g} per image" if comp.task == "multilabel" else "accuracy"
    log.info("validation %s %.4f (label-prior baseline %.4f); %s used; submission: %s", metric,
             s.get("val_score") or float("nan"), s.get("baseline") or float("nan"), fmt_seconds(s["wall_s"]),
             (out_dir / "submission.csv").resolve() if outcome.submitted else "NONE")
    if s.get("demo_test_score") is not None:
        log.info("demo test F2 against the generated answers: %.4f", s["demo_test_score"])
    if outcome.problems:
        log.error("!!! %s, but %d step(s) failed: %s", "the submission was written" if outcome.submitted
                  else "NO submission could be written", len(outcome.problems), "; ".join(outcome.problems))
    return status


def rescue(ctx: RunContext) -> int:
    """The training processes ended without a submission: predict from their best checkpoint."""
    ckpt = best_available(ctx.out_dir)
    if ckpt is None:
        log.error("training ended without a submission and left no checkpoint to predict from")
        return EXIT_NO_SUBMISSION
    log.error("!!! training ended without a submission; predicting from %s", ckpt)
    cfg = dataclasses.replace(ctx.cfg, mode="infer", checkpoints=str(ckpt))
    rctx = dataclasses.replace(ctx, cfg=cfg, phase=PREDICTING)
    summary = run_infer(rctx, open_competition(rctx), distributed.SINGLE.device(),
                        BudgetClock(*budget_seconds(cfg), start_time=run_start(ctx.out_dir, ctx.t_start)))
    write_json(ctx.out_dir / "summary.json", {**summary, "exit_status": EXIT_OK, "rescued": True})
    return EXIT_OK

