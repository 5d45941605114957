"""Ranks that fail or never meet (issue #22 item 3; #21 items 5, 9, 10): the rendezvous deadline and
stop request, rank 0's solo phases against a short collective timeout, the device and CPU share of
each rank, and the fast rank cases of the red-team corpus (bench/redteam.py, class `ranks`)."""
import multiprocessing
import socket
import threading
import time

import pytest
import torch
from test_redteam import CASES, ROOT, redteam

from kernelkit.build import assemble
from kernelkit.core import config, distributed, env
from kernelkit.core.distributed import DistInfo, RendezvousFailed
from kernelkit.core.stopping import StopFlag


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- #21 item 10: device choice

@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_each_rank_gets_its_own_gpu_whatever_the_backend(monkeypatch, backend):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert DistInfo(1, 2, 1, backend).device() == torch.device("cuda", 1)
    assert DistInfo(0, 2, 0, backend).device() == torch.device("cuda", 0)
    assert distributed.SINGLE.device() == torch.device("cuda", 0)


def test_no_gpu_means_the_cpu_for_every_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert DistInfo(1, 2, 1, "gloo").device() == torch.device("cpu")


# ---------------------------------------------------------------------------- #21 item 9: CPU share

def test_cores_are_split_between_the_ranks(monkeypatch):
    assert distributed.cpu_share(4, 2) == 2  # T4 x2: 4 vCPUs, 2 ranks
    assert distributed.cpu_share(4, 1) == 4
    assert distributed.cpu_share(32, 1) == 8 and distributed.cpu_share(32, 2) == 8  # the cap
    assert distributed.cpu_share(1, 2) == 1  # never zero
    monkeypatch.setattr(env, "cpu_count", lambda: 4)
    cfg = config.Config()
    assert cfg.num_workers == -1
    assert assemble.num_workers(cfg, 2) == 2 and assemble.num_workers(cfg) == 4
    explicit = config.Config(num_workers=3)
    assert assemble.num_workers(explicit, 2) == 3, "the user's choice wins"


# ---------------------------------------------------------------------------- #22 item 3: rendezvous

def test_a_rank_that_cannot_reach_rank_0_gives_up_at_its_deadline(monkeypatch):
    monkeypatch.setenv(distributed.TEST_TIMEOUT_ENV, "2")
    t0 = time.time()
    with pytest.raises(RendezvousFailed, match="cannot reach rank 0"):
        distributed.init(DistInfo(1, 2, 1, "gloo"), f"tcp://127.0.0.1:{_free_port()}", StopFlag())
    assert 1.5 < time.time() - t0 < 2 + 10, "bounded by the rendezvous deadline, not the store's 30 minutes"
    assert not torch.distributed.is_initialized()


def test_a_stop_request_ends_the_wait_long_before_the_deadline(monkeypatch):
    monkeypatch.setenv(distributed.TEST_TIMEOUT_ENV, "120")
    stop = StopFlag()
    threading.Timer(0.5, stop.request, args=("SIGTERM",)).start()
    t0 = time.time()
    with pytest.raises(RendezvousFailed, match="stop was requested"):
        distributed.init(DistInfo(1, 2, 1, "gloo"), f"tcp://127.0.0.1:{_free_port()}", stop)
    assert time.time() - t0 < 30, "ended by the stop request, not the 120 s deadline"


def test_rank_0_fails_at_once_on_a_port_in_use_and_by_its_deadline_when_nobody_comes(monkeypatch):
    monkeypatch.setenv(distributed.TEST_TIMEOUT_ENV, "60")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        t0 = time.time()
        with pytest.raises(RendezvousFailed, match="cannot listen"):
            distributed.init(DistInfo(0, 2, 0, "gloo"), f"tcp://127.0.0.1:{busy.getsockname()[1]}", StopFlag())
        assert time.time() - t0 < 30, "a bind error is final: no waiting for the deadline"
    monkeypatch.setenv(distributed.TEST_TIMEOUT_ENV, "1.5")
    with pytest.raises(RendezvousFailed, match=r"ranks \[1\] never arrived"):
        distributed.init(DistInfo(0, 2, 0, "gloo"), f"tcp://127.0.0.1:{_free_port()}", StopFlag())


# ---------------------------------------------------------------------------- #21 item 5: rank 0 alone for long

def _solo_rank(rank: int, port: int, wait: str, out) -> None:  # module level: spawn imports it
    info = DistInfo(rank, 2, rank, "gloo")
    try:
        distributed.init(info, f"tcp://127.0.0.1:{port}")
        if rank == 0:
            time.sleep(5.0)  # a cache build or a model choice, longer than the 2 s collective timeout
        if wait == "store key":
            distributed.main_done(info, time.time() + 120)
        else:
            distributed.barrier(info)
        out.put((rank, distributed.broadcast_object(info, "rank 0's choice")))
    except Exception as e:  # noqa: BLE001
        out.put((rank, f"failed: {type(e).__name__}"))
    finally:
        try:
            distributed.shutdown(info)
        except Exception:  # noqa: BLE001  (a broken group after the barrier's timeout)
            pass


@pytest.mark.parametrize("wait", ["store key", "barrier"])
def test_rank_0_may_work_alone_past_the_collective_timeout(monkeypatch, wait):
    """The others wait on a store key with the run's own deadline; a plain barrier (the control) times
    out, which shows the short collective timeout is real here."""
    monkeypatch.setenv(distributed.TEST_TIMEOUT_ENV, "60,2")
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_solo_rank, args=(r, port, wait, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        got = dict(out.get(timeout=150) for _ in procs)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    if wait == "store key":
        assert got == {0: "rank 0's choice", 1: "rank 0's choice"}
    else:
        assert got[1].startswith("failed"), got


# ---------------------------------------------------------------------------- the corpus, through kernel.py

# Fast enough for the suite (the whole `ranks` class: `.venv/bin/python bench/redteam.py --only ranks`).
SUITE_CASES = ["ranks-kill1-train", "ranks-slow0", "ranks-sigterm-rendezvous-rank0"]


@pytest.mark.slow
@pytest.mark.parametrize("case_id", SUITE_CASES)
def test_rank_case(case_id, tmp_path):
    case = CASES[case_id]
    r = redteam.run_case(case, ROOT / "kernel.py", tmp_path)
    assert r["passed"], (f"{case_id} ({case.desc}): expected {case.expect}, got {r['got']} "
                         f"(exit {r['rc']}, {r['wall_s']} s): {r['reasons']}\n{r.get('tail', '')}")
