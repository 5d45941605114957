"""Checkpoints: one owner for their names, one atomic write, a versioned format.

Writes happen in the background (`Checkpointer`): `save` copies the payload's tensors to CPU
memory (a snapshot training cannot change) and returns; one writer thread writes the snapshots in
order, each through `fileio.atomic_write` (temp file, fsync, os.replace), so at any instant best.pt
and last.pt on disk are the previous complete file or the new complete one, kill -9 included.
`Checkpointer.flush` waits for the queue; everything that reads a checkpoint back calls it first.

Format history (`format_version`):
  1  (no key) model, ema, optimizer, scaler, epoch, step, progress, best_score, threshold,
     elapsed, run_start, rng, config, classes, task; optionally threshold_rule.
  2  + format_version and seed; older files load through `migrate`. Optionally preprocess (the
     input mean/std; absent: ImageNet's), peak_score (the run's highest validation score, which
     best.pt may trail within noise; absent: best_score).

The inference folder (`export_inference`, INFERENCE_DIR) is what a submission needs and nothing
more: the predicting weights as model.safetensors, a timm config.json (other timm code loads it
with pretrained_cfg_overlay=dict(file=...)), and kernelkit.json with the classes, threshold rule,
input statistics and config. `load_checkpoint` reads it like a checkpoint.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import random
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import torch

from ..core.fileio import atomic_write, write_json

log = logging.getLogger("kernelkit")

FORMAT_VERSION = 2
BEST, LAST = "best.pt", "last.pt"
INFERENCE_DIR = "model"
INFERENCE_META, INFERENCE_WEIGHTS = "kernelkit.json", "model.safetensors"


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """weights_only=True: a checkpoint cannot run code when it is loaded. An inference folder loads
    as a checkpoint without optimizer or progress. `mmap`: tensors are read only when touched (for
    a look at the metadata of a checkpoint that will be loaded in full later)."""
    if Path(path).is_dir():
        return load_inference(Path(path), map_location)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001  (UnpicklingError and friends; re-raised with context)
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise ValueError(f"{path}: refusing checkpoint with pickled objects (weights_only=True): {e}") from e
        raise
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path}: not a kernelkit checkpoint (no 'model' entry)")
    return migrate(ckpt)


def migrate(ckpt: dict[str, Any]) -> dict[str, Any]:
    """Bring an older checkpoint to the current format; newer ones are refused clearly."""
    version = int(ckpt.get("format_version", 1))
    if version > FORMAT_VERSION:
        raise ValueError(f"checkpoint format {version} is newer than this kernel understands ({FORMAT_VERSION}); "
                         "use the kernel.py that wrote it")
    if version == 1:
        ckpt = {**ckpt, "format_version": 2, "seed": ckpt.get("config", {}).get("seed")}
    return ckpt


PINNED_LIMIT = 2 << 30  # bytes of page-locked snapshot memory at most: a Kaggle VM has ~30 GB of RAM in all


class SnapshotArena:
    """Host buffers for snapshots, reused from one checkpoint to the next (a model's tensors have the
    same sizes every time) and never more than `limit` bytes in all. With `pin` (a GPU is there) they
    are page-locked, so the device-to-host copies are asynchronous; allocated per snapshot they were
    up to three full snapshots (model, EMA, SWA, 2x AdamW state) pinned and cached by the host
    allocator for good. Past the limit a tensor is copied to pageable memory, freed after its write."""

    def __init__(self, limit: int = PINNED_LIMIT, pin: bool | None = None):
        self.limit, self.pin = limit, torch.cuda.is_available() if pin is None else pin
        self.allocated = 0
        self.free: dict[int, list[torch.Tensor]] = {}
        self._lock = threading.Lock()  # taken by save (training thread) and give (writer thread)

    def take(self, nbytes: int) -> torch.Tensor | None:
        """A uint8 buffer of `nbytes` (reused when one is free), or None past the limit."""
        with self._lock:
            blocks = self.free.get(nbytes)
            if blocks:
                return blocks.pop()
            if self.allocated + nbytes > self.limit:
                return None
            try:
                buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
            except RuntimeError:  # no page-locked memory to be had: pageable copies from here on
                self.limit = self.allocated
                return None
            self.allocated += nbytes
            return buf

    def give(self, buffers: list[torch.Tensor]) -> None:
        """Back for reuse, once the snapshot that used them is written (or dropped)."""
        with self._lock:
            for b in buffers:
                self.free.setdefault(b.numel(), []).append(b)


def snapshot(obj: Any, arena: SnapshotArena | None = None) -> tuple[Any, list, list]:
    """A copy of `obj` that training can no longer change: every tensor in it (nested in dicts,
    lists, tuples) copied to CPU memory (the optimizer updates the weights in place right after),
    into `arena` buffers while they last. A CUDA tensor copied into a pinned buffer goes
    asynchronously, on the stream that computed it: the caller does not wait for the GPU, and later
    kernels on that stream cannot overwrite the values before the copy has read them.
    -> (copy, CUDA events to wait on before reading the copy, arena buffers to give back after)."""
    events: dict[torch.device, Any] = {}
    buffers: list[torch.Tensor] = []
    out = _copy(obj, events, arena, buffers)
    return out, ready_events(list(events)), buffers


def ready_events(devices: list[torch.device]) -> list:
    """One event per device, recorded now. blocking=True: the writer thread sleeps in synchronize()
    instead of spinning a CPU core (of 4 on Kaggle, which the loaders need) until the copy lands."""
    out = []
    for device in devices:
        with torch.cuda.device(device):
            event = torch.cuda.Event(blocking=True)
            event.record()
            out.append(event)
    return out


def _copy(obj: Any, events: dict, arena: SnapshotArena | None, buffers: list) -> Any:
    if isinstance(obj, torch.Tensor):
        return _copy_tensor(obj.detach(), events, arena, buffers)
    if isinstance(obj, dict):
        copied = copy.copy(obj)  # keeps the type and attributes (a state_dict's _metadata)
        for k, v in obj.items():
            copied[k] = _copy(v, events, arena, buffers)
        return copied
    if type(obj) in (list, tuple):
        return type(obj)(_copy(v, events, arena, buffers) for v in obj)
    return obj  # numbers, strings, None: immutable


def _copy_tensor(t: torch.Tensor, events: dict, arena: SnapshotArena | None, buffers: list) -> torch.Tensor:
    nbytes = t.numel() * t.element_size()
    buf = arena.take(nbytes) if arena is not None and nbytes else None
    if buf is None:
        return t.to("cpu", copy=True)  # pageable (a CUDA tensor: a synchronous copy)
    buffers.append(buf)
    host = buf.view(t.dtype).view(t.shape)
    async_copy = t.device.type == "cuda" and buf.is_pinned()
    if async_copy:
        events.setdefault(t.device, None)
    return host.copy_(t, non_blocking=async_copy)


class Checkpointer:
    """Writes best.pt / last.pt in `out_dir` with the run's metadata (config dict, classes, task,
    seed), in the background: `save` snapshots the payload to CPU memory and queues it for ONE writer
    thread, which writes the snapshots in order, each atomically. A last.pt still queued when a newer
    one comes is replaced by it (a best.pt is always written). At most `max_pending` snapshots wait:
    beyond that `save` waits for the writer, the only time training waits for a checkpoint (counted
    in `blocked_s` with the snapshot time; the writes' own time in `write_s`).

    A failed write is logged and counted in `failures`, never raised: training goes on, and the
    previous file is intact because the write is atomic. `flush` waits until every queued checkpoint
    is on disk; call it before reading one back. The writer is not a daemon thread and ends when the
    queue is empty, so a process that ends still finishes the writes it has queued."""

    def __init__(self, out_dir: Path, meta: dict[str, Any], max_pending: int = 2,
                 arena: SnapshotArena | None = None):
        self.out_dir, self.meta, self.max_pending = Path(out_dir), dict(meta), max_pending
        self.arena = arena or SnapshotArena()
        self.failures = self.written = 0
        self.blocked_s = self.write_s = 0.0
        self._queue: list[tuple[str, dict[str, Any], list, list]] = []
        self._writing = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def path(self, name: str) -> Path:
        return self.out_dir / name

    def save(self, name: str, payload: dict[str, Any]) -> bool:
        """Queue a checkpoint; -> True when accepted (its write's failure, if any, comes later and is
        counted in `failures`), False when not even the snapshot could be taken (counted too)."""
        t0 = time.perf_counter()
        try:
            with self._cond:
                while len(self._queue) >= self.max_pending and not self._queued(name):
                    self._cond.wait()
            state, ready, buffers = snapshot({**payload, **self.meta, "format_version": FORMAT_VERSION}, self.arena)
        except Exception as e:  # noqa: BLE001  (out of CPU memory for the copy: training goes on)
            self._failed(name, e)
            return False
        finally:
            self.blocked_s += time.perf_counter() - t0
        with self._cond:
            if name != BEST:  # a stale last.pt is not worth writing; the newer one keeps the order
                stale = [item for item in self._queue if item[0] == name]
                self._queue = [item for item in self._queue if item[0] != name]
                for item in stale:
                    self._release(item)
            self._queue.append((name, state, ready, buffers))
            if self._thread is None:
                self._thread = threading.Thread(target=self._write_queued, name="kernelkit-checkpoints")
                self._thread.start()
        return True

    def _queued(self, name: str) -> bool:
        return name != BEST and any(item[0] == name for item in self._queue)

    def _failed(self, name: str, e: BaseException) -> None:
        with self._cond:  # counted from the writer thread and from save
            self.failures += 1
        log.error("could not save %s (%s: %s); the previous %s stays usable, training continues",
                  name, type(e).__name__, e, name)

    def _write_queued(self) -> None:
        """The writer thread: one checkpoint at a time, in order, until the queue is empty."""
        while True:
            with self._cond:
                if not self._queue:
                    self._thread = None
                    self._cond.notify_all()
                    return
                item = self._queue.pop(0)
                name, state, ready, _ = item
                self._writing = True
                self._cond.notify_all()  # room in the queue
            t0 = time.perf_counter()
            try:
                for event in ready:
                    event.synchronize()
                save_checkpoint(state, self.path(name))
                ok = True
            except Exception as e:  # noqa: BLE001  (torch.save raises RuntimeError on a full disk, not OSError)
                self._failed(name, e)
                ok = False
            del state
            self._release(item)
            del item
            with self._cond:
                self.written += int(ok)
                self.write_s += time.perf_counter() - t0
                self._writing = False
                self._cond.notify_all()

    def _release(self, item: tuple) -> None:
        """Give a written (or dropped) snapshot's buffers back for the next snapshot."""
        for event in item[2]:
            event.synchronize()  # a dropped snapshot's copies may still be in flight into its buffers
        self.arena.give(item[3])

    def flush(self) -> None:
        """Wait until every queued checkpoint is written (or has failed)."""
        with self._cond:
            while self._queue or self._writing:
                self._cond.wait()

    def finish(self) -> dict[str, Any]:
        """Flush, log what checkpointing cost, -> the numbers for summary.json."""
        self.flush()
        if self.written or self.failures:
            log.info("checkpoints: %d written, %d failed, caller blocked %.2f s, writing took %.2f s in the "
                     "background", self.written, self.failures, self.blocked_s, self.write_s)
        return {"checkpoints_written": self.written, "checkpoint_blocked_s": round(self.blocked_s, 3),
                "checkpoint_write_s": round(self.write_s, 3)}

    def update(self, name: str, **fields: Any) -> bool:
        """Add fields (e.g. the final threshold rule) to an existing checkpoint; returns once the new
        file is written (True) or has failed (False)."""
        self.flush()
        path = self.path(name)
        if not path.is_file():
            return False
        try:
            ckpt = load_checkpoint(path)
        except Exception as e:  # noqa: BLE001
            log.error("could not read %s back to update it (%s)", name, e)
            return False
        failures = self.failures
        accepted = self.save(name, {**ckpt, **fields})
        self.flush()
        return accepted and self.failures == failures


def inference_weights(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights that were validated: the EMA when training kept one."""
    return ckpt.get("ema") or ckpt["model"]


def _timm_config(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """config.json as timm.models.save_for_hf writes it, for a plain timm model (no custom head)."""
    cfg, pre = ckpt.get("config", {}), ckpt.get("preprocess") or {}
    if cfg.get("head", "linear") != "linear" or cfg.get("model2"):
        return None
    size = int(cfg.get("img_size", 224))
    pretrained_cfg = {"input_size": [3, size, size], "crop_pct": 1.0, "num_classes": len(ckpt["classes"]),
                      **{k: pre[k] for k in ("mean", "std", "interpolation") if k in pre}}
    return {"architecture": str(cfg["model"]).split(".")[0], "num_classes": len(ckpt["classes"]),
            "label_names": list(ckpt["classes"]), "pretrained_cfg": pretrained_cfg}


def export_inference(ckpt: dict[str, Any], folder: Path) -> Path:
    """Write the inference folder from a checkpoint; replaces an older folder only once complete."""
    from safetensors.torch import save_file
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # safetensors refuses tensors sharing memory (tied weights); contiguous clones own theirs.
    save_file({k: v.detach().clone().contiguous() for k, v in inference_weights(ckpt).items()},
              str(tmp / INFERENCE_WEIGHTS))
    meta = {k: ckpt.get(k) for k in ("config", "classes", "task", "threshold", "threshold_rule", "preprocess",
                                     "best_score", "seed")}
    write_json(tmp / INFERENCE_META, {**meta, "format_version": FORMAT_VERSION})
    timm_cfg = _timm_config(ckpt)
    if timm_cfg is not None:
        write_json(tmp / "config.json", timm_cfg)
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def load_inference(folder: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    from safetensors.torch import load_file
    meta_path, weights_path = folder / INFERENCE_META, folder / INFERENCE_WEIGHTS
    if not meta_path.is_file() or not weights_path.is_file():
        raise ValueError(f"{folder}: not a kernelkit inference folder (needs {INFERENCE_META} and {INFERENCE_WEIGHTS})")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    device = str(map_location) if not isinstance(map_location, str) else map_location
    return migrate({**meta, "model": load_file(str(weights_path), device=device)})


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        # A checkpoint from a machine with more GPUs (T4 x2 -> one GPU): restore what exists here.
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
