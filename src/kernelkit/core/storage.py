"""What the run will write, checked against the output cap and the free disk before anything is written.

Kaggle saves everything in /kaggle/working as the kernel's output and keeps at most 20 GB of it; a
run that passes that loses its output. best.pt and last.pt hold the optimizer (convnext_tiny:
319 MB each) and an atomic write briefly holds a third copy, so the checkpoints are planned first
and the image cache, when it lives in the output folder, gets what is left.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError

log = logging.getLogger("kernelkit")

GB = 1e9
KAGGLE_OUTPUT_CAP_GB = 19.5  # of the 20 GB Kaggle keeps: room for the logs Kaggle writes itself
CHECKPOINT_COPIES = 3  # best.pt, last.pt, and the temporary file of the one being written


def checkpoint_bytes(n_params: int, ema: bool) -> int:
    """float32 weights + AdamW's two moments (+ the EMA's copy); buffers and metadata are small."""
    return int(n_params * 4 * (3 + int(ema)) * 1.02) + 1_000_000


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def folder_bytes(folder: Path, skip: Path | None = None) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        if skip is not None and _inside(Path(dirpath), skip):
            dirnames[:] = []
            continue
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


@dataclass
class StoragePlan:
    cap_bytes: int  # 0: no cap
    fixed_bytes: int  # checkpoints, inference weights, small files, what out_dir already holds
    cache_wanted_bytes: int
    cache_allowed_bytes: int
    cache_in_output: bool
    free_bytes: int

    def describe(self) -> str:
        cap = f"cap {self.cap_bytes / GB:.2f} GB" if self.cap_bytes else "no cap"
        where = "in the output folder" if self.cache_in_output else "outside the output"
        return (f"storage plan: checkpoints and outputs ~{self.fixed_bytes / GB:.2f} GB + image cache "
                f"{self.cache_allowed_bytes / GB:.2f} of {self.cache_wanted_bytes / GB:.2f} GB wanted ({where}); "
                f"{cap}, {self.free_bytes / GB:.1f} GB free")


def plan_storage(out_dir: Path, cache_root: Path, *, n_params: int, ema: bool, n_images: int, n_outputs: int,
                 img_size: int, cache_max_gb: float, cap_gb: float) -> StoragePlan:
    """Raises ConfigError when the checkpoints alone cannot fit the cap or the free disk.

    n_outputs: floats written per run besides the checkpoints (test and validation probabilities)."""
    cache_in_output = _inside(cache_root, out_dir)
    fixed = (CHECKPOINT_COPIES * checkpoint_bytes(n_params, ema) + 4 * n_params + 4 * n_outputs + 1_000_000
             + folder_bytes(out_dir, skip=cache_root if cache_in_output else None))
    wanted = n_images * 3 * img_size * img_size
    allowed = min(wanted, int(cache_max_gb * GB)) if cache_max_gb else wanted
    cap = int(cap_gb * GB)
    free = shutil.disk_usage(out_dir).free
    if cap and fixed > cap:
        raise ConfigError(f"the checkpoints need ~{fixed / GB:.2f} GB ({CHECKPOINT_COPIES} x "
                          f"{checkpoint_bytes(n_params, ema) / GB:.2f} GB, {n_params / 1e6:.1f}M parameters) but "
                          f"output_cap_gb={cap_gb:g}; raise the cap, or pick a smaller model")
    if fixed > free:
        raise ConfigError(f"the checkpoints need ~{fixed / GB:.2f} GB but {out_dir} has {free / GB:.2f} GB free")
    if cap and cache_in_output:
        allowed = min(allowed, cap - fixed)
    if cache_in_output or _same_disk(out_dir, cache_root):
        allowed = min(allowed, free - fixed)
    return StoragePlan(cap, fixed, wanted, max(0, allowed), cache_in_output, free)


def _same_disk(a: Path, b: Path) -> bool:
    b = next((p for p in [b, *b.parents] if p.exists()), b)
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return True


def remove_cache_from_output(cache_root: Path, out_dir: Path) -> None:
    """On Kaggle a cache in /kaggle/working would be saved as output (and count against its 20 GB)."""
    if cache_root.is_dir() and _inside(cache_root, out_dir):
        shutil.rmtree(cache_root, ignore_errors=True)
        log.info("removed the image cache %s so it is not saved as output", cache_root)
