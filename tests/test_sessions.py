"""One learning-rate schedule laid over several Kaggle sessions (resume.py)."""
import json
import time

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY
from test_train import _setup

from kernelkit.app.cli import main
from kernelkit.engine.budget import BudgetClock, InferenceReserve, Progress, lr_factor
from kernelkit.engine.checkpoint import load_checkpoint
from kernelkit.engine.resume import first_slice, next_slice
from kernelkit.engine.trainer import FitOptions, FitState, Trainer, TrainParts, Validation
from kernelkit.inputs.competition import load_competition
from kernelkit.inputs.submission import validate_submission
from kernelkit.model.losses import get_loss

TINY = [*TINY, "--budget", "5m"]


def test_slices_share_what_is_left_among_the_sessions_left():
    assert first_slice(3, 0) == pytest.approx(1 / 3)
    assert first_slice(3, 6) == pytest.approx(2 / 6)
    assert next_slice({"session": 1, "progress": 1 / 3, "epoch": 0}, 3, 0) == (2, pytest.approx(2 / 3))
    # Session 1 stopped early (SIGTERM at 0.2): the two sessions left share the rest evenly.
    assert next_slice({"session": 1, "progress": 0.2, "epoch": 0}, 3, 0) == (2, pytest.approx(0.6))
    assert next_slice({"session": 2, "progress": 0.66, "epoch": 0}, 3, 0) == (3, pytest.approx(1.0))
    assert next_slice({"session": 2, "progress": 4 / 6, "epoch": 4}, 3, 6) == (3, 1.0)
    assert next_slice({"session": 1, "progress": 0.3, "epoch": 1}, 2, 3) == (2, 1.0)
    # The last session stopped early: one more session finishes the schedule.
    assert next_slice({"session": 3, "progress": 0.9, "epoch": 0}, 3, 0) == (4, pytest.approx(1.0))


def test_progress_stops_at_the_slice_end_and_never_goes_back():
    clock = BudgetClock(100.0, start_time=time.time() - 50.0)  # 50 s used
    progress = Progress(clock, start_progress=0.2, end=0.6)
    assert progress.at(deadline_s=150.0) == pytest.approx(0.2, abs=0.01), "starts where the last session stopped"
    clock.start_time -= 25.0  # 25 s later
    assert Progress(clock, 0.2, end=0.6).at(deadline_s=150.0) == pytest.approx(0.2, abs=0.01)
    assert progress.at(deadline_s=60.0) == pytest.approx(0.6), "past the deadline: the end of its slice, not 1"
    progress = Progress(clock, start_progress=0.2, end=0.6)
    clock.start_time -= 25.0
    first = progress.at(deadline_s=125.0)  # 25 of the 50 s to the deadline gone
    assert first == pytest.approx(0.2 + 0.4 * 25 / 50, abs=0.01)
    assert progress.at(deadline_s=400.0) == first, "a later deadline does not take the schedule backwards"


@pytest.fixture
def own_cpu_time_clock(monkeypatch):
    """The budget clock on this process's CPU time (core/clock.py's test clock at a factor of ~1): a step
    costs what it costs this process, whatever else loads the machine. On the wall clock a busy machine
    (a benchmark beside the suite) once stalled a step long enough to end a 6 s session early."""
    from kernelkit.core import clock
    monkeypatch.setattr(clock, "FACTOR", 1.0 + 1e-9)
    monkeypatch.setattr(clock, "START", time.time() - time.process_time())


def test_a_wall_clock_schedule_over_three_sessions_continues_each_slice(single_label_dir, monkeypatch,
                                                                        own_cpu_time_clock):
    """Three sessions of 6 s each (epochs=0): session k trains progress ((k-1)/3, k/3], each step at
    the LR the one long schedule has there, the next session starts where the last stopped, and the
    third ends the schedule (progress ~1, LR ~0)."""
    import kernelkit.engine.trainer as train_module
    comp, tl, vl, vt, model, opt, scaler = _setup(single_label_dir, batch=2)
    parts = TrainParts(model, opt, scaler, get_loss("auto", comp.task))
    steps: list[tuple[int, float, float]] = []  # (session, progress, LR) of every step
    ckpt, state, slices = None, None, []
    real_set_lr = train_module.set_lr

    def recording_set_lr(optimizer, lr):
        steps.append((state.session, state.progress, lr))
        real_set_lr(optimizer, lr)

    monkeypatch.setattr(train_module, "set_lr", recording_set_lr)
    for k in (1, 2, 3):
        session, end = (1, first_slice(3, 0)) if ckpt is None else next_slice(ckpt, 3, 0)
        state = FitState(progress=ckpt["progress"] if ckpt else 0.0, session=session, session_end=end)
        reserve = InferenceReserve(12, len(vt), 2, overhead_s=0.0)
        reserve.startup_s = 0.0
        trainer = Trainer(parts, FitOptions(lr=1e-3, warmup=0.1), BudgetClock(6.0, 0.0), reserve,
                          torch.device("cpu"), state=state)
        result = trainer.fit(tl, Validation(vl, vt, comp.task))
        assert result.stop_reason == "budget" and session == k
        # Near, not at, the end: the stop comes one (smoothed) step before the deadline, and a step can
        # take seconds on a loaded machine.
        assert k / 3 - 0.2 < state.progress <= k / 3 + 1e-9, "stopped in the last part of its slice"
        slices.append((state.session_end - (end - (ckpt["progress"] if ckpt else 0.0)), end))
        ckpt = {"session": session, "progress": state.progress, "epoch": state.epoch}
    progress = [p for _, p, _ in steps]
    assert progress == sorted(progress), "each session starts where the previous one stopped"
    for k, p, lr in steps:
        start, end = slices[k - 1]
        assert start - 1e-9 <= p <= end + 1e-9, "every step inside its session's slice"
        assert lr == pytest.approx(1e-3 * lr_factor(p, 0.1)), "the LR of the one long schedule"
    assert {k for k, _, _ in steps} == {1, 2, 3}
    assert state.progress > 0.8 and lr_factor(state.progress, 0.1) < 0.23, "the schedule ends in session 3"


def _history(out):
    return pd.read_csv(out / "history.csv")


def test_three_sessions_with_fixed_epochs_end_where_one_long_run_ends(single_label_dir, tmp_path):
    common = [*TINY, "--data-dir", str(single_label_dir), "--epochs", "6"]
    assert main({}, [*common, "--out-dir", str(tmp_path / "long")]) == 0
    long_ckpt = load_checkpoint(tmp_path / "long" / "last.pt")
    comp = load_competition(single_label_dir)
    previous = None
    for k in (1, 2, 3):
        out = tmp_path / f"s{k}"
        args = [*common, "--sessions", "3", "--out-dir", str(out)]
        assert main({}, args + (["--resume-from", str(previous / "last.pt")] if previous else [])) == 0
        validate_submission(out / "submission.csv", comp)
        summary = json.loads((out / "summary.json").read_text())
        ckpt = load_checkpoint(out / "last.pt")
        assert summary["session"] == ckpt["session"] == k and summary["sessions"] == 3
        assert _history(out).epoch.tolist() == [2 * k - 2, 2 * k - 1], "session k trains epochs of its slice"
        assert ckpt["session_end"] == pytest.approx(k / 3)
        assert (k - 1) / 3 < ckpt["progress"] <= k / 3
        previous = out
    assert ckpt["step"] == long_ckpt["step"] and ckpt["progress"] == pytest.approx(long_ckpt["progress"])
    assert ckpt["epoch"] == long_ckpt["epoch"] == 6
    lr_chain = pd.concat([_history(tmp_path / f"s{k}") for k in (1, 2, 3)]).lr_end.to_numpy()
    assert np.allclose(lr_chain, _history(tmp_path / "long").lr_end.to_numpy()), "one schedule, three sessions"
    assert lr_chain[-1] < 3e-3 * 0.1


def test_finished_or_mismatched_schedules_are_refused_at_start(single_label_dir, tmp_path, capsys):
    common = [*TINY, "--data-dir", str(single_label_dir), "--epochs", "2", "--sessions", "2"]
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    assert main({}, [*common, "--out-dir", str(s1)]) == 0
    capsys.readouterr()
    assert main({}, [*TINY, "--data-dir", str(single_label_dir), "--epochs", "2", "--sessions", "1",
                     "--out-dir", str(tmp_path / "x"), "--resume-from", str(s1 / "last.pt")]) == 2
    err = capsys.readouterr().err
    assert "sessions: checkpoint 2, now 1" in err
    assert main({}, [*common, "--lr", "1e-3", "--out-dir", str(tmp_path / "y"),
                     "--resume-from", str(s1 / "last.pt")]) == 2
    assert "lr: checkpoint 0.003, now 0.001" in capsys.readouterr().err
    assert main({}, [*common, "--out-dir", str(s2), "--resume-from", str(s1 / "last.pt")]) == 0
    capsys.readouterr()
    assert main({}, [*common, "--out-dir", str(tmp_path / "z"), "--resume-from", str(s2 / "last.pt")]) == 2
    err = capsys.readouterr().err
    assert "already finished (session 2 of 2" in err and "--mode infer" in err
    assert not any((tmp_path / d / "submission.csv").exists() for d in ("x", "y", "z"))
    assert main({}, [*common, "--epochs", "1"]) == 2, "epochs cannot be split over more sessions"
    assert "need epochs >= sessions" in capsys.readouterr().err
