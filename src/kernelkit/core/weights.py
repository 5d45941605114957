"""Pretrained weights as people attach them: a file, or a timm / Hugging Face folder.

Public "timm weights" datasets and Kaggle Models hold the folder `timm.models.save_for_hf` writes:
config.json (architecture, num_classes, pretrained_cfg with the model's mean/std) beside
model.safetensors or pytorch_model.bin, often under /kaggle/input/<model>/pytorch/<variation>/<version>/.
Reading the folder here needs only json and pathlib, so a wrong path is refused at start, before
torch or timm are imported.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")
WEIGHT_EXTS = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
MAX_DEPTH = 4  # <model>/pytorch/<variation>/<version>/
# pretrained_cfg keys that would send timm to the network (hub ids, URLs) instead of our file.
_SOURCE_KEYS = ("source", "hf_hub_id", "hf_hub_filename", "hf_hub_revision", "url", "file", "state_dict")


@dataclass(frozen=True)
class WeightsSource:
    file: Path
    architecture: str = ""  # from config.json; "" for a bare file
    num_classes: int = 0  # the classifier size of the weights (0: unknown, timm's default applies)
    pretrained_cfg: dict[str, Any] = field(default_factory=dict)

    def overlay(self) -> dict[str, Any]:
        """timm `pretrained_cfg_overlay`: the folder's own config, pointing at the local file.
        Works on timm 0.9, which has no `local-dir:` model names."""
        cfg = {k: v for k, v in self.pretrained_cfg.items() if k not in _SOURCE_KEYS}
        if self.num_classes:
            cfg["num_classes"] = self.num_classes
        return {**cfg, "file": str(self.file)}


def _config_dirs(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        if len(Path(dirpath).relative_to(folder).parts) >= MAX_DEPTH:
            dirnames[:] = []
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if "config.json" in filenames and any(n in filenames for n in WEIGHT_NAMES):
            found.append(Path(dirpath))
    return found


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("architecture"), str) or not cfg["architecture"]:
        raise ValueError(f"{path}: no 'architecture' entry, so this is not a timm model folder "
                         "(timm.models.save_for_hf writes one); set model= and point pretrained_path at the weights file")
    return cfg


def _bare_file(folder: Path) -> Path:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in WEIGHT_EXTS)
    if len(files) == 1:
        return files[0]
    what = f"several weights files {[p.name for p in files]}" if files else "no config.json and no weights file"
    raise ValueError(f"pretrained_path={str(folder)!r}: {what}; point it at one file, or at a timm folder "
                     f"(config.json + {WEIGHT_NAMES[0]} or {WEIGHT_NAMES[1]})")


def resolve_weights(path: str | Path) -> WeightsSource:
    """A weights file, or the timm folder at or below `path`; ValueError names what is wrong."""
    path = Path(path)
    if path.is_file():
        return WeightsSource(path)
    if not path.is_dir():
        raise ValueError(f"pretrained_path={str(path)!r} does not exist; attach the weights (a dataset or a "
                         "Kaggle Model) and point to the file or its folder")
    dirs = _config_dirs(path)
    if len(dirs) > 1:
        raise ValueError(f"pretrained_path={str(path)!r} holds several timm model folders "
                         f"{[str(d) for d in dirs[:5]]}; point it at one of them")
    if not dirs:
        return WeightsSource(_bare_file(path))
    cfg = _read_config(dirs[0])
    file = next(dirs[0] / n for n in WEIGHT_NAMES if (dirs[0] / n).is_file())
    pretrained_cfg = cfg.get("pretrained_cfg") if isinstance(cfg.get("pretrained_cfg"), dict) else {}
    num_classes = cfg.get("num_classes", pretrained_cfg.get("num_classes", 0))
    return WeightsSource(file, cfg["architecture"], int(num_classes or 0), pretrained_cfg)


NO_WEIGHTS = "none"  # pretrained_path=none: random init, and no search of the attached inputs


def weights_given(path: str) -> bool:
    """pretrained_path names weights (not empty, not 'none')."""
    return bool(path) and path.strip().lower() != NO_WEIGHTS


def same_architecture(a: str, b: str) -> bool:
    """'convnext_tiny' and 'convnext_tiny.fb_in22k' are one architecture (the tag names weights)."""
    return a.split(".")[0] == b.split(".")[0]


def fixed_size_architecture(name: str) -> bool:
    """Whether timm's registry marks architecture `name` as taking only its own input size (ViT, DeiT,
    Swin: their patch embedding asserts on any other), which input_mode rect's rectangles cannot feed."""
    if not name or name == "auto":
        return False
    try:
        import timm
        cfg = timm.models.get_pretrained_cfg(name.split(".")[0])
    except Exception:  # noqa: BLE001  (an unknown name is reported by the model build, not here)
        return False
    return bool(getattr(cfg, "fixed_input_size", False))


SEARCH_DEPTH = 7  # /kaggle/input/models/<owner>/<model>/pytorch/<variation>/<version>/
SEARCH_MAX_ENTRIES = 200  # a folder with more entries is data (images), not a folder of attachments


def _listing(folder: Path) -> tuple[list[Path], set[str]]:
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return [], set()
    files = {e.name for e in entries if e.is_file()}
    if len(entries) > SEARCH_MAX_ENTRIES:
        return [], files
    return sorted(Path(e.path) for e in entries if e.is_dir() and not e.name.startswith(".")), files


def _is_timm_folder(folder: Path, files: set[str]) -> bool:
    if "config.json" not in files or not any(n in files for n in WEIGHT_NAMES):
        return False
    try:
        _read_config(folder)
        return True
    except ValueError:  # a transformers config or other JSON: not weights we can build
        return False


def find_weights_folders(root: Path, skip: Path | None = None) -> list[Path]:
    """Every timm weights folder (config.json naming an architecture + a weights file) at most
    SEARCH_DEPTH levels below `root` (Kaggle Models under models/<owner>/<model>/pytorch/..., datasets
    holding a save_for_hf folder), sorted; `skip` (the competition) is not searched. Image folders
    (many entries) are not descended into, so the search stays fast on big inputs."""
    found: list[Path] = []
    level = [Path(root)]
    for _ in range(SEARCH_DEPTH + 1):
        nxt = []
        for folder in level:
            if skip is not None and folder == skip:
                continue
            dirs, files = _listing(folder)
            if _is_timm_folder(folder, files):
                found.append(folder)
                continue
            nxt.extend(dirs)
        level = nxt
    return sorted(found)


def weights_lines(model: str, pretrained_path: str, found: tuple[Path, ...] | None, training: bool) -> list[str]:
    """What a run fine-tunes from, said first in the log. `found`: the attached weights folders the
    search found (None: no search ran)."""
    if found and len(found) == 1:
        return [f"weights: found attached timm weights {found[0]} ({model}): fine-tuning from them "
                "(pretrained_path=none trains from scratch)"]
    if found:
        return [f"weights: found {len(found)} attached timm weights folders; autopick ranks them by speed: "
                + ", ".join(str(f) for f in found)]
    if weights_given(pretrained_path):
        return [f"weights: fine-tuning {model} from {pretrained_path}"]
    if training and pretrained_path != NO_WEIGHTS:
        searched = "none found among the attached inputs; " if found is not None else ""
        return [f"weights: {searched}training {model} from random init. Pretrained weights would help a lot: "
                "attach a timm ImageNet model (a Kaggle Model, or a dataset with its save_for_hf folder); "
                "on Kaggle it is found and fine-tuned without settings"]
    return []
