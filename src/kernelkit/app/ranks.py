"""Joining the other ranks, before anything slow is imported: a rank that cannot meet its peers is
told in seconds (torch is all a rendezvous needs; timm and the jobs load after)."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import time

import torch

from ..core import distributed, env
from ..core.config import ConfigError
from ..core.context import RunContext
from ..core.distributed import DistInfo

log = logging.getLogger("kernelkit")

RANK_GRACE_S = 10.0  # after a rank failed: how long the others get to end on SIGTERM before SIGKILL


def torchrun_rank(ctx: RunContext) -> DistInfo | None:
    """This process's rank, joined to the others, when torchrun (or its variables) started it (SINGLE
    when rank 0 had to go on alone); None otherwise."""
    info = distributed.from_torchrun()
    if info is None:
        return None
    info = dataclasses.replace(info, backend=distributed.default_backend(ctx.cfg.ddp_backend))
    if not info.enabled:
        return info
    if info.rank:
        log.setLevel(logging.WARNING)
    return join_ranks(ctx, info, "env://")


def join_ranks(ctx: RunContext, info: DistInfo, init_method: str) -> DistInfo:
    """The process group, or under torchrun, when the ranks cannot meet within seconds: rank 0 trains
    alone (and says so), the others refuse. Spawned ranks raise RendezvousFailed to the launcher."""
    threads = torch.get_num_threads()  # torch's own choice for this machine, now shared between the ranks
    torch.set_num_threads(distributed.cpu_share(env.cpu_count(), info.world_size, cap=threads))
    try:
        distributed.init(info, init_method, ctx.stop)
        return info
    except distributed.RendezvousFailed as e:
        if init_method != "env://":
            raise
        if info.rank:
            raise ConfigError(f"rank {info.rank} of {info.world_size}: {e}; only rank 0 writes the submission, so this "
                              "rank stops (check MASTER_ADDR / MASTER_PORT, or start one process)") from e
        log.warning("!!! %s: training in one process instead of %d", e, info.world_size)
        torch.set_num_threads(threads)
        return distributed.SINGLE


def supervise(ctx: RunContext, ranks: list, released) -> None:  # noqa: ANN001  (distributed.release flags)
    """Until every rank has ended. When a rank fails while its peers still need it, nobody waits on
    it: the others are told to finish (SIGTERM: under gloo their next collective fails at once) and
    killed RANK_GRACE_S later if still inside one. A rank that fails after its collectives ended
    (rank 1 exiting while rank 0 predicts) is only logged: rank 0 finishes on its own clock."""
    failed_at = main_ended_at = None
    while any(p.is_alive() for p in ranks):
        if ctx.stop.requested:  # idempotent in the ranks; repeated for ranks that were still starting
            _signal_alive(ranks, signal.SIGTERM)
        for r, p in enumerate(ranks):
            if p.exitcode not in (None, 0) and failed_at is None and not (released[r] or released[0]):
                failed_at = time.time()
                log.error("!!! data-parallel rank %d ended with %s: stopping the other ranks", r,
                          _exit_text(p.exitcode))
                _signal_alive(ranks, signal.SIGTERM)
        if main_ended_at is None and not ranks[0].is_alive():
            main_ended_at = time.time()  # the others have nothing left to do: RANK_GRACE_S to exit
        now = time.time()
        if (failed_at is not None and not released[0] and now - failed_at > RANK_GRACE_S) or \
                (main_ended_at is not None and now - main_ended_at > RANK_GRACE_S):
            log.error("!!! ranks still running %.0f s after a peer failed or rank 0 ended: killing them",
                      RANK_GRACE_S)
            _signal_alive(ranks, signal.SIGKILL)
            failed_at = main_ended_at = float("inf")  # once
        for p in ranks:
            p.join(0.25)
    for r, p in enumerate(ranks):
        p.join()
        if p.exitcode and released[r]:
            log.warning("data-parallel rank %d ended with %s after its training was done", r, _exit_text(p.exitcode))


def _signal_alive(ranks: list, sig: int) -> None:
    for p in ranks:
        if p.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, sig)


def _exit_text(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
