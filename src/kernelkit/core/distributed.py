"""Data-parallel training over several processes (Kaggle's "GPU T4 x2"), started from inside
kernel.py (no torchrun on Kaggle) or by torchrun.

Rank 0 owns the budget clock: it decides when training stops and what the schedule position is,
and broadcasts both every step, so all ranks take the same number of steps with the same LR.
Only rank 0 validates, writes checkpoints and the submission.
"""
from __future__ import annotations

import datetime
import inspect
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


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
        if torch.cuda.is_available() and self.backend != "gloo":
            return torch.device("cuda", self.local_rank)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


def init(info: DistInfo, init_method: str = "env://", timeout_s: float = 1800.0) -> None:
    if info.backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(info.backend, init_method=init_method, rank=info.rank, world_size=info.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    _CONTROL["timeout_s"] = timeout_s  # the control group waits as long as the default one


def shutdown(info: DistInfo) -> None:
    _CONTROL.pop("group", None)
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


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
    device_ids = [info.local_rank] if info.backend == "nccl" else None
    # No buffer sync inside forward: rank 0 validates alone, and a collective inside its forward
    # would wait forever for ranks that are not running one. (Newer torch renamed the switch.)
    params = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **no_sync)
