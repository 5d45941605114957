"""Issue 22 item 1: a 9-hour Kaggle session on a scaled clock.

The package reads every time the budget logic uses through kernelkit.core.clock; the test-only
environment variable KERNELKIT_TEST_CLOCK makes that clock run FACTOR times faster (FACTOR x the
process's CPU time, so a step costs its measured cost x FACTOR and the inference reserve is measured,
not bypassed). With the real defaults (budget 9h, margin 10 min, checkpoint_every 20m, warm-up,
progressive resizing, swa=0.25, sessions=3) one schedule runs here in about two minutes:

  session 1: budget 9h, SIGKILLed at simulated hour 5, restarted in the same out_dir, finishes;
  sessions 2 and 3: resume_from the previous last.pt (6h each, shorter than 9h to keep the test
  short; the budget is not part of the schedule, the progress slices are).

What the logs, history.csv and summary.json say is checked against the schedule.
"""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, make_single_label_csv

from kernelkit.core.clock import _parse
from kernelkit.engine.budget import lr_factor

FACTOR = 600  # 9 h of schedule in 54 s of CPU
LR = 1e-3
CAP_GB = 0.1
BATCH = 8
ARGS = ["--model", "test_resnet", "--img-size", "64", "--batch-size", str(BATCH), "--lr", str(LR), "--num-workers", "0",
        "--sessions", "3", "--swa", "0.25", "--tta", "2", "--output-cap-gb", str(CAP_GB)]
NINE_H, MARGIN, EVERY = 9 * 3600, 600, 1200  # budget 9h: margin auto = min(10 min, 2% + 2 s)
SAVE = re.compile(r"saving (last|best)\.pt at (?:(\d+)h)?(\d+)m(\d+)s")
EPOCH = re.compile(r"INFO epoch \d+ ")


def _seconds(m: re.Match) -> int:
    return int(m.group(2) or 0) * 3600 + int(m.group(3)) * 60 + int(m.group(4))


def _env(start: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # One thread: CPU time then measures the work itself (two threads on two busy cores spin and
    # contend, which multiplies the CPU a step takes several times over).
    env.update(PYTHONPATH=str(ROOT / "src"), PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1",
               KERNELKIT_TEST_CLOCK=f"{FACTOR}@{start!r}")
    return env


def _start(data: Path, out: Path, log: Path, start: float, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "kernelkit", "--data-dir", str(data), "--out-dir", str(out), *ARGS, *extra]
    return subprocess.Popen(cmd, env=_env(start), stdout=log.open("a"), stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, log: Path) -> None:
    try:
        rc = proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert rc == 0, log.read_text()[-4000:]


def _kill_at(proc: subprocess.Popen, log: Path, at_s: int) -> int:
    """SIGKILL once the log shows a save at or past `at_s` on the run's clock; -> that save's time."""
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        times = [_seconds(m) for m in SAVE.finditer(log.read_text())]
        if times and times[-1] >= at_s:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return times[-1]
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"no save past {at_s}s before the process ended:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def schedule(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("scaled")
    # Epochs of ~40 simulated minutes at the first stage (32 px) even on a quiet, fast CPU, so the
    # 20-minute cadence must fire inside them (2,000 images gave ~16 min there, and the check passed only
    # on a loaded machine). The schedule is fixed by the clock, so more images cost no more training.
    data = make_single_label_csv(root / "data", n_train=5000, n_test=60, n_classes=3)
    out = [root / f"s{k}" for k in (1, 2, 3)]
    logs = [root / f"s{k}.log" for k in (1, 2, 3)]
    first = _start(data, out[0], logs[0], time.time(), "--budget", "9h")
    killed_at = _kill_at(first, logs[0], 5 * 3600)
    run_start = json.loads((out[0] / "run_state.json").read_text())["run_start"]
    # The restart begins where the killed process stopped, on the same time line.
    _finish(_start(data, out[0], logs[0], run_start + killed_at, "--budget", "9h"), logs[0])
    # A resumed session's start-up (imports, 5,000 headers, the checkpoint) and its measured inference
    # reserve are CPU time x FACTOR too: 2h50m together on a slow day of this 2-core machine, where a
    # 2h budget was refused. 6h leaves twice that, and trains ~20 s of CPU a session.
    for k in (1, 2):
        _finish(_start(data, out[k], logs[k], time.time(), "--budget", "6h",
                       "--resume-from", str(out[k - 1] / "last.pt")), logs[k])
    return {"root": root, "out": out, "log": [p.read_text() for p in logs], "killed_at": killed_at,
            "summary": [json.loads((o / "summary.json").read_text()) for o in out],
            "history": [pd.read_csv(o / "history.csv") for o in out]}


def test_clock_factor_is_read_from_the_harness_variable_only():
    assert _parse("") == (1.0, 0.0)
    assert _parse("600@100.5") == (600.0, 100.5)
    with pytest.raises(ValueError):
        _parse("0")


def test_the_killed_session_resumes_on_one_time_line(schedule):
    log = schedule["log"][0]
    assert log.count("resumed from") == 1, "the restart continues from last.pt"
    state = json.loads((schedule["out"][0] / "run_state.json").read_text())
    assert state["restarts"] == 1 and state["finished"]
    saves = [_seconds(m) for m in SAVE.finditer(log)]
    k = len(saves) - 1 - saves[::-1].index(schedule["killed_at"])  # the last save before the kill
    assert saves[k + 1] > saves[k], "the restarted process's clock goes on from the kill, not from zero"


def test_checkpoints_every_20_simulated_minutes(schedule):
    """Between consecutive saves of a session never 2 x 20 min (one would have been missed); a save
    not at an epoch end (the cadence's own) comes at least 20 min after the one before."""
    cadences = []
    for log, hist in zip(schedule["log"], schedule["history"]):
        # A save due during a validation waits for it: on a slow day one validation was 13 min of this
        # clock (1.3 s real), so the bound is two cadences plus the session's longest validation.
        allowed = 2 * EVERY + float(hist.val_s.max())
        lines = [ln for ln in log.splitlines() if SAVE.search(ln) or EPOCH.search(ln) or "resumed from" in ln]
        prev, cadence = None, 0
        for i, ln in enumerate(lines):
            m = SAVE.search(ln)
            if not m:
                prev = None if "resumed from" in ln else prev  # the restart's first save follows the kill
                continue
            t = _seconds(m)
            if prev is not None:
                assert t - prev < allowed, f"{t - prev}s without a checkpoint before {ln}"
                if m.group(1) == "last" and not EPOCH.search(lines[i - 1]):
                    assert t - prev >= EVERY, ln
                    cadence += 1
            prev = t
        cadences.append(cadence)
    assert cadences[0] >= 2 and sum(cadences) >= 3, f"epochs here outlast 20 min: the cadence fires in them {cadences}"


def test_stages_warmup_lr_and_slices_follow_the_schedule(schedule):
    logs = "\n".join(schedule["log"])
    # 4 stages over [0, 0.75): each change at the first step at or past 1/4, 1/2, 3/4 (the last save
    # before it is still below; progress may jump when a slow validation moves the deadline earlier)
    changes = list(re.finditer(r"resolution -> (\d+) px at p=([\d.]+)", logs))
    assert [int(m.group(1)) for m in changes] == [40, 48, 64]
    for m, boundary in zip(changes, (0.25, 0.5, 0.75)):
        before = re.findall(r"saving \w+\.pt at \S+ \(p=([\d.]+)\)", logs[:m.start()])
        # p is logged to 4 decimals: a save at p=0.49996, before the change at 0.5, reads "0.5000" (CI saw it)
        assert float(before[-1]) < boundary + 5e-5 and boundary <= float(m.group(2)), m.group(0)
    ends = [s["progress"] for s in schedule["summary"]]
    for k, (start, end, hist) in enumerate(zip([0.0, *ends[:2]], ends, schedule["history"])):
        # A session stops when its next step would cross its deadline, so it ends short of its slice by
        # about a step (a step's share of the slice, read off the session itself: ~0.003-0.005 on a slow
        # CPU; up to 3 where a step runs slower than the ones the session timed)
        per_step = (end - start) / (hist.train_images.sum() / BATCH)
        assert (k + 1) / 3 - 3 * per_step - 0.002 <= end <= (k + 1) / 3 + 0.002, f"session {k + 1} ends at its slice"
    for start, hist in zip([0.0, *ends[:2]], schedule["history"]):  # warm-up then linear decay, by progress
        rows = list(hist.itertuples())
        for row in rows[:-1]:
            assert row.lr_end == pytest.approx(LR * lr_factor(row.progress), rel=0.02, abs=LR * 0.005)
        # A session's last epoch stops at a deadline check, which reads the clock once more after the last
        # step set its LR: a checkpoint saved in between moves that progress on (x600 here; CI saw 0.015).
        # The LR lies between the schedule's at the epoch before (or the session's start) and at the stop.
        before, last = rows[-2].progress if len(rows) > 1 else start, rows[-1]
        bounds = sorted((LR * lr_factor(before), LR * lr_factor(last.progress)))
        assert bounds[0] - LR * 0.005 <= last.lr_end <= bounds[1] + LR * 0.005, (before, last.progress, last.lr_end)
    last = schedule["history"][2].iloc[-1]  # its LR follows its progress (above), so LR ~0 at the deadline:
    assert last.progress >= 1 - 3 * per_step - 0.002, "the schedule runs to the training deadline"
    assert schedule["history"][0].lr_end.iloc[0] < LR, "the first epoch is still warming up"
    swa = [s["swa"] for s in schedule["summary"]]
    assert swa[0] is None and swa[2]["snapshots"] > 0, "averaging only in the last 25% of the schedule"
    assert "weight average: 0 snapshot(s)" in schedule["log"][0]


def test_submission_inside_the_budget_and_outputs_under_the_cap(schedule):
    first = schedule["summary"][0]
    assert first["submitted_at_s"] <= NINE_H - MARGIN, "the reserve leaves the submission before 9h less the margin"
    assert first["train_end_s"] < first["submitted_at_s"]
    for s, out in zip(schedule["summary"], schedule["out"]):
        assert s["exit_status"] == 0 and (out / "submission.csv").is_file()
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        assert size <= CAP_GB * 1e9, f"{out.name}: {size} bytes"
    assert not math.isnan(first["val_score"])
