"""Red-team corpus: runs kernel.py against hostile options, CSVs, sample submissions, images,
signals, failing disks and kill -9, and checks its exit contract case by case.

The contract checked here (from the outside: exit status, wall time, the file at the submission path):

* exit 0 whenever a valid submission.csv was written. Valid = same ids, order and columns as the
  competition's sample_submission.csv (or, with no sample, one row per test image), the sample's
  delimiter, every prediction cell filled where the task needs it (and, where the case knows them,
  only labels the competition has);
* exit 2 for a refusal before training: within REFUSE_WITHIN_S of the start, no checkpoint written,
  and the last lines of stderr or stdout name the offending option or file;
* any other exit only when no submission could be made; never an invalid file at the submission
  path (a file that was there before must be the valid new one or left untouched); never more
  than budget + OVERRUN_S of wall time.

Each case builds its own competition in a temp dir (tiny coloured images whose colour tells the
class), runs `python kernel.py` (a copy of the repo's, or --kernel PATH) with small settings, and
may act on the process (a signal at a moment, kill -9 then a rerun). Results: a table on stdout
and bench/results/redteam.json (redteam-<selection>.json for --fast / --only runs).

    .venv/bin/python bench/redteam.py                 # the whole corpus, one case at a time (~20 min, 2 cores)
    .venv/bin/python bench/redteam.py --fast          # cases that should not train (refusals, --help): ~1 min
    .venv/bin/python bench/redteam.py --only csv,sample --kernel /tmp/kernel.py
    .venv/bin/python bench/redteam.py --only opt-aug-typo --keep   # keep the case dirs to look at
    .venv/bin/python bench/redteam.py --list
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

REFUSE_WITHIN_S = 20.0  # a refusal must come this soon after the start
OVERRUN_S = 15.0  # no run may pass budget + this
SIGNAL_GRACE_S = 25.0  # after SIGTERM/SIGINT: a valid submission and exit 0 within this (20 s + margin)
BUDGET_S = 40  # default --budget of a case
TAIL_LINES = 25  # "last lines" of stdout / stderr searched for the refusal message

# Small settings for every case that trains (a case may override or drop any of them).
BASE = {"model": "test_resnet", "img-size": "32", "batch-size": "16", "num-workers": "0"}

PALETTE = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 220, 30), (200, 40, 220), (30, 210, 210)]


# ----------------------------------------------------------------------------- competitions

@dataclass
class Spec:
    """A generated competition and what a valid submission for it looks like."""
    data: Path
    sample: Path | None = None  # the competition's sample_submission.csv
    ids: list[str] | None = None  # expected ids (set) when there is no sample
    labels: set[str] | None = None  # the labels a prediction cell may use (None: not checked)
    multi: bool = False  # cells are space-separated label lists
    cells: str = "nonempty"  # nonempty | any | number01 (one-hot / probability columns)
    pred_cols: list[str] | None = None  # prediction columns (default: every column but the id)
    train_rows: list[tuple[str, str]] = field(default_factory=list)
    test_ids: list[str] = field(default_factory=list)


def colour_image(k: int, rng: np.random.Generator, size=(40, 32)) -> Image.Image:
    """An image whose colour tells its class (as in tests/conftest.py)."""
    base = np.array(PALETTE[k % len(PALETTE)], np.int16)
    arr = np.clip(base + rng.integers(-30, 31, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def write_csv(path: Path, header: list[str], rows: list, delimiter: str = ",", encoding: str = "utf-8",
              newline: str = "\n", quote_all: bool = False, trailer: str = "") -> None:
    buf = io.StringIO()
    w = csv.writer(buf, delimiter=delimiter, lineterminator=newline,
                   quoting=csv.QUOTE_ALL if quote_all else csv.QUOTE_MINIMAL)
    w.writerow(header)
    w.writerows(rows)
    path.write_bytes((buf.getvalue() + trailer).encode(encoding))


def single_label(d: Path, n_train: int = 60, n_test: int = 12, labels=("10", "11", "12"),
                 train_id="tr{:04d}", test_id="te{:04d}", ext=".jpg", id_col="id", label_col="category_id",
                 sample_cols=("id", "predicted"), test_size=(40, 32), sample: bool = True, seed: int = 0) -> Spec:
    """iNaturalist layout: train.csv (id, label), train/<id>.jpg, test/<id>.jpg, sample_submission.csv."""
    root = d / "data"
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    rows = []
    for i in range(n_train):
        k = i % len(labels)
        tid = train_id.format(i)
        colour_image(k, rng).save(root / "train" / (tid if tid.endswith(ext) else tid + ext))
        rows.append((tid, labels[k]))
    write_csv(root / "train.csv", [id_col, label_col], rows)
    ids = [test_id.format(i) for i in range(n_test)]
    for i, t in enumerate(ids):
        colour_image(i % len(labels), rng, test_size).save(root / "test" / (t if t.endswith(ext) else t + ext))
    spec = Spec(root, labels=set(labels), train_rows=rows, test_ids=ids)
    if sample:
        write_csv(root / "sample_submission.csv", list(sample_cols), [(t, labels[0]) for t in ids])
        spec.sample = root / "sample_submission.csv"
    else:
        spec.ids = ids
    return spec


def multilabel(d: Path, n_train: int = 60, n_test: int = 12, n_labels: int = 4, labels_csv: bool = True,
               seed: int = 0) -> Spec:
    """iMet layout: train.csv (id, attribute_ids), labels.csv, train/<id>.png. Label k = a square in quadrant k."""
    root = d / "data"
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()

    def draw(tags):
        arr = np.full((32, 48, 3), 128, np.uint8)
        for k in tags:
            y, x = divmod(k, 2)
            arr[y * 16:(y + 1) * 16, x * 24:(x + 1) * 24] = PALETTE[k % len(PALETTE)]
        return Image.fromarray(arr)

    rows = []
    for i in range(n_train):
        tags = [k for k in range(n_labels) if rng.random() < 0.4]
        draw(tags).save(root / "train" / f"{i:08x}.png")
        rows.append((f"{i:08x}", " ".join(map(str, tags))))
    write_csv(root / "train.csv", ["id", "attribute_ids"], rows)
    if labels_csv:
        write_csv(root / "labels.csv", ["attribute_id", "attribute_name"],
                  [(k, f"tag::t{k}") for k in range(n_labels)])
    ids = [f"f{i:07x}" for i in range(n_test)]
    for t in ids:
        draw([k for k in range(n_labels) if rng.random() < 0.4]).save(root / "test" / f"{t}.png")
    write_csv(root / "sample_submission.csv", ["id", "attribute_ids"], [(t, "0") for t in ids])
    return Spec(root, root / "sample_submission.csv", labels={str(k) for k in range(n_labels)}, multi=True,
                cells="any", train_rows=rows, test_ids=ids)


def folder(d: Path, n_per_class: int = 15, n_test: int = 9, classes=("beach", "forest", "highway"),
           sample: bool = False, seed: int = 0) -> Spec:
    """Scene-15 layout: train/<class>/*.jpg, test/*.jpg; ids are the test file stems."""
    root = d / "data"
    rng = np.random.default_rng(seed)
    for k, c in enumerate(classes):
        (root / "train" / c).mkdir(parents=True)
        for i in range(n_per_class):
            colour_image(k, rng).save(root / "train" / c / f"{c}_{i}.jpg")
    (root / "test").mkdir()
    ids = [f"img{i:03d}" for i in range(n_test)]
    for i, t in enumerate(ids):
        colour_image(i % len(classes), rng).save(root / "test" / f"{t}.jpg")
    spec = Spec(root, labels=set(classes), test_ids=ids)
    if sample:
        write_csv(root / "sample_submission.csv", ["id", "label"], [(t, classes[0]) for t in ids])
        spec.sample = root / "sample_submission.csv"
    else:
        spec.ids = ids
    return spec


def big_test_set(spec: Spec, n: int = 3000, size=(160, 128), seed: int = 1) -> Spec:
    """Replace the test set by n larger images: prediction then takes seconds (signal during prediction)."""
    rng = np.random.default_rng(seed)
    labels = sorted(spec.labels or {"0"})
    for p in (spec.data / "test").iterdir():
        p.unlink()
    ids = [f"tb{i:05d}" for i in range(n)]
    for i, t in enumerate(ids):
        colour_image(i % 3, rng, size).save(spec.data / "test" / f"{t}.jpg")
    write_csv(spec.data / "sample_submission.csv", ["id", "predicted"], [(t, labels[0]) for t in ids])
    spec.sample, spec.test_ids = spec.data / "sample_submission.csv", ids
    return spec


def more_train_images(spec: Spec, n: int = 1500, size=(320, 240), seed: int = 2) -> Spec:
    """Many larger training images: indexing and the image cache build take a few seconds."""
    rng = np.random.default_rng(seed)
    labels = sorted(spec.labels)
    rows = list(spec.train_rows)
    for i in range(n):
        k = i % len(labels)
        tid = f"tx{i:05d}"
        colour_image(k, rng, size).save(spec.data / "train" / f"{tid}.jpg", quality=95)
        rows.append((tid, labels[k]))
    write_csv(spec.data / "train.csv", ["id", "category_id"], rows)
    spec.train_rows = rows
    return spec


# ----------------------------------------------------------------------------- faults (sitecustomize)

SITECUSTOMIZE = r'''
"""Red-team fault injection, loaded by the interpreter from PYTHONPATH (as sitecustomize).

RT_FAULTS (JSON) lists faults: {"target": "torch.save" | "open" (or rank.raise / rank.slow: _patch_ranks), "match": [substrings of the file's base
name; "" matches all], "exclude": [substrings that spare a file], "exc": "runtime" | "enospc",
"after": N (matching calls that succeed first), "partial": bytes written before the failure}.
"open" wraps builtins.open / io.open for writing (so pandas, numpy, pathlib, json, any atomic-write
helper are covered whatever serialises the bytes): the file opens, and its first write fails, as a
full disk does. Each injection is appended to RT_FAULT_LOG."""
import builtins, errno, importlib.abc, io, json, os, sys

FAULTS = json.loads(os.environ.get("RT_FAULTS", "[]"))
LOG = os.environ.get("RT_FAULT_LOG", "")
_calls = {}


def _fname(f):
    if isinstance(f, int):
        try:
            return os.readlink(f"/proc/self/fd/{f}")
        except OSError:
            return ""
    try:
        return os.fspath(f)
    except TypeError:
        return getattr(f, "name", "") or ""


def _hit(target, path):
    base = os.path.basename(str(path))
    for i, f in enumerate(FAULTS):
        if f["target"] != target or not any(m in base for m in f["match"]):
            continue
        if any(x in base for x in f.get("exclude", [])):
            continue
        _calls[i] = _calls.get(i, 0) + 1
        if _calls[i] > f.get("after", 0):
            return f
    return None


def _raise(f, path):
    if LOG:
        with _real_open(LOG, "a") as fh:
            fh.write(f"{os.getpid()} {f['target']} {f['exc']} {os.path.basename(str(path))}\n")
    if f["exc"] == "runtime":
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


class _FullDiskFile:
    """A file whose writes fail once `partial` bytes went through (what ENOSPC looks like)."""

    def __init__(self, f, fault, path):
        self._f, self._fault, self._path, self._left = f, fault, path, int(fault.get("partial", 0))

    def write(self, data):
        if self._left > 0:
            k = min(len(data), self._left)
            self._f.write(data[:k])
            self._left -= k
            if k == len(data):
                return k
        _raise(self._fault, self._path)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()
        return False

    def __iter__(self):
        return iter(self._f)

    def __getattr__(self, name):
        return getattr(self._f, name)


_real_open = io.open


def _open(file, mode="r", *a, **k):
    f = _real_open(file, mode, *a, **k)
    if any(c in mode for c in "wax+"):
        path = _fname(file)
        fault = _hit("open", path)
        if fault:
            return _FullDiskFile(f, fault, path)
    return f


def _patch_torch(torch):
    real = torch.save

    def save(obj, f, *a, **k):
        fault = _hit("torch.save", _fname(f))
        if fault:
            _raise(fault, _fname(f))
        return real(obj, f, *a, **k)
    torch.save = save


class _PostImport(importlib.abc.MetaPathFinder):
    """Patch torch right after it is first imported."""

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None and spec.loader is not None:
                real_exec = spec.loader.exec_module

                def exec_module(module, _real=real_exec):
                    _real(module)
                    _patch_torch(module)
                    _patch_ranks(module)
                spec.loader.exec_module = exec_module
                return spec
        return None


def _on_rank(torch, f):
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_rank() == f.get("rank", 0)


def _note(f, what):
    if LOG:
        with _real_open(LOG, "a") as fh:
            fh.write(f"{os.getpid()} {f['target']} rank {f.get('rank', 0)} {what}\n")


def _patch_ranks(torch):
    """rank.raise: DDP forward raises on `rank` after `after` calls. rank.slow: on `rank`, the first
    `times` iterations of a loader that is not sharded between the ranks (cache build, reserve probe,
    validation: what rank 0 does alone) start `seconds` late."""
    import time as _time
    for f in FAULTS:
        if f["target"] == "rank.raise":
            ddp = torch.nn.parallel.DistributedDataParallel
            real_forward = ddp.forward

            def forward(self, *a, _f=f, _real=real_forward, **k):
                if _on_rank(torch, _f):
                    _f["calls"] = _f.get("calls", 0) + 1
                    if _f["calls"] > _f.get("after", 0):
                        _note(_f, "raise")
                        raise RuntimeError(f"red-team: rank {_f.get('rank', 0)} fails in its forward")
                return _real(self, *a, **k)
            ddp.forward = forward
        elif f["target"] == "rank.slow":
            loader = torch.utils.data.DataLoader
            real_iter = loader.__iter__

            def it(self, _f=f, _real=real_iter):
                solo = not isinstance(getattr(self, "sampler", None), torch.utils.data.DistributedSampler)
                if solo and _on_rank(torch, _f) and _f.get("done", 0) < _f.get("times", 1):
                    _f["done"] = _f.get("done", 0) + 1
                    _note(_f, f"sleep {_f['seconds']}")
                    _time.sleep(_f["seconds"])
                return _real(self)
            loader.__iter__ = it


if any(f["target"] == "open" for f in FAULTS):
    builtins.open = io.open = _open
if any(f["target"] == "torch.save" or f["target"].startswith("rank.") for f in FAULTS):
    sys.meta_path.insert(0, _PostImport())
'''


def fault(target: str, match: list[str], exc: str = "enospc", after: int = 0, partial: int = 0,
          exclude: tuple[str, ...] = ()) -> dict:
    """target: torch.save (the checkpoint writer) or open (any file opened for writing: its writes fail)."""
    return {"target": target, "match": match, "exc": exc, "after": after, "partial": partial,
            "exclude": list(exclude)}


# ----------------------------------------------------------------------------- cases

@dataclass
class Action:
    """Something done to the running kernel: `signal` (sig at a moment), `kill9_rerun` (SIGKILL, run again)
    or `kill_rank` (SIGKILL to data-parallel rank 1 alone, found in the launcher's "rank pids" line)."""
    kind: str
    moment: str  # import (fixed delay) | startup (config announced) | train (a checkpoint exists) | predict
    #              | cache (rank 0 builds the image cache) | rendezvous (rank 0 waits for the others)
    sig: int = signal.SIGTERM
    delay: float = 0.0  # seconds after the moment is reached
    group: bool = False  # send to the whole process group (Ctrl-C in a terminal reaches the workers too)


@dataclass
class Case:
    id: str
    cls: str
    desc: str
    setup: Callable[[Path], Spec] | None  # builds the competition in the case dir
    expect: str  # refuse | submit | either (refuse or submit) | help | nosubmit | safe (no invalid file)
    argv: list[str] = field(default_factory=list)  # after the base flags (argparse: the last one wins)
    config: dict | None = None  # lines inserted into the CONFIG = dict(...) block of the kernel copy
    names: tuple[str, ...] = ()  # a refusal's message must name one of these (case-insensitive)
    action: Action | None = None
    budget: float = BUDGET_S  # seconds, for the wall-time bound (and --budget unless dropped)
    epochs: int | None = 1  # --epochs; None = budget-driven
    drop: tuple[str, ...] = ()  # base flags not to pass (e.g. budget when CONFIG sets it)
    base: bool = True  # pass the base flags at all (--help: no)
    faults: list[dict] | None = None  # sitecustomize faults
    pre_submission: bool = False  # put an older valid submission.csv at the path first
    env: dict = field(default_factory=dict)  # extra environment; "{free_port}" / "{busy_port}" filled per run
    forbid: tuple[str, ...] = ()  # regexes the output must not match (e.g. a fallback that must not happen)
    require: tuple[str, ...] = ()  # regexes the output must match
    no_leftovers: bool = False  # no process of the kernel's session may outlive it (rank cases)

    @property
    def trains(self) -> bool:
        """Whether a correct kernel trains in this case (--fast skips those)."""
        return self.expect not in ("refuse", "help") or self.action is not None


def opt_names(*opts: str) -> tuple[str, ...]:
    out = []
    for o in opts:
        out += [o.replace("-", "_"), o.replace("_", "-")]
    return tuple(dict.fromkeys(out))


CASES: list[Case] = []


def case(*args, **kw) -> Case:
    c = Case(*args, **kw)
    assert c.id not in {x.id for x in CASES}, c.id
    CASES.append(c)
    return c


def S(**kw) -> Callable[[Path], Spec]:
    return lambda d: single_label(d, **kw)


def M(**kw) -> Callable[[Path], Spec]:
    return lambda d: multilabel(d, **kw)


def F(**kw) -> Callable[[Path], Spec]:
    return lambda d: folder(d, **kw)


# --- control: plain runs of each format (the harness itself works) ---
case("control-single", "control", "single-label CSV, plain run", S(), "submit")
case("control-multilabel", "control", "multi-label CSV (iMet), plain run", M(), "submit")
case("control-folder", "control", "folder per class, no sample_submission", F(), "submit")
case("control-folder-sample", "control", "folder per class with a sample_submission.csv", F(sample=True), "submit")

# --- 1. options: choice typos ---
for cid, opt, val, setup in [
    ("opt-threshold-rule-typo", "threshold-rule", "clas", M()),
    ("opt-threshold-rule-typo-single", "threshold-rule", "clas", S()),
    ("opt-aug-typo", "aug", "strnog", S()),
    ("opt-schedule-typo", "schedule", "cosin", S()),
    ("opt-format-typo", "format", "csv", S()),
    ("opt-loss-typo", "loss", "focall", S()),
    ("opt-head-typo", "head", "mpl", S()),
    ("opt-mode-typo", "mode", "trian", S()),
    ("opt-mp-context-typo", "mp-context", "spwn", S()),
    ("opt-ddp-backend-typo", "ddp-backend", "glooo", S()),
    ("opt-gpu-aug-typo", "gpu-aug", "x", S()),
    ("opt-preset-typo", "preset", "imet", S()),
    ("opt-input-mode-typo", "input-mode", "squash", S()),
    ("opt-input-mode-tile", "input-mode", "tile", M()),
]:
    case(cid, "options", f"--{opt} {val} (not one of the choices)", setup, "refuse", [f"--{opt}", val],
         names=opt_names(opt))

# --- 1. options: ranges ---
for cid, flags, names, setup in [
    ("opt-tta-0", ["--tta", "0"], ("tta",), S()),
    ("opt-tta-9", ["--tta", "9"], ("tta",), S()),
    ("opt-img-size-4", ["--img-size", "4"], opt_names("img-size"), S()),
    ("opt-img-size-neg", ["--img-size", "-5"], opt_names("img-size"), S()),
    ("opt-batch-size-0", ["--batch-size", "0"], opt_names("batch-size"), S()),
    ("opt-epochs-neg", ["--epochs", "-1"], ("epochs",), S()),
    ("opt-fold-eq-n-folds", ["--fold", "5", "--n-folds", "5"], opt_names("fold", "n-folds"), S()),
    ("opt-n-folds-1", ["--fold", "0", "--n-folds", "1"], opt_names("n-folds", "fold"), S()),
    ("opt-val-fraction-1.5", ["--val-fraction", "1.5"], opt_names("val-fraction"), S()),
    ("opt-val-fraction-neg", ["--val-fraction", "-0.1"], opt_names("val-fraction"), S()),
    ("opt-threshold-1.5", ["--threshold", "1.5"], ("threshold",), M()),
    ("opt-warmup-2", ["--warmup", "2"], ("warmup",), S()),
    ("opt-lr-neg", ["--lr", "-1"], ("lr",), S()),
    ("opt-lr-0", ["--lr", "0"], ("lr",), S()),
    ("opt-min-gt-max-labels", ["--min-labels", "3", "--max-labels", "1"], opt_names("min-labels", "max-labels"), M()),
    ("opt-pad-fill-300", ["--pad-fill", "300"], opt_names("pad-fill"), S()),
    ("opt-head-dropout-1.5", ["--head", "mlp", "--head-dropout", "1.5"], opt_names("head-dropout"), S()),
    ("opt-mixup-neg", ["--mixup", "-1"], ("mixup",), S()),
    ("opt-beta-0", ["--beta", "0"], ("beta",), M()),
    ("opt-freeze-2", ["--freeze", "2"], ("freeze",), S()),
    ("opt-frozen-stages-neg", ["--frozen-stages", "-2"], opt_names("frozen-stages"), S()),
    ("opt-ema-1.5", ["--ema", "1.5"], ("ema",), S()),
]:
    case(cid, "options", " ".join(flags) + " (out of range)", setup, "refuse", flags, names=names)

# --- 1. options: budget, durations, files ---
case("opt-budget-1s", "options", "--budget 1s: shorter than start-up and margin", S(), "refuse",
     ["--budget", "1s"], names=("budget",))
case("opt-budget-abc", "options", "--budget abc: not a duration", S(), "refuse", ["--budget", "abc"], names=("budget",))
case("opt-budget-5s", "options", "--budget 5s: about the start-up time; refuse, or submit in time", S(), "either",
     ["--budget", "5s"], names=("budget",), budget=5)
case("opt-margin-gt-budget", "options", "--margin 1h with a 40 s budget", S(), "refuse", ["--margin", "1h"],
     names=("margin", "budget"))
case("opt-checkpoint-every-never", "options", "--checkpoint-every never: not a duration", S(), "refuse",
     ["--checkpoint-every", "never"], names=opt_names("checkpoint-every"))
case("opt-loss-args-garbage", "options", "--loss-args gamma (no =value)", S(), "refuse", ["--loss-args", "gamma"],
     names=opt_names("loss-args"))
case("opt-model-unknown", "options", "--model not_a_model: no such timm model", S(), "refuse",
     ["--model", "not_a_timm_model"], names=("model", "not_a_timm_model"))
case("opt-pretrained-missing", "options", "--pretrained-path to a file that does not exist", S(), "refuse",
     ["--pretrained-path", "/nonexistent/weights.safetensors"], names=("pretrained_path", "pretrained-path",
                                                                       "weights.safetensors"))
case("opt-data-dir-missing", "options", "--data-dir that does not exist", S(), "refuse",
     ["--data-dir", "/nonexistent/competition"], names=("data_dir", "data-dir", "/nonexistent/competition"))
case("opt-resume-from-missing", "options", "--resume-from a checkpoint that does not exist", S(), "refuse",
     ["--resume-from", "/nonexistent/last.pt"], names=("resume_from", "resume-from", "/nonexistent/last.pt"))
case("opt-infer-no-checkpoints", "options", "--mode infer --checkpoints matching nothing", S(), "refuse",
     ["--mode", "infer", "--checkpoints", "/nonexistent/*.pt"], names=("checkpoints", "/nonexistent"))

# --- 1. options: what argparse sees ---
case("opt-unknown-flag", "options", "--btach-size 16: unknown flag", S(), "refuse", ["--btach-size", "16"],
     names=("--btach-size",))
case("opt-unknown-flag-eq", "options", "--learning-rate=0.1: unknown flag with =", S(), "refuse",
     ["--learning-rate=0.1"], names=("--learning-rate",))
case("opt-epochs-not-int", "options", "--epochs abc", S(), "refuse", ["--epochs", "abc"], names=("--epochs",))
case("opt-img-size-float", "options", "--img-size 3.5", S(), "refuse", ["--img-size", "3.5"], names=("--img-size",))
case("opt-amp-maybe", "options", "--amp maybe: not a boolean", S(), "refuse", ["--amp", "maybe"], names=("--amp",))
case("opt-lr-text", "options", "--lr fast", S(), "refuse", ["--lr", "fast"], names=("--lr",))
case("opt-positional", "options", "a stray positional argument", S(), "refuse", ["train.csv"], names=("train.csv",))

# --- 1. options: the CONFIG block of a kernel.py copy ---
case("cfg-unknown-key", "options", "CONFIG btach_size=16 (typo of batch_size)", S(), "refuse",
     config={"btach_size": 16}, names=("btach_size",))
case("cfg-unknown-key-similar", "options", "CONFIG learning_rate=1e-3 (not a key)", S(), "refuse",
     config={"learning_rate": 1e-3}, names=("learning_rate",))
case("cfg-batch-size-str", "options", "CONFIG batch_size='16': coerce, or refuse naming it", S(), "either",
     config={"batch_size": "16"}, names=("batch_size",))
case("cfg-img-size-float", "options", "CONFIG img_size=3.5", S(), "refuse", config={"img_size": 3.5},
     names=("img_size",))
case("cfg-epochs-float", "options", "CONFIG epochs=1.5", S(), "refuse", config={"epochs": 1.5}, names=("epochs",),
     epochs=None)
case("cfg-budget-int", "options", "CONFIG budget=40 (int seconds)", S(), "submit", config={"budget": 40})
case("cfg-amp-yes", "options", "CONFIG amp='yes': coerce, or refuse naming it", S(), "either", config={"amp": "yes"},
     names=("amp",))
case("cfg-lr-str", "options", "CONFIG lr='3e-3': coerce, or refuse naming it", S(), "either", config={"lr": "3e-3"},
     names=("lr",))
case("cfg-cache-images-str-false", "options", "CONFIG cache_images='false' (a truthy string)", S(), "either",
     config={"cache_images": "false"}, names=("cache_images",))
case("cfg-aug-typo", "options", "CONFIG aug='strnog'", S(), "refuse", config={"aug": "strnog"}, names=("aug",))
case("cfg-tta-0", "options", "CONFIG tta=0", S(), "refuse", config={"tta": 0}, names=("tta",))
case("cfg-preset-unknown", "options", "CONFIG preset='nope'", S(), "refuse", config={"preset": "nope"},
     names=("preset",))


# --- 2. CSVs ---
def csv_latin1(d):
    s = single_label(d, labels=("café", "crème brûlée", "naïve"))
    write_csv(s.data / "train.csv", ["id", "category_id"], s.train_rows, encoding="latin-1")
    return s


def csv_utf16(d):
    s = single_label(d)
    write_csv(s.data / "train.csv", ["id", "category_id"], s.train_rows, encoding="utf-16")
    return s


def csv_bom(d):
    s = single_label(d)
    write_csv(s.data / "train.csv", ["id", "category_id"], s.train_rows, encoding="utf-8-sig")
    write_csv(s.sample, ["id", "predicted"], [(t, "10") for t in s.test_ids], encoding="utf-8-sig")
    return s


def csv_header_only(d):
    s = single_label(d)
    write_csv(s.data / "train.csv", ["id", "category_id"], [])
    return s


def csv_empty_file(d):
    s = single_label(d)
    (s.data / "train.csv").write_bytes(b"")
    return s


def csv_empty_label(d):
    s = single_label(d)
    rows = list(s.train_rows)
    rows[7] = (rows[7][0], "")
    write_csv(s.data / "train.csv", ["id", "category_id"], rows)
    return s


def csv_nan_text(d):
    return single_label(d, labels=("NaN", "NA", "null"))


def csv_extra_column(d):
    s = single_label(d, sample_cols=("id", "category_id"))
    write_csv(s.data / "train.csv", ["id", "width", "category_id"], [(i, "40", lab) for i, lab in s.train_rows])
    return s


def csv_space_labels(d):
    s = single_label(d, label_col="tags", sample_cols=("id", "tags"))
    tags = ["a", "b", "c"]
    rows = [(i, " ".join(tags[:1 + n % 3])) for n, (i, _) in enumerate(s.train_rows)]
    write_csv(s.data / "train.csv", ["id", "tags"], rows)
    s.labels, s.multi, s.cells = set(tags), True, "any"
    return s


def csv_duplicate_ids(d):
    s = single_label(d)
    rows = list(s.train_rows) + [s.train_rows[3], (s.train_rows[4][0], "12")]
    write_csv(s.data / "train.csv", ["id", "category_id"], rows)
    return s


def csv_id_path(d):
    s = single_label(d)
    rows = list(s.train_rows)
    rows[5] = ("../x", rows[5][1])
    write_csv(s.data / "train.csv", ["id", "category_id"], rows)
    (s.data / "x.jpg").write_bytes((s.data / "train" / "tr0000.jpg").read_bytes())
    return s


def csv_id_abs_path(d):
    s = single_label(d)
    rows = list(s.train_rows)
    rows[2] = ("/etc/passwd", rows[2][1])
    write_csv(s.data / "train.csv", ["id", "category_id"], rows)
    return s


def csv_one_column(d):
    s = single_label(d)
    write_csv(s.data / "train.csv", ["id"], [(i,) for i, _ in s.train_rows])
    return s


def csv_semicolon_train(d):
    s = single_label(d)
    write_csv(s.data / "train.csv", ["id", "category_id"], s.train_rows, delimiter=";")
    return s


def csv_whitespace(d):
    s = single_label(d)
    (s.data / "train.csv").write_text("id , category_id\n" + "".join(f" {i} , {lab} \n" for i, lab in s.train_rows))
    return s


def csv_missing_train_images(d):
    s = single_label(d)
    for i in range(0, 60, 6):
        (s.data / "train" / f"tr{i:04d}.jpg").unlink()
    return s


def csv_ml_unknown_label(d):
    s = multilabel(d)
    rows = list(s.train_rows)
    rows[3] = (rows[3][0], "1 99")
    write_csv(s.data / "train.csv", ["id", "attribute_ids"], rows)
    return s


def csv_ml_no_labels_csv(d):
    s = multilabel(d, labels_csv=False)
    s.labels = {t for _, cell in s.train_rows for t in cell.split()}
    return s


def csv_crlf_train(d):
    s = single_label(d)
    write_csv(s.data / "train.csv", ["id", "category_id"], s.train_rows, newline="\r\n")
    return s


case("csv-latin1-accents", "csv", "latin-1 train.csv with accented labels (café, crème brûlée, naïve)", csv_latin1,
     "submit")
case("csv-utf16", "csv", "UTF-16 (BOM) train.csv: read it, or refuse naming train.csv", csv_utf16, "either",
     names=("train.csv",))
case("csv-utf8-bom", "csv", "UTF-8 BOM on train.csv and sample_submission.csv", csv_bom, "submit")
case("csv-header-only", "csv", "train.csv with a header and no rows", csv_header_only, "refuse", names=("train.csv",))
case("csv-empty-file", "csv", "train.csv of 0 bytes", csv_empty_file, "refuse", names=("train.csv",))
case("csv-empty-label", "csv", "one row of train.csv has an empty label: skip it, or refuse naming train.csv",
     csv_empty_label, "either", names=("train.csv",))
case("csv-nan-label-text", "csv", "labels are the strings NaN, NA, null (pandas NA spellings)", csv_nan_text, "submit")
case("csv-extra-column", "csv", "train.csv id,width,category_id with a sample id,category_id", csv_extra_column,
     "submit")
case("csv-space-labels", "csv", "space-separated tags in a single-label-looking CSV (no labels.csv)", csv_space_labels,
     "either", names=("train.csv",))
case("csv-duplicate-ids", "csv", "train.csv repeats an id (once with another label)", csv_duplicate_ids, "either",
     names=("train.csv",))
case("csv-id-path", "csv", "train.csv id ../x (outside the data root)", csv_id_path, "refuse", names=("train.csv",))
case("csv-id-abs-path", "csv", "train.csv id /etc/passwd", csv_id_abs_path, "refuse", names=("train.csv",))
case("csv-one-column", "csv", "train.csv with only an id column", csv_one_column, "refuse", names=("train.csv",))
case("csv-semicolon-train", "csv", "train.csv separated by ';': read it, or refuse naming train.csv",
     csv_semicolon_train, "either", names=("train.csv",))
case("csv-whitespace", "csv", "spaces around ids, labels and header names", csv_whitespace, "submit")
case("csv-crlf-train", "csv", "train.csv with CRLF line endings", csv_crlf_train, "submit")
case("csv-ids-with-extension", "csv", "ids carry the file extension (tr0001.jpg) in train.csv and the sample",
     S(train_id="tr{:04d}.jpg", test_id="te{:04d}.jpg"), "submit")
case("csv-ids-leading-zeros", "csv", "numeric ids with leading zeros (000123)",
     S(train_id="{:06d}", test_id="{:07d}"), "submit")
case("csv-missing-train-images", "csv", "10 of 60 train.csv ids have no image file", csv_missing_train_images,
     "submit")
case("csv-ml-unknown-label", "csv", "multi-label train.csv uses a label missing from labels.csv",
     csv_ml_unknown_label, "refuse", names=("train.csv", "labels.csv"))
case("csv-ml-no-labels-csv", "csv", "multi-label train.csv (attribute_ids) without labels.csv", csv_ml_no_labels_csv,
     "submit")


def folder_macosx(d):
    s = folder(d)
    mac = s.data / "train" / "__MACOSX"
    mac.mkdir()
    for c in ("beach", "forest", "highway"):
        for i in range(15):
            (mac / f"._{c}_{i}.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\x00" * 64)
    return s


def folder_ipynb(d):
    s = folder(d)
    ck = s.data / "train" / ".ipynb_checkpoints"
    ck.mkdir()
    for p in (s.data / "train").glob("*/*.jpg"):
        if p.parent != ck:
            shutil.copy(p, ck / f"{p.stem}-checkpoint.jpg")
    return s


def folder_hidden(d):
    s = folder(d)
    for name in (".git", ".cache"):
        h = s.data / "train" / name
        h.mkdir()
        for p in list((s.data / "train" / "beach").glob("*.jpg"))[:10]:
            shutil.copy(p, h / p.name)
    (s.data / "train" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + b"\x00" * 32)
    (s.data / "test" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + b"\x00" * 32)
    return s


def folder_appledouble(d, sample=False):
    s = folder(d, sample=sample)
    junk = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\x00" * 64
    for p in list((s.data / "train").glob("*/*.jpg")) + list((s.data / "test").glob("*.jpg")):
        (p.parent / f"._{p.name}").write_bytes(junk)
    return s


case("csv-folder-macosx", "csv", "folder format: train/__MACOSX/ full of AppleDouble files", folder_macosx, "submit")
case("csv-folder-ipynb-checkpoints", "csv", "folder format: train/.ipynb_checkpoints/ with copies of every image",
     folder_ipynb, "submit")
case("csv-folder-hidden-dirs", "csv", "folder format: train/.git/, train/.cache/ with images, .DS_Store files",
     folder_hidden, "submit")
case("csv-folder-appledouble", "csv", "folder format, no sample: ._x.jpg AppleDouble files beside train and test images",
     lambda d: folder_appledouble(d), "submit")
case("csv-folder-appledouble-sample", "csv", "folder format with a sample: ._x.jpg files beside the images",
     lambda d: folder_appledouble(d, sample=True), "submit")


# --- 3. sample submissions ---
def sample_rewrite(s: Spec, header, rows, **kw) -> Spec:
    write_csv(s.sample, header, rows, **kw)
    return s


def sample_semicolon(d):
    s = single_label(d)
    return sample_rewrite(s, ["id", "predicted"], [(t, "10") for t in s.test_ids], delimiter=";")


def sample_tab(d):
    s = single_label(d)
    return sample_rewrite(s, ["id", "predicted"], [(t, "10") for t in s.test_ids], delimiter="\t")


def sample_usage(d):
    s = single_label(d)
    s.pred_cols = ["predicted"]
    return sample_rewrite(s, ["id", "predicted", "Usage"],
                          [(t, "10", "Public" if i % 2 else "Private") for i, t in enumerate(s.test_ids)])


def sample_one_column(d):
    s = single_label(d)
    s.pred_cols = []
    return sample_rewrite(s, ["id"], [(t,) for t in s.test_ids])


def sample_onehot(d):
    s = multilabel(d)
    tags = ["t0", "t1", "t2", "t3", "t_unseen"]
    write_csv(s.data / "labels.csv", ["attribute_id", "attribute_name"], [(k, f"tag::{k}") for k in tags[:4]])
    rows = [(i, " ".join(f"t{k}" for k in cell.split())) for i, cell in s.train_rows]
    write_csv(s.data / "train.csv", ["id", "attribute_ids"], rows)
    s.cells, s.pred_cols, s.labels, s.multi = "number01", tags, None, False
    return sample_rewrite(s, ["id", *tags], [(t, *["0"] * len(tags)) for t in s.test_ids])


def sample_onehot_single(d):
    s = single_label(d)
    s.cells, s.pred_cols, s.labels = "number01", ["10", "11", "12"], None
    return sample_rewrite(s, ["image_id", "10", "11", "12"], [(t, "0", "0", "0") for t in s.test_ids])


def sample_crlf(d):
    s = single_label(d)
    return sample_rewrite(s, ["id", "predicted"], [(t, "10") for t in s.test_ids], newline="\r\n")


def sample_quoted(d):
    s = single_label(d)
    return sample_rewrite(s, ["id", "predicted"], [(t, "10") for t in s.test_ids], quote_all=True)


def sample_trailing(d):
    s = single_label(d)
    return sample_rewrite(s, ["id", "predicted"], [(t, "10") for t in s.test_ids], trailer="\n\n")


def sample_duplicate_ids(d):
    s = single_label(d)
    return sample_rewrite(s, ["id", "predicted"], [(t, "10") for t in s.test_ids + s.test_ids[:2]])


def sample_id_path(d):
    s = single_label(d)
    ids = list(s.test_ids)
    ids[4] = "../../etc/passwd"
    return sample_rewrite(s, ["id", "predicted"], [(t, "10") for t in ids])


def sample_missing_images(d):
    s = single_label(d)
    ids = s.test_ids + ["te9998", "te9999"]
    return sample_rewrite(s, ["id", "predicted"], [(t, "10") for t in ids])


def sample_shuffled(d):
    s = single_label(d, n_test=20)
    ids = list(np.random.default_rng(3).permutation(s.test_ids))
    return sample_rewrite(s, ["id", "predicted"], [(t, "10") for t in ids])


def sample_header_spaces(d):
    s = single_label(d)
    (s.sample).write_text("id, predicted\n" + "".join(f"{t}, 10\n" for t in s.test_ids))
    return s


case("sample-semicolon", "sample", "sample_submission.csv separated by ';'", sample_semicolon, "submit")
case("sample-tab", "sample", "sample_submission.csv separated by tabs", sample_tab, "submit")
case("sample-usage-column", "sample", "sample id,predicted,Usage (Kaggle's public/private column)", sample_usage,
     "submit")
case("sample-one-column", "sample", "sample with only an id column: submit ids only, or refuse naming it",
     sample_one_column, "either", names=("sample_submission",))
case("sample-onehot-wide", "sample", "multi-label sample: one 0/1 column per tag, one tag never seen in training",
     sample_onehot, "submit")
case("sample-onehot-single", "sample", "single-label sample image_id,10,11,12 (one column per class)",
     sample_onehot_single, "submit")
case("sample-id-column-name", "sample", "sample image_name,label instead of id,predicted",
     S(sample_cols=("image_name", "label")), "submit")
case("sample-capitalised", "sample", "sample Id,Predicted", S(sample_cols=("Id", "Predicted")), "submit")
case("sample-crlf", "sample", "sample with CRLF line endings", sample_crlf, "submit")
case("sample-quoted-ids", "sample", "every field of the sample quoted", sample_quoted, "submit")
case("sample-trailing-empty-line", "sample", "sample ends with an empty line", sample_trailing, "submit")
case("sample-header-spaces", "sample", "sample header 'id, predicted' and cells ', 10'", sample_header_spaces,
     "submit")
case("sample-shuffled-order", "sample", "sample ids in no sorted order", sample_shuffled, "submit")
case("sample-missing-images", "sample", "two sample ids have no test image", sample_missing_images, "submit")
case("sample-duplicate-ids", "sample", "sample repeats two ids: mirror them, or refuse naming the sample",
     sample_duplicate_ids, "either", names=("sample_submission",))
case("sample-id-path", "sample", "sample id ../../etc/passwd", sample_id_path, "refuse", names=("sample_submission",))


# --- 4. the file at the submission path: a run that cannot validate must not leave an invalid file ---
case("inv-refusal-keeps-old", "invalid", "an old valid submission.csv is there and the options are refused",
     S(), "refuse", ["--aug", "strnog"], names=("aug",), pre_submission=True)
case("inv-usage-column-old", "invalid", "old submission present; sample has a Usage column", sample_usage, "safe",
     pre_submission=True)
case("inv-one-column-old", "invalid", "old submission present; sample has only an id column", sample_one_column,
     "safe", pre_submission=True)
case("inv-semicolon-old", "invalid", "old submission present; sample separated by ';'", sample_semicolon, "safe",
     pre_submission=True)
case("inv-duplicate-ids-old", "invalid", "old submission present; sample repeats ids", sample_duplicate_ids, "safe",
     pre_submission=True)
case("inv-write-fails-half-way", "invalid", "old submission present; writing the submission fails after 40 bytes (ENOSPC)",
     S(), "nosubmit", faults=[fault("open", ["submission"], partial=40)], pre_submission=True)
case("inv-write-fails-no-old", "invalid", "no old file; writing the submission fails after 40 bytes (ENOSPC)",
     S(), "nosubmit", faults=[fault("open", ["submission"], partial=40)])

# --- 5. signals: exit 0 with a valid submission within SIGNAL_GRACE_S of the signal ---
# The prediction-moment cases predict 2400 images x 4 views at 64 px (seconds on 2 cores) after one epoch; the
# budget is generous so that a kernel that plans its inference time from a pessimistic probe still trains
# (the run itself takes ~20-40 s: --epochs 1 ends training early).
PREDICT_BUDGET_S = 300
PREDICT_TEST_IMAGES = 2400
PREDICT_FLAGS = ["--img-size", "64", "--tta", "4"]
_sig_setups = {"startup": lambda d: more_train_images(single_label(d)), "train": S(),
               "predict": lambda d: big_test_set(single_label(d), n=PREDICT_TEST_IMAGES)}
_moments = {"startup": "when the config is announced (indexing, image cache)", "train": "after last.pt appears",
            "predict": f"during test prediction ({PREDICT_TEST_IMAGES} images x 4 views)"}
for sig, sname in ((signal.SIGTERM, "term"), (signal.SIGINT, "int")):
    for moment, delay in (("startup", 0.0), ("train", 1.0), ("predict", 0.5)):
        case(f"sig-{sname}-{moment}", "signals", f"SIG{sname.upper()} {_moments[moment]}", _sig_setups[moment],
             "submit", PREDICT_FLAGS if moment == "predict" else [], action=Action("signal", moment, sig, delay),
             epochs=1 if moment == "predict" else None,
             budget=PREDICT_BUDGET_S if moment == "predict" else BUDGET_S)
case("sig-term-import", "signals", "SIGTERM 1 s after start (while importing torch)", S(), "submit",
     action=Action("signal", "import", signal.SIGTERM, 1.0), epochs=None)
case("sig-int-train-group-workers", "signals", "SIGINT to the process group (Ctrl-C) during training, 2 workers",
     S(), "submit", ["--num-workers", "2", "--cache-images", "false"],
     action=Action("signal", "train", signal.SIGINT, 1.0, group=True), epochs=None)

# --- 6. full disk / failing saves: training goes on, exit 0 with a valid submission ---
STREAM = "runtime"
case("disk-torch-save-runtime-always", "disk", "torch.save raises PytorchStreamWriter RuntimeError for last.pt/best.pt",
     S(), "submit", faults=[fault("torch.save", ["last.pt", "best.pt"], STREAM)], epochs=2)
case("disk-torch-save-runtime-after-2", "disk", "torch.save RuntimeError after the first 2 checkpoint saves",
     S(), "submit", faults=[fault("torch.save", [".pt"], STREAM, after=2)], epochs=3)
case("disk-torch-save-runtime-best-only", "disk", "torch.save RuntimeError for best.pt only", S(), "submit",
     faults=[fault("torch.save", ["best.pt"], STREAM)], epochs=2)
case("disk-torch-save-runtime-budget", "disk", "torch.save RuntimeError always, budget-driven epochs", S(), "submit",
     faults=[fault("torch.save", [".pt"], STREAM)], epochs=None, budget=30)
case("disk-torch-save-enospc-always", "disk", "torch.save raises OSError(ENOSPC) for last.pt/best.pt", S(), "submit",
     faults=[fault("torch.save", ["last.pt", "best.pt"], "enospc")], epochs=2)
case("disk-torch-save-enospc-after-2", "disk", "torch.save OSError(ENOSPC) after the first 2 saves", S(), "submit",
     faults=[fault("torch.save", [".pt"], "enospc", after=2)], epochs=3)
case("disk-ckpt-background-partial", "disk", "a background checkpoint write fills the disk 4 KB into its temp file, "
     "from the third write on (the writer thread's failures must not reach training)", S(), "submit",
     faults=[fault("open", [".pt.tmp"], after=2, partial=4096)], epochs=3)
case("disk-npy-enospc", "disk", "writes of val_probs.npy / test_probs.npy fail (ENOSPC)", S(), "submit",
     faults=[fault("open", ["val_probs", "test_probs"])], epochs=2)
case("disk-history-csv-enospc", "disk", "writes of history.csv fail (ENOSPC)", S(), "submit",
     faults=[fault("open", ["history"])], epochs=2)
case("disk-json-enospc", "disk", "writes of config.json / summary.json / run_state.json fail (ENOSPC)", S(), "submit",
     faults=[fault("open", ["config.json", "summary.json", "run_state"])], epochs=2)
case("disk-reports-enospc", "disk", "writes of the report CSVs (label_stats, errors_per_label, ...) fail", S(),
     "submit", faults=[fault("open", ["label_stats", "errors_per_label", "worst_images", "confusion",
                                       "missing_label", "error_summary"])], epochs=2)
case("disk-full-but-submission", "disk", "every write fails (checkpoints, cache, reports, arrays) except the "
     "submission's", S(), "submit", faults=[fault("torch.save", [""]), fault("open", [""], exclude=("submission",))],
     epochs=2)
case("disk-full-everything", "disk", "every write fails, the submission's too: no submission can be made", S(),
     "nosubmit", faults=[fault("torch.save", [""]), fault("open", [""], partial=16)], epochs=2)


# --- 8. ranks: two gloo ranks on CPU that fail, die, stall or never meet (issue #22 item 3) ---
# Spawned by kernel.py (--ddp-procs 2): whatever rank 1 does, rank 0's side (the launcher, carrying on
# in one process from the ranks' last.pt) writes a valid submission within budget + OVERRUN_S, and no
# process of the run outlives it. Under torchrun's variables (RANK / WORLD_SIZE / MASTER_*) with no
# peer: rank 0 trains alone and says so, rank 1 refuses in seconds; SIGTERM ends the wait at once.
RANK_FLAGS = ["--ddp-procs", "2", "--ddp-backend", "gloo"]
RANK_ENV = {"KERNELKIT_TEST_DIST_TIMEOUT_S": "20,4"}  # rendezvous 20 s; collectives time out after 4 s
ALONE = r"continuing in one process"


def torchrun_env(rank: int, port: str = "{free_port}", deadline_s: str = "3") -> dict:
    env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": port}
    if deadline_s:
        env["KERNELKIT_TEST_DIST_TIMEOUT_S"] = deadline_s
    return env


RANK_BUDGET_S = 120  # two spawned ranks each import torch and timm: ~30 s of start-up on 2 busy cores
case("ranks-control", "ranks", "2 gloo ranks, nothing goes wrong: both train, no fallback", S(n_train=96), "submit",
     RANK_FLAGS, env=RANK_ENV, forbid=(ALONE,), require=(r"rank pids: 0=\d+ 1=\d+",), no_leftovers=True, epochs=2,
     budget=RANK_BUDGET_S)
case("ranks-kill1-cache", "ranks", "SIGKILL to rank 1 while rank 0 builds the image cache (1,500 images)",
     lambda d: more_train_images(single_label(d)), "submit", RANK_FLAGS, env=RANK_ENV,
     action=Action("kill_rank", "cache", signal.SIGKILL, 0.3), require=(ALONE,), no_leftovers=True, epochs=1,
     budget=RANK_BUDGET_S)
case("ranks-kill1-train", "ranks", "SIGKILL to rank 1 during training (after last.pt): the launcher resumes it alone",
     S(n_train=192), "submit", RANK_FLAGS, env=RANK_ENV, action=Action("kill_rank", "train", signal.SIGKILL, 0.3),
     require=(ALONE, r"resum"), no_leftovers=True, epochs=4, budget=RANK_BUDGET_S)
case("ranks-kill1-predict", "ranks", f"SIGKILL to rank 1 while rank 0 predicts ({PREDICT_TEST_IMAGES} images x 4 "
     "views; rank 1 has usually ended by then)", lambda d: big_test_set(single_label(d), n=PREDICT_TEST_IMAGES),
     "submit", RANK_FLAGS + PREDICT_FLAGS, env=RANK_ENV, action=Action("kill_rank", "predict", signal.SIGKILL, 0.5),
     no_leftovers=True, epochs=1, budget=PREDICT_BUDGET_S)
case("ranks-raise1", "ranks", "rank 1 raises in its 3rd training forward", S(n_train=96), "submit", RANK_FLAGS,
     env=RANK_ENV, faults=[{"target": "rank.raise", "rank": 1, "after": 2}], require=(ALONE,), no_leftovers=True,
     epochs=3, budget=RANK_BUDGET_S)
case("ranks-slow0", "ranks", "rank 0 sleeps 6 s in each of its first 3 solo phases (cache, reserve probe, "
     "validation) against a 4 s collective timeout: the ranks wait on store keys and train together",
     S(n_train=96), "submit", RANK_FLAGS, env=RANK_ENV, faults=[{"target": "rank.slow", "rank": 0, "seconds": 6,
                                                                "times": 3}],
     forbid=(ALONE,), no_leftovers=True, epochs=2, budget=RANK_BUDGET_S)
case("ranks-nomeet-rank1", "ranks", "torchrun variables, RANK=1, nothing listens at MASTER_PORT: refuse in seconds",
     S(), "refuse", env=torchrun_env(1), names=("rank 1", "MASTER_ADDR", "127.0.0.1"), no_leftovers=True)
case("ranks-nomeet-rank0", "ranks", "torchrun variables, RANK=0, rank 1 never comes: rank 0 trains alone and says so",
     S(), "submit", env=torchrun_env(0), require=(r"training in one process",), no_leftovers=True)
case("ranks-port-in-use-rank0", "ranks", "torchrun variables, RANK=0, MASTER_PORT already in use: train alone at once",
     S(), "submit", env=torchrun_env(0, "{busy_port}", ""), require=(r"cannot listen on",), no_leftovers=True)
case("ranks-sigterm-rendezvous-rank0", "ranks", "torchrun variables, RANK=0 waits for rank 1 (15 s deadline): SIGTERM "
     "during the wait", S(), "submit", env=torchrun_env(0, deadline_s=""),
     action=Action("signal", "rendezvous", signal.SIGTERM, 0.5), no_leftovers=True, epochs=None)
case("ranks-sigterm-rendezvous-rank1", "ranks", "torchrun variables, RANK=1 retries an address nothing listens on (15 s "
     "deadline): SIGTERM 6 s after start", S(), "refuse", env=torchrun_env(1, deadline_s=""),
     action=Action("signal", "import", signal.SIGTERM, 6.0), names=("stop was requested", "rank 1"), no_leftovers=True)


# --- 7. images ---
def corrupt(paths, how: str, rng=None):
    rng = rng or np.random.default_rng(5)
    for p in paths:
        if how == "bytes":
            p.write_bytes(rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
        elif how == "truncate":
            b = p.read_bytes()
            p.write_bytes(b[: len(b) // 2])
        elif how == "zero":
            p.write_bytes(b"")
        elif how == "text":
            p.write_text("<html>404 Not Found</html>\n")


def img_case(how):
    def setup(d):
        s = single_label(d)
        corrupt([s.data / "train" / f"tr{i:04d}.jpg" for i in (1, 7, 20)] + [s.data / "test" / "te0003.jpg"], how)
        return s
    return setup


def img_mode(mode: str, ext: str):
    """Re-save train and test images in a Pillow mode/format."""
    def setup(d):
        s = single_label(d)
        for sub in ("train", "test"):
            for p in sorted((s.data / sub).glob("*.jpg")):
                im = Image.open(p).convert("RGB")
                out = p.with_suffix(ext)
                if mode == "CMYK":
                    im.convert("CMYK").save(out, "JPEG")
                elif mode == "I;16":
                    arr = np.asarray(im.convert("L"), np.uint16) * 257
                    Image.fromarray(arr.astype("<u2")).save(out)
                elif mode == "PA":
                    pal = im.convert("P", palette=Image.ADAPTIVE, colors=16)
                    pal.info["transparency"] = 0
                    pal.save(out, transparency=0)
                elif mode == "EXIF":
                    exif = Image.Exif()
                    exif[0x0112] = 6
                    im.transpose(Image.Transpose.ROTATE_90).save(out, "JPEG", exif=exif)
                elif mode == "LA":
                    im.convert("LA").save(out)
                else:
                    im.save(out)
                if out != p:
                    p.unlink()
        return s
    return setup


def img_missing_test(d):
    s = single_label(d)
    for t in s.test_ids[:3]:
        (s.data / "test" / f"{t}.jpg").unlink()
    return s


def img_strip(d):
    s = single_label(d)
    rng = np.random.default_rng(9)
    colour_image(0, rng, (4000, 1)).save(s.data / "train" / "tr0000.jpg")
    colour_image(1, rng, (1, 3000)).save(s.data / "test" / "te0001.jpg")
    return s


def img_all_test_bad(d):
    s = single_label(d)
    corrupt(sorted((s.data / "test").glob("*.jpg")), "bytes")
    return s


def img_upper_ext(d):
    s = single_label(d)
    for p in sorted((s.data / "test").glob("*.jpg")) + sorted((s.data / "train").glob("*.jpg"))[:20]:
        p.rename(p.with_suffix(".JPG"))
    return s


def img_dir_named_jpg(d):
    s = single_label(d)
    (s.data / "train" / "tr0002.jpg").unlink()
    (s.data / "train" / "tr0002.jpg").mkdir()
    return s


case("img-corrupt-bytes", "images", "random bytes in 3 train and 1 test .jpg", img_case("bytes"), "submit")
case("img-truncated-jpeg", "images", "3 train and 1 test JPEGs cut in half", img_case("truncate"), "submit")
case("img-zero-byte", "images", "0-byte train and test files", img_case("zero"), "submit")
case("img-text-as-jpg", "images", "an HTML error page saved as .jpg", img_case("text"), "submit")
case("img-cmyk", "images", "CMYK JPEGs", img_mode("CMYK", ".jpg"), "submit")
case("img-16bit-png", "images", "16-bit greyscale PNGs (I;16)", img_mode("I;16", ".png"), "submit")
case("img-palette-transparency", "images", "palette PNGs with a transparent colour", img_mode("PA", ".png"), "submit")
case("img-la-png", "images", "greyscale + alpha PNGs", img_mode("LA", ".png"), "submit")
case("img-exif-rotated", "images", "JPEGs stored rotated with EXIF orientation 6", img_mode("EXIF", ".jpg"), "submit")
case("img-gif", "images", "GIF files", img_mode("RGB", ".gif"), "submit")
case("img-webp", "images", "WEBP files", img_mode("RGB", ".webp"), "submit")
case("img-bmp-tiff", "images", "BMP files", img_mode("RGB", ".bmp"), "submit")
case("img-missing-test", "images", "3 sample ids have no test file", img_missing_test, "submit")
case("img-strip", "images", "a 4000 x 1 train strip and a 1 x 3000 test strip", img_strip, "submit")
case("img-all-test-unreadable", "images", "every test image is garbage", img_all_test_bad, "submit")
case("img-upper-ext", "images", ".JPG upper-case extensions", img_upper_ext, "submit")
case("img-dir-named-jpg", "images", "a directory named tr0002.jpg where a train image should be", img_dir_named_jpg,
     "submit")

# --- 8. kill -9 then the same command again: resume, valid submission inside the original budget + 15 s ---
# Killed ~20 s into a 40 s budget: a rerun that starts over instead of resuming (with the time already
# spent counted) cannot end inside budget + 15 s.
case("kill9-train-rerun", "kill", "kill -9 15 s after last.pt appears, rerun the same command", S(), "submit",
     action=Action("kill9_rerun", "train", signal.SIGKILL, 15.0), epochs=None)
case("kill9-startup-rerun", "kill", "kill -9 when the config is announced, rerun", S(), "submit",
     action=Action("kill9_rerun", "startup", signal.SIGKILL, 0.0), epochs=None)
case("kill9-predict-rerun", "kill", "kill -9 during test prediction, rerun",
     lambda d: big_test_set(single_label(d), n=PREDICT_TEST_IMAGES), "submit", PREDICT_FLAGS,
     action=Action("kill9_rerun", "predict", signal.SIGKILL, 0.5), epochs=1, budget=PREDICT_BUDGET_S)

# --- 9. --help ---
case("help", "help", "python kernel.py --help", None, "help", ["--help"], base=False)
case("help-short", "help", "python kernel.py -h with other flags", S(), "help", ["-h"])


# ----------------------------------------------------------------------------- checks

def sniff_delimiter(text: str) -> str:
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    counts = {d: first.count(d) for d in (",", ";", "\t", "|")}
    best = max(counts, key=counts.get)
    return best if counts[best] else ","


def read_rows(path: Path, delimiter: str) -> list[list[str]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    return [r for r in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter) if r]


def check_submission(path: Path, spec: Spec) -> tuple[bool, str]:
    """-> (valid, reason) for the file at the submission path, judged from the sample alone."""
    if path.is_dir():
        return False, "submission path is a directory"
    if not path.is_file():
        return False, "no submission.csv"
    try:
        if spec.sample is not None:
            sample_text = spec.sample.read_bytes().decode("utf-8-sig", errors="replace")
            delim = sniff_delimiter(sample_text)
            want = read_rows(spec.sample, delim)
        else:
            delim, want = ",", None
        rows = read_rows(path, delim)
    except (ValueError, csv.Error) as e:
        return False, f"unreadable: {e}"
    if not rows:
        return False, "empty file"
    header, body = [c.strip() for c in rows[0]], rows[1:]
    if want is not None:
        w_header, w_body = [c.strip() for c in want[0]], want[1:]
        if header != w_header:
            return False, f"columns {header} != sample {w_header} (delimiter {delim!r})"
        if len(body) != len(w_body):
            return False, f"{len(body)} rows, sample has {len(w_body)}"
        for r, (a, b) in enumerate(zip(body, w_body)):
            if a[0].strip() != b[0].strip():
                return False, f"row {r + 2}: id {a[0]!r} != sample {b[0]!r}"
    else:
        if len(header) < 2:
            return False, f"columns {header}: no prediction column"
        got = [r[0].strip() for r in body]
        if len(set(got)) != len(got):
            return False, "duplicated ids"
        if set(got) != set(spec.ids or []):
            extra, missing = sorted(set(got) - set(spec.ids or [])), sorted(set(spec.ids or []) - set(got))
            return False, f"ids differ from the test images: extra {extra[:3]}, missing {missing[:3]}"
    cols = spec.pred_cols if spec.pred_cols is not None else header[1:]
    pos = [header.index(c) for c in cols if c in header]
    for r, row in enumerate(body):
        if len(row) != len(header):
            return False, f"row {r + 2} has {len(row)} fields, header {len(header)}"
        for k in pos:
            cell = row[k].strip()
            if spec.cells == "nonempty" and not cell:
                return False, f"row {r + 2}: empty prediction"
            if spec.cells == "number01":
                try:
                    v = float(cell)
                except ValueError:
                    return False, f"row {r + 2}: {header[k]}={cell!r} is not a number"
                if not 0 <= v <= 1:
                    return False, f"row {r + 2}: {header[k]}={cell!r} outside [0, 1]"
            if spec.labels is not None and cell:
                tokens = cell.split() if spec.multi else [cell]
                bad = [t for t in tokens if t not in spec.labels]
                if bad:
                    return False, f"row {r + 2}: label {bad[0]!r} is not one of the competition's {sorted(spec.labels)[:6]}"
    return True, "valid"


def old_submission(spec: Spec) -> bytes:
    """A valid submission from an 'earlier run', to put at the path before a case."""
    if spec.sample is None:
        return ("id,label\n" + "".join(f"{t},{min(spec.labels)}\n" for t in spec.ids)).encode()
    return spec.sample.read_bytes()


def tail(text: str, n: int = TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-n:])


DICT_REPR = re.compile(r"\{'\w+': |object at 0x[0-9a-f]+|<lambda>")


# ----------------------------------------------------------------------------- running

def insert_config(kernel_text: str, config: dict) -> str:
    m = re.search(r"^CONFIG\s*=\s*dict\(\s*\n", kernel_text, re.MULTILINE)
    if not m:
        raise RuntimeError("no 'CONFIG = dict(' line in the kernel")
    lines = "".join(f"    {k}={v!r},  # red-team\n" for k, v in config.items())
    return kernel_text[:m.end()] + lines + kernel_text[m.end():]


def build_argv(c: Case, spec: Spec | None, out: Path) -> list[str]:
    if not c.base:
        return list(c.argv)
    flags = dict(BASE)
    if spec is not None:
        flags["data-dir"] = str(spec.data)
    flags["out-dir"] = str(out)
    flags["budget"] = f"{c.budget:g}s"
    if c.epochs is not None:
        flags["epochs"] = str(c.epochs)
    # a CONFIG-block case tests the block: the base flags it sets would override it
    dropped = set(c.drop) | {k.replace("_", "-") for k in (c.config or {})}
    argv = []
    for k, v in flags.items():
        if k not in dropped:
            argv += [f"--{k}", v]
    return argv + list(c.argv)


def child_env(d: Path, c: Case) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RT_FAULTS", "RT_FAULT_LOG")}
    env.update(PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1", HOME=str(d / "home"), TMPDIR=str(d / "tmp"))
    (d / "home").mkdir(exist_ok=True)
    (d / "tmp").mkdir(exist_ok=True)
    if c.faults:
        site = d / "site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        env["PYTHONPATH"] = str(site)
        env["RT_FAULTS"] = json.dumps(c.faults)
        env["RT_FAULT_LOG"] = str(d / "faults.log")
    return env


def _default_signals() -> None:
    """In the child before exec: a runner started with `&` from a script inherits SIGINT ignored (bash does
    that without job control), and Python then never raises KeyboardInterrupt. The kernel must see the
    dispositions it would see on Kaggle or in a terminal."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


LIVE: set = set()  # kernels running now, killed (with their process group) if the runner is stopped


class Proc:
    """kernel.py in its own session, stdout/stderr to files we can poll while it runs."""

    def __init__(self, cmd, cwd, env, d: Path, tag: str):
        self.out_path, self.err_path = d / f"stdout{tag}.txt", d / f"stderr{tag}.txt"
        self._out, self._err = open(self.out_path, "wb"), open(self.err_path, "wb")
        self.t0 = time.time()
        self.p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self._out, stderr=self._err,
                                  stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_default_signals)
        LIVE.add(self)

    def text(self) -> str:
        return self.out_path.read_text(errors="replace") + "\n" + self.err_path.read_text(errors="replace")

    def poll(self):
        return self.p.poll()

    def send(self, sig: int, group: bool = False) -> None:
        try:
            if group:
                os.killpg(self.p.pid, sig)
            else:
                self.p.send_signal(sig)
        except ProcessLookupError:
            pass

    def wait(self, deadline: float) -> tuple[int | None, float]:
        """-> (exit status or None if killed at the deadline, wall seconds)."""
        try:
            rc = self.p.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            rc = None
        wall = time.time() - self.t0
        if rc is None:
            self.kill_group()
        LIVE.discard(self)
        self._out.close()
        self._err.close()
        return rc, wall

    def kill_group(self) -> None:
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def reap_group(self) -> None:
        """Kill what the kernel left behind in its session (e.g. orphaned DataLoader workers)."""
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def wait_for_moment(proc: Proc, out: Path, a: Action, deadline: float) -> bool:
    """Block until the action's moment; False when the process ended (or the deadline came) first."""
    epoch_seen_at, epoch_text_len = None, 0
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        text = proc.text()
        if a.moment == "import":
            if time.time() - proc.t0 >= a.delay:
                return True
        elif a.moment == "startup":
            if re.search(r"kernelkit: torch|config:", text):
                break
        elif a.moment == "cache":
            if re.search(r"image cache: \d+ images at", text):
                break
        elif a.moment == "rendezvous":
            if re.search(r"meeting \d+ ranks at", text):
                break
        elif a.moment == "train":
            if (out / "last.pt").is_file() or (out / "best.pt").is_file():
                break
        elif a.moment == "predict":
            if epoch_seen_at is None:
                m = re.search(r"epoch 0\b.*loss", text)
                if m:
                    epoch_seen_at, epoch_text_len = time.time(), m.end()
            elif re.search(r"error analysis|\btest\b|predict", text[epoch_text_len:]) \
                    or time.time() - epoch_seen_at > 1.5:
                break
        time.sleep(0.05)
    else:
        return False
    time.sleep(a.delay)
    return proc.poll() is None


def session_pids(sid: int) -> list[int]:
    """Processes of session `sid` (the kernel runs in its own): from /proc, no psutil."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(d.name))
    return pids


def leftovers(sid: int, wait_s: float = 3.0) -> list[int]:
    """What of the kernel's session is still running `wait_s` after it exited (exiting children get that long)."""
    end = time.time() + wait_s
    while True:
        left = session_pids(sid)
        if not left or time.time() > end:
            return left
        time.sleep(0.1)


def rank_pid(text: str, rank: int) -> int | None:
    m = re.search(rf"rank pids:.*\b{rank}=(\d+)", text)
    return int(m.group(1)) if m else None


def case_env(c: Case, env: dict, held: list) -> dict:
    """c.env with its ports filled: {free_port} nothing listens on, {busy_port} a socket of ours listens on."""
    import socket
    out = dict(env)
    for k, v in c.env.items():
        if "{free_port}" in v or "{busy_port}" in v:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            if "{busy_port}" in v:
                sock.listen(1)
                held.append(sock)  # held open for the whole run
            else:
                sock.close()
            v = v.replace("{free_port}", str(port)).replace("{busy_port}", str(port))
        out[k] = v
    return out


def file_state(path: Path):
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    if path.is_dir():
        return ("dir",)
    return (st.st_ino, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())


def run_case(c: Case, kernel: Path, workdir: Path, keep: bool = False) -> dict:
    d = Path(tempfile.mkdtemp(prefix=f"{c.id}-", dir=workdir))
    res = {"id": c.id, "cls": c.cls, "desc": c.desc, "expect": c.expect, "dir": str(d) if keep else None}
    try:
        return _run_case(c, kernel, d, res)
    except Exception as e:  # noqa: BLE001  (a harness error is reported as such, not as a kernel failure)
        res.update(got="harness-error", rc=None, wall_s=None, passed=False, reasons=[f"harness: {e!r}"])
        return res
    finally:
        if not keep:
            shutil.rmtree(d, ignore_errors=True)


def _run_case(c: Case, kernel: Path, d: Path, res: dict) -> dict:
    spec = c.setup(d) if c.setup else None
    text = kernel.read_text()
    if c.config:
        text = insert_config(text, c.config)
    (d / "kernel.py").write_text(text)
    out = d / "out"
    out.mkdir()
    sub = out / "submission.csv"
    if c.pre_submission and spec is not None:
        sub.write_bytes(old_submission(spec))
    before = file_state(sub)
    cmd = [sys.executable, "kernel.py", *build_argv(c, spec, out)]
    held: list = []
    try:
        env = case_env(c, child_env(d, c), held)
        return _run_kernel(c, d, out, spec, cmd, env, before, res)
    finally:
        for sock in held:
            sock.close()


def _run_kernel(c: Case, d: Path, out: Path, spec: Spec | None, cmd: list[str], env: dict, before, res: dict) -> dict:
    sub = out / "submission.csv"
    res["cmd"] = " ".join(cmd[1:])
    limit = (c.budget if c.expect != "help" else 0) + OVERRUN_S + 20.0  # hard stop past the bound
    proc = Proc(cmd, d, env, d, "")
    t_start = proc.t0
    t_signal = None
    reasons: list[str] = []
    a = c.action
    if a is not None:
        reached = wait_for_moment(proc, out, a, t_start + limit)
        res["moment_reached"] = reached
        if reached and a.kind == "kill_rank":
            t_signal = time.time()
            res["signal_at_s"] = round(t_signal - t_start, 1)
            pid = rank_pid(proc.text(), 1)
            try:
                os.kill(pid, a.sig) if pid else None
                res["rank_killed"] = bool(pid)
            except ProcessLookupError:
                res["rank_killed"] = "had already ended"
            if not pid:
                reasons.append("no 'rank pids' line: rank 1 could not be found")
        elif reached:
            t_signal = time.time()
            res["signal_at_s"] = round(t_signal - t_start, 1)
            proc.send(a.sig, a.group)
        else:
            reasons.append(f"moment '{a.moment}' not reached before the process ended (harness could not act)")
    rc, wall = proc.wait(t_start + limit)
    if c.no_leftovers:
        left = leftovers(proc.p.pid)
        res["left_behind"] = left
        if left:
            reasons.append(f"processes left behind: {left}")
    proc.reap_group()
    output = proc.text()
    for rx in c.require:
        if not re.search(rx, output):
            reasons.append(f"the output never says /{rx}/")
    for rx in c.forbid:
        if re.search(rx, output):
            reasons.append(f"the output says /{rx}/, which must not happen here")
    if a is not None and a.kind == "kill9_rerun" and t_signal is not None:
        res["first_rc"] = rc
        proc = Proc(cmd, d, env, d, "-rerun")
        rc, _ = proc.wait(t_start + limit)
        proc.reap_group()
        wall = time.time() - t_start  # from the first start: the original budget still holds
        output = output + "\n--- rerun ---\n" + proc.text()
    res.update(rc=rc, wall_s=round(wall, 1), tail=tail(output, 12))
    if t_signal is not None and a is not None and a.kind == "signal":
        res["after_signal_s"] = round(t_start + wall - t_signal, 1)

    after = file_state(sub)
    untouched = after == before
    valid, why = (check_submission(sub, spec) if spec is not None else (False, "no competition"))
    fresh = after is not None and after != before
    clean = untouched or after is None  # nothing at the path, or the old file as it was
    res.update(submission=("absent" if after is None else "untouched" if untouched else
                           ("valid" if valid else "invalid")), submission_check=why)
    out_tail = tail(proc.out_path.read_text(errors="replace")) + "\n" + tail(proc.err_path.read_text(errors="replace"))
    has_ckpt = any((out / n).is_file() for n in ("last.pt", "best.pt"))

    injected = (d / "faults.log").read_text().splitlines() if (d / "faults.log").is_file() else []
    if c.faults:
        res["faults_injected"] = len(injected)
        if not injected:
            reasons.append("harness: no fault was injected (the kernel wrote nothing the faults match); "
                           "the case tested nothing")

    # what happened, in a few words
    if rc is None:
        got = "timeout"
    elif rc == 2:
        got = "refuse"
    elif rc == 0 and fresh and valid:
        got = "submit"
    elif rc == 0 and c.expect == "help":
        got = "help" if not DICT_REPR.search(output) and "Traceback" not in output else "help, bad text"
    else:
        state = "valid sub" if (fresh and valid) else "invalid sub" if (fresh and not valid) else \
            "old sub kept" if (untouched and before is not None) else "no sub"
        got = f"exit {rc if rc >= 0 else 'sig' + str(-rc)}, {state}"
    res["got"] = got

    # the contract
    bound = c.budget + OVERRUN_S
    if rc is None:
        reasons.append(f"killed by the harness after {wall:.0f} s")
    if c.expect != "help" and wall > bound:
        reasons.append(f"wall {wall:.1f} s > budget {c.budget:g} s + {OVERRUN_S:g} s")
    if fresh and not valid:
        reasons.append(f"invalid file at the submission path: {why}")
    if rc == 0 and c.expect not in ("help",) and not (fresh and valid):
        reasons.append(f"exit 0 without a valid new submission ({why})")

    def refuse_ok() -> list[str]:
        r = []
        if rc != 2:
            named = rc not in (0, None) and c.names and any(n.lower() in out_tail.lower() for n in c.names)
            r.append(f"expected exit 2 (refusal), got {rc}" + (" (the message names it)" if named else ""))
            return r
        if wall > REFUSE_WITHIN_S:
            r.append(f"refusal took {wall:.1f} s > {REFUSE_WITHIN_S:g} s")
        if has_ckpt:
            r.append("refused after training started (checkpoint written)")
        if c.names and not any(n.lower() in out_tail.lower() for n in c.names):
            r.append(f"message does not name any of {list(c.names)}")
        if not clean:
            r.append("the submission path was changed by a refusal")
        return r

    def submit_ok() -> list[str]:
        r = []
        if rc != 0:
            r.append(f"expected exit 0 with a valid submission, got exit {rc}")
        if not (fresh and valid):
            r.append(f"submission: {why if fresh or after is None else 'not rewritten'}")
        if t_signal is not None and a is not None and a.kind == "signal" and rc is not None:
            after_sig = t_start + wall - t_signal
            if after_sig > SIGNAL_GRACE_S:
                r.append(f"exited {after_sig:.1f} s after the signal > {SIGNAL_GRACE_S:g} s")
        return r

    if c.expect == "refuse":
        reasons += refuse_ok()
    elif c.expect == "submit":
        reasons += submit_ok()
    elif c.expect == "either":
        r1, r2 = refuse_ok(), submit_ok()
        if r1 and r2:
            reasons += [f"neither a clean refusal ({'; '.join(r1)}) nor a submission ({'; '.join(r2)})"]
    elif c.expect == "help":
        stdout = proc.out_path.read_text(errors="replace")
        if rc != 0:
            reasons.append(f"--help exit {rc}")
        if "usage" not in stdout.lower():
            reasons.append("no usage text on stdout")
        m = DICT_REPR.search(output)
        if m:
            reasons.append(f"help text shows a Python repr: ...{output[max(0, m.start() - 40):m.end() + 40]!r}...")
        if "Traceback" in output:
            reasons.append("traceback in the output")
        if wall > REFUSE_WITHIN_S:
            reasons.append(f"--help took {wall:.1f} s")
    elif c.expect == "nosubmit":
        if rc == 0:
            reasons.append("exit 0 although no submission could be written")
        if not clean:
            reasons.append("the submission path holds a new, partial or invalid file")
    elif c.expect == "safe" and not ((rc == 0 and fresh and valid) or (rc not in (0, None) and clean)):
        reasons.append("neither a valid new submission with exit 0 nor a failure that left the path clean")
    res["reasons"] = list(dict.fromkeys(reasons))
    res["passed"] = not res["reasons"]
    return res


# ----------------------------------------------------------------------------- CLI

def select(only: str | None, fast: bool) -> list[Case]:
    cases = list(CASES)
    if only:
        keys = {k.strip() for k in only.split(",") if k.strip()}
        unknown = keys - {c.cls for c in cases} - {c.id for c in cases}
        if unknown:
            raise SystemExit(f"--only: no class or case {sorted(unknown)}; classes: "
                             f"{sorted({c.cls for c in cases})}")
        cases = [c for c in cases if c.cls in keys or c.id in keys]
    if fast:
        cases = [c for c in cases if not c.trains]
    return cases


def fmt_table(results: list[dict]) -> str:
    rows = [("case", "class", "expected", "got", "exit", "seconds", "result")]
    for r in results:
        rc = r.get("rc")
        rows.append((r["id"], r["cls"], r["expect"], r["got"], "-" if rc is None else str(rc),
                     "-" if r.get("wall_s") is None else f"{r['wall_s']:.1f}", "pass" if r["passed"] else "FAIL"))
    w = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w[i]) for i, v in enumerate(row)).rstrip() for row in rows)


def summary_by_class(results: list[dict]) -> dict:
    out: dict[str, dict] = {}
    for r in results:
        s = out.setdefault(r["cls"], {"pass": 0, "fail": 0, "failing": []})
        if r["passed"]:
            s["pass"] += 1
        else:
            s["fail"] += 1
            s["failing"].append(r["id"])
    return out


def git_rev() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=False).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated classes or case ids")
    ap.add_argument("--kernel", type=Path, default=ROOT / "kernel.py", help="kernel.py to test (copied per case)")
    ap.add_argument("--kernel-rev", help="test kernel.py as committed at this git revision (e.g. HEAD)")
    ap.add_argument("--fast", action="store_true", help="only the cases that should not train (refusals, --help)")
    ap.add_argument("--json", type=Path, help="results file (default bench/results/redteam[-selection].json)")
    ap.add_argument("--update", action="store_true",
                    help="merge these cases' results into the results file (same kernel) instead of replacing it")
    ap.add_argument("--keep", action="store_true", help="keep each case's directory (printed in the JSON)")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--set", action="append", default=[], metavar="FLAG=VALUE",
                    help="a base flag for every case that takes them, e.g. input-mode=rect (repeatable): the corpus "
                         "against a mode auto does not pick on its small images")
    args = ap.parse_args(argv)
    for item in args.set:
        flag, sep, value = item.partition("=")
        if not sep or not flag:
            ap.error(f"--set {item!r}: expected FLAG=VALUE")
        BASE[flag.lstrip("-").replace("_", "-")] = value
    cases = select(args.only, args.fast)
    if args.list:
        for c in cases:
            print(f"{c.id:40s} {c.cls:9s} {c.expect:9s} {c.desc}")
        print(f"{len(cases)} cases")
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="redteam-"))
    if args.kernel_rev:
        rev = subprocess.run(["git", "rev-parse", "--short", args.kernel_rev], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        args.kernel = workdir / f"kernel-{rev}.py"
        args.kernel.write_bytes(subprocess.run(["git", "show", f"{rev}:kernel.py"], cwd=ROOT, capture_output=True,
                                               check=True).stdout)
    kernel = args.kernel.resolve()
    if not kernel.is_file():
        raise SystemExit(f"--kernel {kernel} does not exist")
    kernel_sha = hashlib.sha256(kernel.read_bytes()).hexdigest()[:16]
    print(f"{len(cases)} cases against {kernel} (sha256 {kernel_sha}); work dir {workdir}", flush=True)
    results = []
    t0 = time.time()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped runner still cleans up below
    try:
        for i, c in enumerate(cases, 1):
            r = run_case(c, kernel, workdir, keep=args.keep)
            results.append(r)
            mark = "pass" if r["passed"] else "FAIL"
            print(f"[{i:3d}/{len(cases)}] {mark} {c.id:40s} {c.expect:8s} got {r['got']:<26s} "
                  f"{r.get('wall_s') or 0:5.1f}s  {'; '.join(r['reasons'])[:200]}", flush=True)
    finally:
        for proc in list(LIVE):
            proc.kill_group()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        path = args.json
    elif (args.only or args.fast) and not args.update:
        tag = "fast" if args.fast and not args.only else re.sub(r"[^A-Za-z0-9_.-]+", "_", args.only or "")[:60]
        path = RESULTS / f"redteam-{tag}{'-fast' if args.fast and args.only else ''}.json"
    else:
        path = RESULTS / "redteam.json"
    if args.set and not args.json:  # never mixed into the default mode's results
        path = path.with_name(path.stem + "".join("-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", item) for item in args.set)
                              + path.suffix)
    if args.update and path.is_file():
        old = json.loads(path.read_text())
        if old.get("kernel_sha256") != kernel_sha:
            raise SystemExit(f"--update: {path} holds results of kernel {old.get('kernel_sha256')}, not {kernel_sha}")
        if old.get("base_flags", dict(BASE)) != dict(BASE):
            raise SystemExit(f"--update: {path} holds results run with base flags {old.get('base_flags')}")
        fresh = {r["id"]: r for r in results}
        prev = {r["id"]: r for r in old["cases"]}
        order = [c.id for c in CASES]
        merged = {**prev, **fresh}
        results = [merged[i] for i in order if i in merged]  # cases no longer defined are dropped
    print()
    print(fmt_table(results))
    by_class = summary_by_class(results)
    print()
    for cls, s in by_class.items():
        print(f"{cls:9s} {s['pass']:3d} pass {s['fail']:3d} fail  {' '.join(s['failing'])}")
    n_pass = sum(r["passed"] for r in results)
    print(f"total {n_pass}/{len(results)} pass" + ("" if args.update else f" in {time.time() - t0:.0f} s"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "kernel": args.kernel_rev and f"git {args.kernel_rev} ({rev}):kernel.py" or str(kernel),
        "kernel_sha256": kernel_sha, "git": git_rev(), "base_flags": dict(BASE),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "python": sys.version.split()[0],
        "contract": {"refuse_within_s": REFUSE_WITHIN_S, "overrun_s": OVERRUN_S, "signal_grace_s": SIGNAL_GRACE_S},
        "passed": n_pass, "total": len(results), "by_class": by_class, "cases": results,
    }, indent=1) + "\n")
    print(f"results: {path}")
    return 0 if n_pass == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
