"""The one atomic write: a crash or a full disk never leaves a half-written file at the final name.

Everything the kernel writes to out_dir goes through `atomic_write` (checkpoints, submission.csv,
JSON and CSV reports, .npy arrays): the bytes go to a hidden temp file beside the target, are
fsynced, then `os.replace` swaps it in. On any failure the temp file is removed and the previous
file, if any, is untouched.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

TEMP_GLOB = ".*.tmp*"  # what a killed writer can leave behind; session.remove_partial_files cleans it


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write(path: str | Path, data: bytes | str | Callable[[Any], None]) -> Path:
    """Write `data` (bytes, text, or a function writing to a binary file object) to `path` atomically."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself (not every filesystem lets a directory be fsynced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: str | Path, data: Any) -> Path:
    return atomic_write(path, json.dumps(data, indent=2, default=_plain) + "\n")


def write_npy(path: str | Path, array: Any) -> Path:
    """Streamed into the temp file: no in-memory copy of the bytes (100k x 15,000 probabilities are 6 GB)."""
    import numpy as np
    arr = np.asarray(array)

    def save(f: Any) -> None:
        np.save(f, arr)
    return atomic_write(path, save)


def _plain(x: Any) -> Any:
    """numpy scalars and arrays in summaries -> JSON numbers and lists."""
    if hasattr(x, "tolist"):
        return x.tolist()
    return float(x)
