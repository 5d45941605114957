"""Every switch that depends on where we run (Kaggle or local) lives here.

Importing this module sets the offline flags, so it must be imported before timm.
"""
from __future__ import annotations

import os
from pathlib import Path

# timm/huggingface_hub otherwise retry a download for ~46 s before failing when internet is off.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

KAGGLE_INPUT = Path("/kaggle/input")
KAGGLE_WORKING = Path("/kaggle/working")


def input_root() -> Path:
    """Where attached competitions and datasets are mounted (KERNELKIT_INPUT_ROOT: a test's fake tree)."""
    return Path(os.environ.get("KERNELKIT_INPUT_ROOT") or KAGGLE_INPUT)


def on_kaggle() -> bool:
    return "KAGGLE_KERNEL_RUN_TYPE" in os.environ or KAGGLE_WORKING.is_dir()


def default_out_dir() -> Path:
    return KAGGLE_WORKING if on_kaggle() else Path("outputs")


def out_dir_for(configured: str) -> Path:
    """The run's output folder: out_dir as configured, else the environment's default."""
    return Path(configured) if configured else default_out_dir()


KAGGLE_TEMP = Path("/kaggle/temp")
KAGGLE_OUTPUT_CAP_GB = 19.5  # Kaggle keeps at most 20 GB of /kaggle/working; room for its own logs


def output_cap_gb(configured: float) -> float:
    """output_cap_gb as configured, -1 resolved for where we run (0 = no cap)."""
    if configured >= 0:
        return configured
    return KAGGLE_OUTPUT_CAP_GB if on_kaggle() else 0.0


def default_cache_dir(out_dir: Path) -> Path:
    """Kaggle saves everything in /kaggle/working as output (20 GB); /kaggle/temp is scratch."""
    if on_kaggle() and KAGGLE_TEMP.is_dir():
        return KAGGLE_TEMP / "kernelkit-cache"
    return out_dir / "cache"


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


MIN_VERSIONS = {"torch": (2, 1), "timm": (0, 9)}


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_versions(versions: dict[str, str]) -> None:
    """Kaggle images lag behind releases: fail at start, clearly, instead of hours later."""
    too_old = [f"{name} {versions[name]} (need >= {'.'.join(map(str, need))})"
               for name, need in MIN_VERSIONS.items() if _version_tuple(versions[name]) < need]
    if too_old:
        raise RuntimeError("package versions too old for this kernel: " + ", ".join(too_old)
                           + "; pick a newer Kaggle docker image (Settings > Environment)")
