"""Issue 12: checkpoints are written in the background, from a snapshot, without losing the
atomic-write guarantees (the previous or the new complete file, never a partial one)."""
import errno
import json
import logging
import threading

import pandas as pd
import pytest
import torch
from conftest import TINY
from test_reliability import DISK_FULL

import kernelkit.engine.checkpoint as checkpoint_module
from kernelkit.app.cli import main
from kernelkit.engine.checkpoint import BEST, LAST, Checkpointer, load_checkpoint
from kernelkit.inputs.competition import load_competition
from kernelkit.inputs.submission import validate_submission

WRITER = "kernelkit-checkpoints"


def _payload(v: float) -> dict:
    """What Trainer.save hands over: state dicts of tensors, nested optimizer state, plain numbers."""
    w = torch.full((3,), v)
    return {"model": {"w": w}, "ema": {"w": w * 2},
            "optimizer": {"state": {0: {"exp_avg": torch.full((3,), v), "step": torch.tensor(v)}},
                          "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0]}]},
            "step": int(v), "rng": {"torch": torch.get_rng_state(), "python": (3, (1, 2), None)}}


class GatedWriter:
    """save_checkpoint that records (file, value, thread) and waits for `gate` before writing."""

    def __init__(self, monkeypatch, fail_on: tuple = ()):
        self.real = checkpoint_module.save_checkpoint
        self.gate, self.started = threading.Event(), threading.Event()
        self.calls, self.fail_on = [], fail_on
        monkeypatch.setattr(checkpoint_module, "save_checkpoint", self)

    def __call__(self, state, path):
        self.calls.append((path.name, state["step"], threading.current_thread().name))
        self.started.set()
        assert self.gate.wait(30), "the test never released the writer"
        if state["step"] in self.fail_on:
            raise self.fail_on[state["step"]]
        self.real(state, path)


def test_save_returns_before_the_write_and_the_file_holds_the_snapshot(tmp_path, monkeypatch):
    writer = GatedWriter(monkeypatch)
    saver = Checkpointer(tmp_path, {"task": "multiclass"})
    payload = _payload(1.0)
    assert saver.save(LAST, payload) is True
    assert writer.started.wait(10)
    assert not (tmp_path / LAST).exists(), "save returned while the write is still held"
    payload["model"]["w"].add_(100.0)  # training goes on and updates everything in place
    payload["optimizer"]["state"][0]["exp_avg"].mul_(-1)
    payload["optimizer"]["state"][0]["step"] += 5
    payload["optimizer"]["param_groups"][0]["lr"] = 7.0
    writer.gate.set()
    saver.flush()
    ckpt = load_checkpoint(tmp_path / LAST)
    assert torch.equal(ckpt["model"]["w"], torch.full((3,), 1.0)), "the values at snapshot time"
    assert torch.equal(ckpt["ema"]["w"], torch.full((3,), 2.0))
    assert torch.equal(ckpt["optimizer"]["state"][0]["exp_avg"], torch.full((3,), 1.0))
    assert ckpt["optimizer"]["state"][0]["step"].item() == 1.0
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == 0.1
    assert ckpt["task"] == "multiclass" and ckpt["format_version"] == checkpoint_module.FORMAT_VERSION
    assert [c[2] for c in writer.calls] == [WRITER], "written by the writer thread, not the caller"
    assert saver.written == 1 and saver.failures == 0
    assert saver.finish()["checkpoints_written"] == 1
    assert not [t for t in threading.enumerate() if t.name == WRITER], "the writer ends when the queue is empty"


def test_a_queued_last_is_replaced_by_a_newer_one_best_never_dropped_order_kept(tmp_path, monkeypatch):
    writer = GatedWriter(monkeypatch)
    saver = Checkpointer(tmp_path, {}, max_pending=2)
    saver.save(BEST, _payload(1))
    assert writer.started.wait(10)  # best(1) is being written: the rest queues behind it
    saver.save(LAST, _payload(2))
    saver.save(BEST, _payload(3))
    saver.save(LAST, _payload(4))  # replaces last(2), which was not started
    blocked = threading.Thread(target=saver.save, args=(BEST, _payload(5)))
    blocked.start()  # the queue holds 2 (best 3, last 4): this save must wait for room
    blocked.join(0.5)
    assert blocked.is_alive(), "a third pending snapshot waits instead of growing memory"
    writer.gate.set()
    blocked.join(10)
    saver.flush()
    assert [(name, step) for name, step, _ in writer.calls] == [(BEST, 1), (BEST, 3), (LAST, 4), (BEST, 5)]
    assert load_checkpoint(tmp_path / BEST)["step"] == 5 and load_checkpoint(tmp_path / LAST)["step"] == 4
    assert saver.blocked_s > 0 and saver.written == 4


@pytest.mark.parametrize("error", DISK_FULL, ids=["OSError", "RuntimeError"])
def test_a_failing_background_write_is_counted_and_the_previous_file_stays(tmp_path, monkeypatch, caplog, error):
    real_save = torch.save

    def fill_the_disk_on_step_2(obj, f, *a, **k):
        if obj["step"] == 2:
            f.write(b"partial")
            raise error
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(checkpoint_module.torch, "save", fill_the_disk_on_step_2)
    saver = Checkpointer(tmp_path, {})
    saver.save(LAST, _payload(1))
    saver.flush()
    with caplog.at_level(logging.ERROR, logger="kernelkit"):
        assert saver.save(LAST, _payload(2)) is True, "accepted: the failure comes later, in the background"
        saver.flush()
    assert saver.failures == 1 and saver.written == 1
    assert "could not save last.pt" in caplog.text and type(error).__name__ in caplog.text
    assert load_checkpoint(tmp_path / LAST)["step"] == 1, "the previous file is intact"
    assert [p.name for p in tmp_path.iterdir()] == [LAST], "the partial temp file is removed"
    saver.save(LAST, _payload(3))
    saver.flush()
    assert load_checkpoint(tmp_path / LAST)["step"] == 3 and saver.failures == 1 and saver.written == 2


def test_update_waits_for_queued_writes_and_is_written_when_it_returns(tmp_path, monkeypatch):
    writer = GatedWriter(monkeypatch)
    saver = Checkpointer(tmp_path, {})
    saver.save(BEST, _payload(1))
    assert writer.started.wait(10)
    done = threading.Thread(target=saver.update, args=(BEST,), kwargs={"threshold_rule": {"kind": "per_class"}})
    done.start()
    done.join(0.3)
    assert done.is_alive(), "update reads best.pt back only once the queued write is on disk"
    writer.gate.set()
    done.join(10)
    assert load_checkpoint(tmp_path / BEST)["threshold_rule"] == {"kind": "per_class"}


def test_training_run_writes_in_the_background_and_resumes(single_label_dir, tmp_path, monkeypatch):
    threads = []
    real = checkpoint_module.save_checkpoint

    def spy(state, path):
        threads.append(threading.current_thread().name)
        real(state, path)

    monkeypatch.setattr(checkpoint_module, "save_checkpoint", spy)
    common = [*TINY, "--data-dir", str(single_label_dir), "--epochs", "2", "--sessions", "2", "--budget", "5m"]
    first, second = tmp_path / "s1", tmp_path / "s2"
    assert main({}, [*common, "--out-dir", str(first)]) == 0
    assert threads and set(threads) == {WRITER}
    summary = json.loads((first / "summary.json").read_text())
    assert summary["checkpoints_written"] >= 2 and summary["failed_saves"] == 0
    assert summary["checkpoint_blocked_s"] >= 0 and summary["checkpoint_write_s"] > 0
    assert load_checkpoint(first / BEST)["epoch"] == 1 and load_checkpoint(first / LAST)["epoch"] == 1
    assert main({}, [*common, "--out-dir", str(second), "--resume-from", str(first / LAST)]) == 0
    assert load_checkpoint(second / LAST)["epoch"] == 2 and load_checkpoint(second / LAST)["session"] == 2
    assert pd.read_csv(second / "history.csv").epoch.tolist() == [1]
    comp = load_competition(single_label_dir)
    for out in (first, second):
        validate_submission(out / "submission.csv", comp)
        assert (out / "model" / "model.safetensors").is_file(), "the export read the flushed checkpoint"


def test_disk_full_during_a_background_write_still_submits(multilabel_dir, tmp_path, monkeypatch):
    """Hostile: the disk fills while a write is in flight and stays full (the threshold rule's update
    of best.pt fails too): exit 0, a valid submission from the last complete best.pt, failures counted."""
    out = tmp_path / "out"
    real_save = torch.save
    calls = {"n": 0}

    def full_from_the_third_write(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] > 2:
            f.write(b"\0" * 1024)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(checkpoint_module.torch, "save", full_from_the_third_write)
    status = main({}, [*TINY, "--data-dir", str(multilabel_dir), "--out-dir", str(out), "--epochs", "3",
                       "--budget", "5m", "--threshold-rule", "class"])
    assert status == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exit_status"] == 0 and summary["failed_saves"] >= 1
    assert summary["checkpoints_written"] == 2 and summary["checkpoint"] in (BEST, LAST, "in-memory model")
    # Which two writes got through depends on the queue: a last.pt still queued when the next epoch's
    # arrives is replaced by it (so on a fast machine both may be best.pt). Whatever is on disk is whole.
    kept = [p for p in (out / BEST, out / LAST) if p.is_file()]
    assert kept and all(load_checkpoint(p)["epoch"] >= 1 for p in kept) and not list(out.glob(".*.tmp*"))
    validate_submission(out / "submission.csv", load_competition(multilabel_dir))


# ----------------------------------------------------------------------------- snapshot memory (issue 21)
def test_snapshot_memory_is_reused_and_bounded(tmp_path):
    """Pinned per snapshot and cached by the host allocator, three full snapshots stayed page-locked
    for good; the arena reuses its buffers and never holds more than its limit, the rest pageable."""
    from kernelkit.engine.checkpoint import SnapshotArena
    nbytes = sum(t.numel() * t.element_size() for t in (_payload(0)["model"]["w"], _payload(0)["ema"]["w"],
                                                         _payload(0)["optimizer"]["state"][0]["exp_avg"]))
    arena = SnapshotArena(limit=nbytes + 8, pin=False)  # the weights and moments fit; the RNG state does not
    saver = Checkpointer(tmp_path, {"task": "multiclass"}, arena=arena)
    for v in range(1, 6):
        assert saver.save(LAST if v % 2 else BEST, _payload(float(v)))
        saver.flush()
        assert arena.allocated <= arena.limit
    after_first = arena.allocated
    for v in range(6, 9):
        saver.save(LAST, _payload(float(v)))
        saver.flush()
    assert arena.allocated == after_first > 0, "later snapshots reuse the buffers, allocate nothing new"
    assert sum(b.numel() for bs in arena.free.values() for b in bs) == arena.allocated, "all back after the writes"
    ckpt = load_checkpoint(tmp_path / LAST)
    assert torch.equal(ckpt["model"]["w"], torch.full((3,), 8.0)) and torch.equal(ckpt["ema"]["w"], torch.full((3,), 16.0))
    assert torch.equal(ckpt["optimizer"]["state"][0]["exp_avg"], torch.full((3,), 8.0))
    assert torch.equal(load_checkpoint(tmp_path / BEST)["model"]["w"], torch.full((3,), 4.0))


def test_a_queued_snapshot_keeps_its_buffers_until_written(tmp_path, monkeypatch):
    """Buffers go back only after the write: a snapshot waiting in the queue must not be overwritten
    by the next one reusing its memory."""
    from kernelkit.engine.checkpoint import SnapshotArena
    writer = GatedWriter(monkeypatch)
    arena = SnapshotArena(limit=1 << 20, pin=False)
    saver = Checkpointer(tmp_path, {"task": "multiclass"}, arena=arena)
    saver.save(BEST, _payload(1.0))
    assert writer.started.wait(10)
    saver.save(BEST, _payload(2.0))  # queued behind the held write
    assert not arena.free, "no buffer is free while both snapshots wait"
    writer.gate.set()
    saver.flush()
    assert torch.equal(load_checkpoint(tmp_path / BEST)["model"]["w"], torch.full((3,), 2.0))
    assert [c[1] for c in writer.calls] == [1, 2]


def test_the_writer_waits_for_the_copies_on_a_blocking_event(monkeypatch):
    """A default CUDA event spins a CPU core in synchronize() for as long as the copy takes."""
    import contextlib
    made = []

    class Event:
        def __init__(self, **kwargs):
            made.append(kwargs)

        def record(self):
            pass
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    events = checkpoint_module.ready_events([torch.device("cuda", 0)])
    assert len(events) == 1 and made == [{"blocking": True}]
