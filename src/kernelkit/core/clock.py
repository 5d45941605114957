"""The one clock every budget decision reads: elapsed time, deadlines, throughput, checkpoint cadence.

`now()` is the wall clock, time.time(). Tests and benchmarks only (not an option, not in --help)
can set the environment variable KERNELKIT_TEST_CLOCK to `FACTOR` or `FACTOR@START`, read here and
nowhere else: the clock then reads START (default: the import of this module) plus FACTOR times the
CPU time this process has used. Every piece of work is FACTOR times longer on this clock, so a step
that takes 30 ms of CPU counts as 30 ms x FACTOR against the budget, and a 9-hour schedule runs in
9 h / FACTOR with its inference reserve, cadence and deadlines exercised, not bypassed. CPU time,
not wall time: on a shared machine the wall clock also holds other processes' load, which FACTOR
would turn into hours; the CPU time is this run's own work. (The simulated runs are one process
with no loader workers, whose CPU would not count; the only wait on this clock, a rank polling for
rank 0 in distributed.main_done, needs several ranks and so never runs on it.)
A restart after a kill is given START = the time of the kill, so one run keeps one time line.
"""
from __future__ import annotations

import os
import time

ENV = "KERNELKIT_TEST_CLOCK"


def _parse(value: str) -> tuple[float, float]:
    """-> (factor, start) from 'FACTOR' or 'FACTOR@START'; an empty value is the real clock."""
    if not value.strip():
        return 1.0, 0.0
    factor, _, start = value.partition("@")
    f = float(factor)
    if not f > 0:
        raise ValueError(f"{ENV}={value!r}: the factor must be positive")
    return f, float(start) if start else time.time()


FACTOR, START = _parse(os.environ.get(ENV, ""))


def scaled() -> bool:
    return FACTOR != 1.0


def now() -> float:
    return START + FACTOR * time.process_time() if scaled() else time.time()


def at(wall_time: float) -> float:
    """The clock's reading for a time.time() taken at process start (kernel.py records it before the
    imports); on the test clock that is START, so the imports count against the budget either way."""
    return START if scaled() else wall_time
