"""SIGTERM and SIGINT are requests to finish, not to die.

`timeout`, `docker stop`, schedulers and notebook shutdowns send SIGTERM some seconds before
SIGKILL. The handler only sets a flag: the training loop stops at its next step, prediction drops
to one TTA view, and the kernel writes its submission and exits 0. A second SIGINT (Ctrl-C twice)
interrupts for real.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Iterator

from .clock import now as clock_now

log = logging.getLogger("kernelkit")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopFlag:
    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self.at = 0.0

    def request(self, name: str) -> None:
        if not self.requested:
            self.requested, self.signal_name, self.at = True, name, clock_now()

    def _handle(self, signum: int, frame) -> None:  # noqa: ANN001  (signal handler signature)
        if self.requested and signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt
        self.request(signal.Signals(signum).name)
        # Logged from the handler: the user must see at once that the signal was heard.
        log.warning("%s received: finishing early (stop training, predict, write the submission, exit 0)",
                    self.signal_name)


@contextlib.contextmanager
def handle_signals() -> Iterator[StopFlag]:
    """Install the handlers for the duration of a run (main thread only; elsewhere the flag just
    stays down), and put the previous ones back after."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, flag._handle)
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def ignore_in_worker(worker_id: int = 0) -> None:
    """Loader workers leave signals to the main process: a Ctrl-C or a group SIGTERM must not kill
    them under the main process's feet while it is still predicting. (torch's workers exit on
    their own when the main process dies.)"""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
