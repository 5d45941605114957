"""Data-parallel training over several processes (Kaggle's "GPU T4 x2"), started from inside
kernel.py (no torchrun on Kaggle) or by torchrun.

Rank 0 owns the budget clock: it decides when training stops and what the schedule position is,
and broadcasts both every step, so all ranks take the same number of steps with the same LR.
Only rank 0 validates, writes checkpoints and the submission.

No wait here is unbounded. The ranks meet through a TCP store that this module polls, so an address
nothing answers on, a port in use or a peer that never starts ends the rendezvous within
`RENDEZVOUS_S` (or at once on SIGTERM) with `RendezvousFailed`, instead of the store's 30 minutes
of retries. While rank 0 works alone (cache build, model choice, validation), the other ranks wait
on a store key with the run's own deadline (`main_done`), not in a collective whose timeout a
9-hour run would outlast.
"""
from __future__ import annotations

import datetime
import inspect
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .clock import now as clock_now

log = logging.getLogger("kernelkit")

RENDEZVOUS_S = 15.0  # the ranks start together: a peer that has not arrived by then is not coming
COLLECTIVE_TIMEOUT_S = 1800.0  # torch's default; the long solo phases wait on store keys instead
POLL_S = 0.2
# Read here only, set only by the test harness: "R" or "R,C" seconds for the rendezvous deadline and
# the collective timeout, so a test's rendezvous gives up quickly, or rank 0's solo phases outlast
# the collective timeout.
TEST_TIMEOUT_ENV = "KERNELKIT_TEST_DIST_TIMEOUT_S"


def timeouts() -> tuple[float, float]:
    """-> (rendezvous deadline, collective timeout), in seconds."""
    forced = [float(x) for x in os.environ.get(TEST_TIMEOUT_ENV, "").split(",") if x.strip()]
    if not forced:
        return RENDEZVOUS_S, COLLECTIVE_TIMEOUT_S
    return forced[0], forced[-1]


class RendezvousFailed(RuntimeError):
    """The ranks did not all meet in time (or a stop was requested while they waited)."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        """Each rank its own GPU, whatever the backend (gloo on a GPU machine too); else the CPU."""
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank if self.enabled else 0)
        return torch.device("cpu")


SINGLE = DistInfo()
_CONTROL: dict[str, object] = {}  # the per-step control group (control_group) and the timeout it gets


def from_torchrun() -> DistInfo | None:
    """torchrun (or any launcher using env://) sets RANK / WORLD_SIZE / LOCAL_RANK."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))


def wanted_processes(ddp_procs: int) -> int:
    """0 = one per GPU when several are visible; 1 = off; N = N processes (gloo on CPU)."""
    if ddp_procs > 0:
        return ddp_procs
    return torch.cuda.device_count() if torch.cuda.device_count() > 1 else 1


def default_backend(backend: str) -> str:
    return backend or ("nccl" if torch.cuda.is_available() else "gloo")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_share(cpus: int, world_size: int, cap: int = 8) -> int:
    """CPU threads (and loader workers) one rank may use: the machine's cores split between the ranks
    (T4 x2 has 4 vCPUs: 2 each, not 4 each), at most `cap`, at least 1."""
    return max(1, min(cap, cpus // max(1, world_size)))


def rendezvous_address(init_method: str) -> tuple[str, int]:
    """tcp://host:port, or env:// (MASTER_ADDR / MASTER_PORT, as torchrun sets them)."""
    if init_method.startswith("tcp://"):
        host, _, port = init_method[len("tcp://"):].rpartition(":")
        return host, int(port)
    return os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))


_store: dist.Store | None = None
_waits = 0  # solo phases so far: every rank counts the same sequence, so the keys match


def init(info: DistInfo, init_method: str = "env://", stop=None) -> None:  # noqa: ANN001  (a StopFlag)
    """Meet the other ranks within the rendezvous deadline, then start the process group on that store.
    Raises RendezvousFailed (nothing is left initialised)."""
    global _store, _waits
    deadline_s, collective_s = timeouts()
    host, port = rendezvous_address(init_method)
    where = f"{host}:{port}"
    log.info("rank %d: meeting %d ranks at %s (giving up after %.0f s)", info.rank, info.world_size, where, deadline_s)
    store = _meet(info, host, port, time.time() + deadline_s, stop, where)
    store.set_timeout(datetime.timedelta(seconds=collective_s))
    if info.backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(info.backend, store=store, rank=info.rank, world_size=info.world_size,
                            timeout=datetime.timedelta(seconds=collective_s))
    _store, _waits = store, 0
    _CONTROL["timeout_s"] = collective_s  # the control group waits as long as the default one


def _meet(info: DistInfo, host: str, port: int, deadline: float, stop, where: str) -> dist.Store:  # noqa: ANN001
    # torchrun's agent already serves a store at MASTER_PORT: every rank is its client then.
    hosts = info.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true"
    prefix = f"kernelkit/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    if hosts:
        try:
            store = dist.TCPStore(host, port, info.world_size, True, wait_for_workers=False,
                                  timeout=datetime.timedelta(seconds=max(1.0, deadline - time.time())))
        except (RuntimeError, OSError) as e:  # DistNetworkError: port in use, address not ours
            raise RendezvousFailed(f"rank 0 cannot listen on {where}: {_first_line(e)}") from e
    else:
        store = _connect(host, port, info.world_size, deadline, stop, where)
    try:
        _wait_for_all(info, store, prefix, deadline, stop, where)
    except RendezvousFailed:
        raise
    except RuntimeError as e:  # DistNetworkError: the host of the store went away meanwhile
        raise RendezvousFailed(f"rendezvous at {where} broke off: {_first_line(e)}") from e
    return store


def _wait_for_all(info: DistInfo, store: dist.Store, prefix: str, deadline: float, stop,  # noqa: ANN001
                  where: str) -> None:
    store.set(f"{prefix}arrived/{info.rank}", "1")
    peers = [f"{prefix}arrived/{r}" for r in range(info.world_size)]
    while not (store.check(peers) if info.rank == 0 else store.check([prefix + "go"])):
        if store.check([prefix + "abandoned"]):
            raise RendezvousFailed(f"rank 0 stopped waiting for the other ranks at {where}")
        missing = [] if info.rank else [r for r, k in enumerate(peers) if not store.check([k])]
        why = ("a stop was requested" if stop is not None and stop.requested else
               "not every rank arrived in time" if time.time() > deadline else "")
        if why:
            if info.rank == 0:
                store.set(prefix + "abandoned", "1")  # a late rank gives up at once instead of waiting
            raise RendezvousFailed(f"rendezvous at {where} did not complete: {why}"
                                   + (f" (ranks {missing} never arrived)" if missing else ""))
        time.sleep(POLL_S)
    if info.rank == 0:
        store.set(prefix + "go", "1")


def _connect(host: str, port: int, world_size: int, deadline: float, stop, where: str) -> dist.Store:  # noqa: ANN001
    """A store client, connecting in a thread: torch retries inside C++ for the whole timeout, where
    no signal handler runs, so the main thread polls the stop flag meanwhile. (A connect abandoned on
    SIGTERM is left to its daemon thread, which ends at its own timeout or with the process.)"""
    box: dict = {}

    def connect() -> None:
        try:
            box["store"] = dist.TCPStore(host, port, world_size, False,
                                         timeout=datetime.timedelta(seconds=max(1.0, deadline - time.time())))
        except Exception as e:  # noqa: BLE001  (reported by the main thread)
            box["error"] = e

    worker = threading.Thread(target=connect, name="kernelkit-rendezvous", daemon=True)
    worker.start()
    while worker.is_alive():
        if stop is not None and stop.requested:
            raise RendezvousFailed(f"rendezvous at {where} did not complete: a stop was requested")
        worker.join(POLL_S)
    if "error" in box:
        raise RendezvousFailed(f"cannot reach rank 0 at {where}: {_first_line(box['error'])}") from box["error"]
    return box["store"]


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def main_done(info: DistInfo, deadline: float) -> None:
    """Call on every rank after a phase rank 0 does alone: rank 0 marks it done, the others poll for
    the mark (no collective, so no collective timeout) until `deadline` (a clock.now() time: the run's deadline). A peer that
    died, or the deadline passing, raises RuntimeError: this rank cannot go on without rank 0."""
    global _waits
    if not info.enabled or _store is None:
        return
    _waits += 1
    key = f"kernelkit/solo/{_waits}"
    if info.is_main:
        _store.set(key, "1")
        return
    while not _store.check([key]):  # raises once rank 0 (the store's host) is gone
        if clock_now() > deadline:  # a budget deadline: on the budget's clock
            raise RuntimeError(f"rank 0 did not finish its solo phase {_waits} by the run's deadline")
        time.sleep(POLL_S)


_released = None  # flags shared with the launcher (one per rank), when it spawned us


def share_release_flags(flags) -> None:  # noqa: ANN001  (a multiprocessing array)
    global _released
    _released = flags


def release(info: DistInfo) -> None:
    """This rank needs no peer any more (its collectives are over): the launcher may then ignore a
    peer that dies, instead of stopping this rank (rank 0 predicting alone must not be cut short)."""
    if info.enabled and _released is not None:
        _released[info.rank] = 1


def shutdown(info: DistInfo) -> None:
    global _store
    _CONTROL.pop("group", None)
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
    _store = None


def agree(info: DistInfo, stop: bool, progress: float) -> tuple[bool, float]:
    """Everyone adopts rank 0's decision and schedule position, every step. The message goes over a
    CPU (gloo) group even when the gradients go over NCCL: a broadcast of a GPU tensor is a
    host-to-device copy and two reads back per step, each a wait for the GPU."""
    if not info.enabled:
        return stop, progress
    t = torch.tensor([float(stop), progress], dtype=torch.float64)
    dist.broadcast(t, src=0, group=control_group(info))
    stop_now, position = t.tolist()  # a CPU tensor: no device involved
    return bool(stop_now), float(position)


def control_group(info: DistInfo):
    """The process group for small per-step control messages: the default one when it runs on the
    CPU (gloo), else a gloo group over the same ranks, made on first use (every rank reaches its
    first `agree` together, as new_group requires)."""
    if info.backend != "nccl":
        return None
    if "group" not in _CONTROL:
        timeout = datetime.timedelta(seconds=float(_CONTROL.get("timeout_s", 1800.0)))
        _CONTROL["group"] = dist.new_group(backend="gloo", timeout=timeout)
    return _CONTROL["group"]


def broadcast_object(info: DistInfo, obj):
    """Rank 0's value of a small picklable object, on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_comm_device(info))
    return box[0]


def sum_over_ranks(info: DistInfo, t: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `t` over the ranks (every rank calls it at the same point), on t's device;
    it goes through the device the backend takes (an epoch-end message, not a per-step one)."""
    if not info.enabled:
        return t
    box = t.to(_comm_device(info))
    dist.all_reduce(box)
    return box.to(t.device)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def _comm_device(info: DistInfo) -> torch.device:
    return torch.device("cuda", info.local_rank) if info.backend == "nccl" else torch.device("cpu")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def wrap(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    if not info.enabled:
        return model
    device_ids = [info.local_rank] if info.device().type == "cuda" else None
    # No buffer sync inside forward: rank 0 validates alone, and a collective inside its forward
    # would wait forever for ranks that are not running one. (Newer torch renamed the switch.)
    params = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **no_sync)
