"""tqdm that stays readable in Kaggle's log, where every carriage-return refresh becomes a line."""
from __future__ import annotations

import sys
from typing import Iterable

from tqdm.auto import tqdm


class _LineWriter:
    """Turns tqdm's '\\r'-refreshes into whole lines, so a non-tty log gets one clean line each."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s: str) -> None:
        s = s.replace("\r", "").strip()
        if s:
            self.stream.write(s + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(it: Iterable, desc: str = "", total: int | None = None, log_every_s: float = 30.0, **kw) -> tqdm:
    if sys.stderr.isatty():
        return tqdm(it, desc=desc, total=total, dynamic_ncols=True, **kw)
    # Kaggle/CI logs: loops shorter than `log_every_s` print nothing (the caller logs a summary),
    # longer ones print a line every `log_every_s`.
    return tqdm(it, desc=desc, total=total, mininterval=log_every_s, delay=log_every_s, ascii=True,
                ncols=100, file=_LineWriter(sys.stdout), **kw)
