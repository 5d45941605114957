"""One launch path for one process, spawned ranks (Kaggle's T4 x2: no torchrun in a script
kernel) and torchrun. A failing rank stops every rank (SIGTERM, then SIGKILL); when the ranks end
without a valid submission the launcher carries on in one process (resuming their last.pt, on the
same clock), or, after a stop request, predicts from the best checkpoint (`failure.rescue`). Ranks
that cannot meet within seconds: the spawned ones end and the launcher goes on alone; under
torchrun rank 0 trains alone and the others refuse."""
from __future__ import annotations

import dataclasses
import json
import logging
import signal

import torch

from ..build import autopick
from ..build.assemble import open_competition
from ..build.augmentation import resolve_augmentation, resolve_frozen_stages
from ..build.input_mode import resolve_input_mode
from ..core import distributed, env
from ..core.clock import now as clock_now
from ..core.config import ConfigError
from ..core.context import (
    EXIT_NO_SUBMISSION,
    EXIT_OK,
    EXIT_PLAN_DOES_NOT_FIT,
    EXIT_REFUSED,
    SETUP,
    TRAINING,
    Phase,
    RunContext,
    setup_logging,
)
from ..core.distributed import DistInfo
from ..core.fileio import write_json
from ..core.stopping import handle_signals
from ..core.weights import weights_lines
from ..engine.budget import BudgetClock, budget_seconds, fmt_seconds
from ..engine.run_state import finish_run, run_start
from ..inputs.competition import Competition
from .blend_job import run_blend
from .demo import make_demo_competition, score_demo_submission
from .failure import REFUSALS, Outcome, is_refusal, refuse_in_rank, rescue
from .infer_job import run_infer
from .ranks import join_ranks, supervise
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
    save_config(ctx)
    if ctx.is_demo:
        log.info("no competition data found: running the built-in demo (set data_dir= for a real competition)")
        make_demo_competition(ctx.data_dir, ctx.cfg.demo_images, max(50, ctx.cfg.demo_images // 5), ctx.cfg.seed)


def save_config(ctx: RunContext) -> None:
    try:
        ctx.cfg.save(ctx.out_dir / "config.json")
    except Exception as e:  # noqa: BLE001  (a full disk here must not cost the run; the log has the config)
        log.error("!!! could not write config.json (%s)", e)


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


def launch(ctx: RunContext, torchrun: DistInfo | None = None) -> int:
    """`torchrun`: this process's rank when torchrun started it, already joined (ranks.torchrun_rank)."""
    if torchrun is not None:  # started by torchrun: one process per rank already
        return run_rank(ctx, torchrun, joined=True)
    procs = data_parallel_processes(ctx)
    if procs == 1:
        return run_rank(ctx, distributed.SINGLE)
    announce(ctx)  # once, before the ranks start: the demo data must exist for all of them
    open_competition(ctx)  # a refusal here, in the launcher, is an exit 2 like any other
    (ctx.out_dir / "summary.json").unlink(missing_ok=True)  # the ranks' verdict, not an earlier run's
    ctx.phase = TRAINING
    status = launch_ranks(ctx, procs)
    return status if status in (EXIT_OK, EXIT_REFUSED) else carry_on_alone(ctx)


def launch_ranks(ctx: RunContext, procs: int) -> int:
    """Spawn one process per rank and watch them; a SIGTERM to us is passed on. -> rank 0's exit status."""
    import torch.multiprocessing as mp
    port = distributed.free_port()
    log.info("starting %d data-parallel processes (%s)", procs, distributed.default_backend(ctx.cfg.ddp_backend))
    # Spawned interpreters inherit an ignored SIGTERM until their own handler is up, so a signal
    # forwarded while a rank is still importing torch does not kill it (it is re-sent below).
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        released = mp.get_context("spawn").Array("b", procs, lock=False)  # distributed.release
        procs_ctx = mp.start_processes(rank_worker, args=(procs, port, ctx, released), nprocs=procs, join=False,
                                       start_method="spawn")
    finally:
        signal.signal(signal.SIGTERM, previous)
    log.info("rank pids: %s", " ".join(f"{r}={p.pid}" for r, p in enumerate(procs_ctx.processes)))
    supervise(ctx, procs_ctx.processes, released)
    summary = ctx.out_dir / "summary.json"
    return int(json.loads(summary.read_text()).get("exit_status", EXIT_NO_SUBMISSION)) if summary.is_file() \
        else EXIT_NO_SUBMISSION


def rank_worker(rank: int, world_size: int, port: int, ctx: RunContext, released=None) -> None:  # noqa: ANN001
    """Entry of a spawned rank (module level, so spawn can import it). Any failure ends the process
    non-zero, which makes the launcher stop every rank: nobody waits on a dead peer. Rank 0 leaves
    its verdict in summary.json (2 for a refusal)."""
    setup_logging()
    if rank:
        log.setLevel(logging.WARNING)
    distributed.share_release_flags(released)
    info = DistInfo(rank, world_size, rank, distributed.default_backend(ctx.cfg.ddp_backend))
    with handle_signals() as stop:
        ctx = dataclasses.replace(ctx, stop=stop, stage=Phase(SETUP))
        try:
            status = run_rank(ctx, info, init_method=f"tcp://127.0.0.1:{port}", announced=True)
        except distributed.RendezvousFailed as e:  # the launcher carries on in one process
            log.error("!!! rank %d: %s", rank, e)
            status = EXIT_NO_SUBMISSION
        except REFUSALS as e:
            if not is_refusal(ctx, e):
                raise
            status = refuse_in_rank(ctx, e, info.is_main)
    if status != EXIT_OK:
        raise SystemExit(status)


def run_rank(ctx: RunContext, info: DistInfo, init_method: str = "env://", announced: bool = False,
             joined: bool = False) -> int:
    if info.enabled and not joined:
        if info.rank:
            log.setLevel(logging.WARNING)
        info = join_ranks(ctx, info, init_method)
    try:
        if info.is_main and not announced:
            announce(ctx)
        distributed.main_done(info, ctx.t_start + budget_seconds(ctx.cfg)[0])  # rank 0 announced alone (demo data)
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
        log.info("done in %s: %s", fmt_seconds(clock_now() - ctx.t_start), summary)
        return EXIT_OK
    given = ctx.cfg
    ctx = resolve_frozen_stages(ctx, comp, info.device().type)  # before input_mode: resumes compare it
    ctx = resolve_input_mode(ctx, comp)  # before autopick: tiles cost their count in throughput
    ctx = autopick.resolve(ctx, comp, info, every=ctx.args.dry_run)  # model/img_size 'auto' -> concrete
    ctx = resolve_augmentation(ctx, comp)  # after autopick: it reads img_size
    if ctx.cfg != given and info.is_main:  # config.json records what the autos resolved to
        save_config(ctx)
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
    status = outcome.exit_status()
    outcome.guard("finishing the run state", finish_run, out_dir)
    s.update(wall_s=round(clock_now() - run_start(ctx.out_dir, ctx.t_start), 1), exit_status=status, world_size=info.world_size,
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


def carry_on_alone(ctx: RunContext) -> int:
    """The ranks ended without a submission (a rank failed, or they never met). With no stop
    requested, this process goes on alone: it resumes from their last.pt (or starts over), on the
    same clock. A stop request, or a failure here, predicts from the best checkpoint there is."""
    if not ctx.stop.requested:
        log.error("!!! data-parallel training ended without a submission: continuing in one process")
        cfg = dataclasses.replace(ctx.cfg, ddp_procs=1, resume=True)
        alone = dataclasses.replace(ctx, cfg=cfg, stage=Phase(SETUP))
        try:
            if run_rank(alone, distributed.SINGLE, announced=True) == EXIT_OK:
                return EXIT_OK
        except Exception as e:  # noqa: BLE001  (what was learned is still on disk)
            log.error("!!! training in one process failed too: %s: %s", type(e).__name__, e)
    return rescue(ctx)
