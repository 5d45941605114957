#!/usr/bin/env python
"""GPU training throughput: the bound, kernel.py's defaults, kernel.py with each switch and a plain
PIL + DataLoader loop, on the same generated iMet-like JPEGs, at 4 cores and at all cores.

Rows, per model (resnet50 @224 batch 128, convnext_tiny @320 batch 64; random init) and core count
(children pinned with os.sched_setaffinity to the first N allowed cores):

* bound: fwd + bwd + AdamW on GPU-resident random tensors, AMP (bf16 and fp16), channels_last;
* kernel defaults / kernel with one switch: the committed kernel.py as a subprocess, fixed epochs;
  steady img/s = train_images / train_s over the epochs after the first (warm-up, cache build);
  GPU utilisation sampled with nvidia-smi every 100 ms: mean over the steady epochs' training and
  the longest stretch below 10% from the end of the first epoch to the end of training (the epoch
  ends: validation, checkpoint writes); summary.json's checkpoint timing fields when present;
* reference: PIL open + torchvision RandomResizedCrop/flip/ToTensor/Normalize + DataLoader(num_workers
  = cores, pin_memory) + AMP fp16 + channels_last + AdamW, fixed steps;
* budget: kernel.py with nothing but the data and --budget 120s / 300s at 4 cores: wall time vs budget.

A variant whose option this kernel.py does not know (read from `kernel.py --help`) is skipped and
recorded as such; a failing row is recorded with its last stderr line and the run goes on.
Results merge into --out (JSON); the README table between the bench_gpu markers is rebuilt from it.

    python bench/bench_gpu.py [--quick] [--part bound,kernel,reference,budget] [--cores 4,all]
        [--models resnet50@224:128,convnext_tiny@320:64] [--n-images 24000] [--no-readme] [--out F]
    python bench/bench_gpu.py --table-only [--out F]      # README table from the JSON only
    python bench/bench_gpu.py --check                     # the short GPU check (issue 21), < 8 minutes

--check: one pass sized to fit 8 minutes of device time by its own estimate (the sum of its rows'
timeouts, printed first): generated data (2500 + 500 JPEGs), the bound in kernel.py's dtype and
kernel.py defaults for resnet50 @224 b128 and convnext_tiny @320 b64 at 4 cores, swa=0.25 on resnet50
(BatchNorm: the CUDA path of the weight average), a 120 s budget run, and
2 GPUs (ddp_procs=2) when there are two. JSON + table under $OUT (gpu_check.json, gpu_check.md),
else bench/results/. Without CUDA it prints the plan and a skip line and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime
from multiprocessing import Pool
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

SKIP_MESSAGE = ("bench_gpu: no CUDA device found; this benchmark needs a GPU (run it on the device machine, "
                "see README), skipped")
START, END = "<!-- bench_gpu:start -->", "<!-- bench_gpu:end -->"
PARTS = ("bound", "kernel", "reference", "budget")
DEFAULT_MODELS = "resnet50@224:128,convnext_tiny@320:64"
N_CLASSES = 100

# One switch at a time against the defaults, as key=value settings (kernel.py flag names use '-').
VARIANTS: list[tuple[str, list[str]]] = [
    ("CPU augmentation (gpu_aug off, aug light)", ["gpu_aug=", "aug=light"]),
    ("aug none + gpu_aug light", ["aug=none", "gpu_aug=light"]),
    ("amp_dtype fp16", ["amp_dtype=fp16"]),
    ("compile on", ["compile=true"]),
    ("channels_last off", ["channels_last=false"]),
    ("progressive resizing (resize_start 0.5, mixed sizes: not comparable with the bound)", ["resize_start=0.5"]),
    ("cache off", ["cache_images=false"]),
    ("input_mode rect (aspect buckets, BatchNorm per bucket: the rect path on CUDA; other shapes than the bound's)",
     ["input_mode=rect"]),
]


# ----------------------------------------------------------------------------- data
def _write_image(job: tuple) -> tuple[str, int, int]:
    """One iMet-like JPEG: short side 300; 56% with aspect > 2 (a few very long strips)."""
    from bench_pipeline import photo  # smooth structure + noise: realistic JPEG sizes
    path, seed = job
    rng = np.random.default_rng(seed)
    if rng.random() < 0.56:
        long = int(rng.uniform(601, 1200) if rng.random() < 0.9 else rng.uniform(1200, 3000))
    else:
        long = int(rng.uniform(300, 600))
    w, h = (long, 300) if rng.random() < 0.5 else (300, long)
    img = np.asarray(photo(w, h, rng)).copy()
    for _ in range(int(rng.integers(1, 4))):  # a few flat shapes: edges like objects in photographs
        y, x = int(rng.integers(0, h - 20)), int(rng.integers(0, w - 20))
        img[y:y + int(rng.integers(10, h - y)), x:x + int(rng.integers(10, w - x))] = rng.integers(0, 256, 3)
    from PIL import Image
    Image.fromarray(img).save(path, quality=90)
    return path, w, h


def make_data(root: Path, n_train: int, n_test: int, seed: int = 0, procs: int = 0) -> dict:
    """A single-label competition folder (train/, test/, train.csv, sample_submission.csv) kernel.py
    reads; reused when `root` already holds one of the same size (the marker is written last)."""
    import pandas as pd
    marker = root / "bench_data.json"
    if marker.is_file():
        meta = json.loads(marker.read_text())
        if meta.get("n_train") == n_train and meta.get("n_test") == n_test:
            return meta
    shutil.rmtree(root, ignore_errors=True)
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    train_ids = [f"{i:08x}" for i in range(n_train)]
    test_ids = [f"t{i:07x}" for i in range(n_test)]
    jobs = [(str(root / "train" / f"{t}.jpg"), seed * 10_000_019 + i) for i, t in enumerate(train_ids)]
    jobs += [(str(root / "test" / f"{t}.jpg"), seed * 10_000_019 + n_train + i) for i, t in enumerate(test_ids)]
    t0 = time.time()
    with Pool(procs or os.cpu_count() or 1) as pool:
        sizes = pool.map(_write_image, jobs, chunksize=64)
    labels = np.random.default_rng(seed).integers(0, N_CLASSES, n_train)
    pd.DataFrame({"id": train_ids, "label": labels}).to_csv(root / "train.csv", index=False)
    pd.DataFrame({"id": test_ids, "label": 0}).to_csv(root / "sample_submission.csv", index=False)
    aspect = np.array([max(w, h) / min(w, h) for _, w, h in sizes])
    nbytes = sum(os.path.getsize(p) for p, _, _ in sizes)
    meta = {"n_train": n_train, "n_test": n_test, "aspect_gt_2": round(float((aspect > 2).mean()), 3),
            "mean_kb": round(nbytes / len(sizes) / 1e3, 1), "seconds": round(time.time() - t0, 1)}
    marker.write_text(json.dumps(meta))
    return meta


# ----------------------------------------------------------------------------- kernel options
def known_options(help_text: str) -> dict[str, bool | tuple[str, ...]]:
    """kernel.py --help -> {option_name: True for a '--x, --no-x' switch, else its choices (maybe ())}."""
    opts: dict[str, bool | tuple[str, ...]] = {}
    for m in re.finditer(r"(?m)^\s+--([a-z0-9][a-z0-9-]*)(, --no-\1)?(?: \{([^}]*)\})?", help_text):
        name = m.group(1).replace("-", "_")
        opts[name] = True if m.group(2) else tuple(m.group(3).split(",")) if m.group(3) is not None else ()
    return opts


def variant_args(settings: list[str], options: dict) -> list[str] | str:
    """key=value settings -> kernel.py flags, or 'skipped: option X not in this kernel'. 'true' meets
    a switch (--x / --no-x) or a choice option (on/true/...) whichever way the kernel spells it."""
    args: list[str] = []
    for s in settings:
        key, value = s.split("=", 1)
        if key not in options:
            return f"skipped: option {key} not in this kernel"
        flag, kind = "--" + key.replace("_", "-"), options[key]
        truthy = value.lower() in ("1", "true", "on", "yes")
        if kind is True:
            args.append(flag if truthy else "--no-" + key.replace("_", "-"))
            continue
        if kind and value not in kind and truthy:
            value = next((c for c in ("on", "true", "1", "yes", "default") if c in kind), value)
        args += [flag, value]
    return args


# ----------------------------------------------------------------------------- outputs of a run
def steady_rate(history: list[dict]) -> dict:
    """img/s over the epochs after the first (its warm-up and cache build excluded); with a single
    epoch, that epoch (flagged)."""
    rows = [r for r in history if float(r.get("train_s") or 0) > 0]
    if not rows:
        return {"img_s": None, "epochs": 0, "note": "no training epoch"}
    steady = rows[1:] or rows
    images = sum(float(r["train_images"]) for r in steady)
    seconds = sum(float(r["train_s"]) for r in steady)
    return {"img_s": round(images / seconds, 1), "epochs": len(steady),
            "first_epoch_img_s": round(float(rows[0]["train_images"]) / float(rows[0]["train_s"]), 1),
            "note": "" if len(rows) > 1 else "one epoch only: warm-up included"}


def read_history(out_dir: Path) -> list[dict]:
    import pandas as pd
    f = out_dir / "history.csv"
    return pd.read_csv(f).to_dict("records") if f.is_file() else []


def checkpoint_timing(summary: dict) -> dict | str:
    """Checkpoint timing fields summary.json may carry (blocked_s, write_s, ...), else 'n/a'."""
    found = {}
    for key, value in summary.items():
        if isinstance(value, dict) and ("checkpoint" in key or "save" in key):
            found.update({f"{key}.{k}": v for k, v in value.items() if isinstance(v, (int, float))})
        elif isinstance(value, (int, float)) and re.search(r"blocked|write_s|save_s|checkpoint_.*s$", key):
            found[key] = value
    return found or "n/a"


def gpu_gaps(samples: list[tuple[float, float]], history: list[dict], run_start: float,
             train_end_s: float | None) -> dict:
    """Mean utilisation over the steady epochs' training, and the longest stretch below 10% from the
    end of the first epoch's training to the end of training (times: run_start + the clock's s)."""
    if not samples or not history or not run_start:
        return {"gpu_util_mean": None, "gpu_idle_max_s": None}
    t = np.array([s[0] for s in samples])
    u = np.array([s[1] for s in samples])
    steady = history[1:] or history
    inside = np.zeros(len(t), bool)
    for r in steady:
        end = run_start + float(r["elapsed_s"])
        inside |= (t >= end - float(r["train_s"])) & (t <= end)
    lo = run_start + float(history[0]["elapsed_s"])
    hi = run_start + float(train_end_s if train_end_s is not None else history[-1]["elapsed_s"])
    longest, begin = 0.0, None
    for ti, ui in zip(t, u):
        if ti < lo or ti > hi:
            continue
        if ui < 10:
            begin = ti if begin is None else begin
            longest = max(longest, ti - begin)
        else:
            begin = None
    return {"gpu_util_mean": round(float(u[inside].mean()), 1) if inside.any() else None,
            "gpu_idle_max_s": round(longest, 2)}


class GpuSampler:
    """nvidia-smi utilisation every 100 ms in the background, each sample stamped with its own
    timestamp (parsed as local time, like time.time())."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,utilization.gpu",
                                          "--format=csv,noheader,nounits", "-lms", "100", "-i", "0"],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                stamp, util = [p.strip() for p in line.split(",")]
                self.samples.append((datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").timestamp(), float(util)))
            except ValueError:
                continue

    def stop(self) -> list[tuple[float, float]]:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
            self.thread.join(timeout=5)
        return self.samples


# ----------------------------------------------------------------------------- children
def pin(cpus: list[int]):
    def apply() -> None:
        os.sched_setaffinity(0, cpus)
    return apply


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no output"


def run_child(args: list[str], cpus: list[int], timeout: float, cwd: Path | None = None) -> tuple[int, str, str, float]:
    t0 = time.time()
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, preexec_fn=pin(cpus),
                           cwd=cwd)
        return p.returncode, p.stdout, p.stderr, time.time() - t0
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return 124, out, f"timed out after {timeout:.0f} s", time.time() - t0


def child_json(rc: int, out: str, err: str) -> dict:
    if rc == 0:
        for ln in reversed(out.splitlines()):
            if ln.startswith("{"):
                return {"status": "ok", **json.loads(ln)}
    return {"status": f"failed: {last_line(err or out)}"}


def train_step_fn(model, dtype_name: str, device: str):
    """One fwd + bwd + AdamW step with autocast in `dtype_name` (fp16: GradScaler)."""
    import torch
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    scaler = torch.amp.GradScaler(device, enabled=dtype_name == "fp16" and device == "cuda")
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(x, y) -> None:
        with torch.autocast(device, dtype=dtype if device == "cuda" else torch.bfloat16):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return step


def make_model(name: str, device: str):
    import timm
    import torch
    torch.backends.cudnn.benchmark = True
    model = timm.create_model(name, pretrained=False, num_classes=N_CLASSES).to(device)
    return model.to(memory_format=torch.channels_last).train()


def child_bound(a: argparse.Namespace) -> dict:
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    step = train_step_fn(make_model(a.model, device), a.dtype, device)
    x = torch.randn(a.batch, 3, a.size, a.size, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, N_CLASSES, (a.batch,), device=device)
    for _ in range(a.warmup):
        step(x, y)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step(x, y)
    sync()
    return {"img_s": round(a.steps * a.batch / (time.perf_counter() - t0), 1), "steps": a.steps}


class PilDataset:
    """What most kernels do: PIL open, torchvision transforms, one image at a time."""

    def __init__(self, paths: list[str], labels: np.ndarray, size: int):
        from torchvision import transforms as T
        self.paths, self.labels = paths, labels
        self.tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                             T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image
        with Image.open(self.paths[i]) as im:
            return self.tf(im.convert("RGB")), int(self.labels[i])


def child_reference(a: argparse.Namespace) -> dict:
    import pandas as pd
    import torch
    from torch.utils.data import DataLoader
    device = "cuda" if torch.cuda.is_available() else "cpu"
    df = pd.read_csv(Path(a.data) / "train.csv", dtype={"id": str})
    paths = [str(Path(a.data) / "train" / f"{i}.jpg") for i in df["id"]]
    loader = DataLoader(PilDataset(paths, df["label"].values, a.size), batch_size=a.batch, shuffle=True,
                        num_workers=a.workers, pin_memory=device == "cuda", drop_last=True,
                        persistent_workers=True)
    step = train_step_fn(make_model(a.model, device), "fp16", device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    done, t0, images = 0, 0.0, 0
    while done < a.warmup + a.steps:
        for x, y in loader:
            if done == a.warmup:
                sync()
                t0 = time.perf_counter()
            x = x.to(device, non_blocking=True).to(memory_format=torch.channels_last)
            step(x, y.to(device, non_blocking=True))
            images += len(x) if done >= a.warmup else 0
            done += 1
            if done >= a.warmup + a.steps:
                break
    sync()
    return {"img_s": round(images / (time.perf_counter() - t0), 1), "steps": a.steps, "workers": a.workers}


# ----------------------------------------------------------------------------- rows
def parse_models(spec: str) -> list[tuple[str, int, int]]:
    out = []
    for item in spec.split(","):
        name, rest = item.strip().split("@")
        size, batch = rest.split(":")
        out.append((name, int(size), int(batch)))
    return out


def core_sets(spec: str) -> list[tuple[str, list[int]]]:
    allowed = sorted(os.sched_getaffinity(0))
    sets = []
    for item in spec.split(","):
        item = item.strip()
        cpus = allowed if item == "all" else allowed[:int(item)]
        label = f"all ({len(allowed)})" if item == "all" else item if len(cpus) == int(item) \
            else f"{len(cpus)} (asked {item})"
        sets.append((label, cpus))
    return sets


def row_key(model: str, size: int, batch: int, cores: str, name: str) -> str:
    return f"{model}@{size}:{batch} | {cores} | {name}"


def kernel_run(a: argparse.Namespace, extra: list[str], cpus: list[int], out_dir: Path, timeout: float,
               budget_run: bool = False) -> dict:
    """kernel.py as Kaggle runs it (the committed file, this interpreter), pinned, GPU sampled."""
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "kernel.py"), "--data-dir", str(a.data_dir), "--out-dir", str(out_dir)]
    if not budget_run and "--no-cache-images" not in extra:
        # Epoch 0's cache build is excluded from the rate anyway; sharing it saves minutes per row.
        cmd += ["--cache-dir", str(a.work / "cache")]
    sampler = GpuSampler()
    rc, out, err, wall = run_child(cmd + extra, cpus, timeout, cwd=a.work)
    samples = sampler.stop()
    (a.work / "logs").mkdir(parents=True, exist_ok=True)
    (a.work / "logs" / f"{out_dir.name}.log").write_text(out + err)
    summary = json.loads((out_dir / "summary.json").read_text()) if (out_dir / "summary.json").is_file() else {}
    state = json.loads((out_dir / "run_state.json").read_text()) if (out_dir / "run_state.json").is_file() else {}
    history = read_history(out_dir)
    sub = out_dir / "submission.csv"
    res = {"rc": rc, "wall_s": round(wall, 1), "args": extra,
           "submission_rows": sum(1 for _ in sub.open()) - 1 if sub.is_file() else None,
           "checkpoint_timing": checkpoint_timing(summary), "problems": summary.get("problems", []),
           "summary_model": summary.get("model"), "summary_img_size": summary.get("img_size")}
    res.update(steady_rate(history))
    res.update(gpu_gaps(samples, history, state.get("run_start", 0.0), summary.get("train_end_s")))
    if res["problems"]:  # exit 0 with a submission, but something failed after training started
        res["note"] = "; ".join(filter(None, [res.get("note"), "problems: " + " / ".join(map(str, res["problems"]))]))
    if rc != 0:
        res["status"] = f"failed: {last_line(err)}"
    elif res["img_s"] is None and not budget_run:
        res["status"] = f"failed: no training epoch ({last_line(err)})"
    else:
        res["status"] = "ok"
    if not a.keep_outputs:
        shutil.rmtree(out_dir, ignore_errors=True)
    return res


def kernel_dtype(options: dict[str, bool], cc_major: int) -> str:
    """The autocast dtype kernel.py uses by default: bf16 on Ampere+ once it knows amp_dtype."""
    return "bf16" if "amp_dtype" in options and cc_major >= 8 else "fp16"


def kernel_rows(a: argparse.Namespace, cores: str) -> list[tuple[str, list[str]]]:
    """The kernel rows one call runs at `cores` (a core_sets label): defaults unless skipped, then
    the variants picked by --variants, at the core counts of --variant-cores."""
    asked = "all" if cores.startswith("all") else cores.split("asked ")[-1].rstrip(")")
    wanted = asked in [c.strip() for c in a.variant_cores.split(",")]
    rows = [] if a.skip_defaults else [("kernel defaults", [])]
    return rows + [(f"kernel: {n}", s) for n, s in VARIANTS if wanted and (
        a.variants == "all" or any(v.strip() and v.strip() in n for v in a.variants.split(",")))]


def part_kernel(a, res: dict, model: str, size: int, batch: int, cores: str, cpus: list[int], options, cc) -> None:
    for name, settings in kernel_rows(a, cores):
        kernel_row(a, res, (model, size, batch), cores, cpus, name, settings, options, cc, a.timeout)


def kernel_row(a, res: dict, spec: tuple[str, int, int], cores: str, cpus: list[int], name: str,
               settings: list[str], options, cc: int, timeout: float) -> None:
    """One kernel.py run with `settings` on top of the row's model, size, batch and epochs."""
    model, size, batch = spec
    base = ["--model", model, "--img-size", str(size), "--batch-size", str(batch), "--epochs", str(a.epochs)]
    # Throughput at img_size, as the bound is measured: progressive resizing (on by default) would mix
    # smaller inputs in. Its own row turns it back on (a later flag wins).
    at_full_size = variant_args(["resize_start=0"], options)
    base += at_full_size if isinstance(at_full_size, list) else []
    key = row_key(model, size, batch, cores, name)
    args = variant_args(settings, options)
    dtype = "fp16" if "amp_dtype=fp16" in settings else kernel_dtype(options, cc)
    entry = {"kind": "kernel", "model": model, "size": size, "batch": batch, "cores": cores, "name": name,
             "dtype": dtype, "settings": settings}
    if isinstance(args, str):
        entry.update(status=args, img_s=None)
    else:
        tag = re.sub(r"[^a-z0-9]+", "_", f"{model}_{size}_{len(cpus)}_{name}".lower())
        print(f"[kernel] {key} ...", flush=True)
        try:
            entry.update(kernel_run(a, base + args, cpus, a.work / "runs" / tag, timeout))
        except Exception as e:  # a broken output file must not end the whole benchmark
            entry.update(status=f"failed: {type(e).__name__}: {e}", img_s=None)
    print(f"[kernel] {key}: {entry['status']} {entry.get('img_s')} img/s, util {entry.get('gpu_util_mean')}%, "
          f"longest gap {entry.get('gpu_idle_max_s')} s", flush=True)
    res["rows"][key] = {**entry, "device": res.get("device")}
    save(a, res)


def part_child(a, res: dict, kind: str, model: str, size: int, batch: int, cores: str, cpus: list[int],
               dtypes: list[str] | None = None) -> None:
    dtypes = dtypes or (["bf16", "fp16"] if kind == "bound" else ["fp16"])
    for dtype in dtypes:
        name = f"bound ({dtype})" if kind == "bound" else "reference: PIL + DataLoader (fp16)"
        key = row_key(model, size, batch, cores, name)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--model", model, "--size", str(size),
               "--batch", str(batch), "--dtype", dtype, "--steps", str(a.steps), "--warmup", str(a.warmup),
               "--data", str(a.data_dir), "--workers", str(len(cpus))]
        print(f"[{kind}] {key} ...", flush=True)
        rc, out, err, wall = run_child(cmd, cpus, a.timeout)
        entry = {"kind": kind, "model": model, "size": size, "batch": batch, "cores": cores, "name": name,
                 "dtype": dtype, "wall_s": round(wall, 1), **child_json(rc, out, err)}
        entry.setdefault("img_s", None)
        print(f"[{kind}] {key}: {entry['status']} {entry['img_s']} img/s", flush=True)
        res["rows"][key] = {**entry, "device": res.get("device")}
        save(a, res)


def part_budget(a, res: dict, cpus: list[int], grace_s: float = 300.0) -> None:
    for budget in a.budgets.split(","):
        seconds = parse_seconds(budget)
        print(f"[budget] {budget} ...", flush=True)
        try:
            r = kernel_run(a, ["--budget", budget], cpus, a.work / "runs" / f"budget_{budget}", seconds + grace_s,
                           budget_run=True)
        except Exception as e:
            r = {"status": f"failed: {type(e).__name__}: {e}", "rc": None, "wall_s": None, "submission_rows": None}
        r.update(budget=budget, budget_s=seconds, cores=str(len(cpus)), expected_rows=a.n_test,
                 overrun=r["wall_s"] is not None and r["wall_s"] > seconds)
        if r["status"] == "ok" and r["submission_rows"] != a.n_test:
            r["status"] = f"failed: submission has {r['submission_rows']} rows, expected {a.n_test}"
        print(f"[budget] {budget}: wall {r['wall_s']} s, rc {r['rc']}, rows {r['submission_rows']}, "
              f"overrun {r['overrun']}", flush=True)
        res["budget"][budget] = {**r, "device": res.get("device")}
        save(a, res)


def parse_seconds(text: str) -> float:
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)([hms])", text):
        total += float(num) * {"h": 3600, "m": 60, "s": 1}[unit]
    return total


# ----------------------------------------------------------------------------- the short GPU check
CHECK_LIMIT_S = 480.0  # the whole check must fit 8 minutes of device time, by the sum of its timeouts
CHECK_DATA = {"n_images": 2500, "n_test": 500, "epochs": 3, "steps": 30, "warmup": 5, "budgets": "120s",
              "cores": "4"}
# From the first run on an H200 (2026-12-04, 4 cores): data 7 s; a bound child ~28 s from a cold start
# (CUDA init, cuDNN autotuning), so 20 s failed both; compile=true on resnet50 had not finished one
# epoch after 70 s (Inductor compiles on the 4 pinned cores): it is measured by the full benchmark's
# `compile on` variant (540 s a row), not here.
CHECK_TIMEOUTS = {"data": 15.0, "bound": 40.0, "kernel": 60.0, "swa": 40.0, "budget_grace": 20.0, "ddp": 35.0}


def check_plan(models: list[tuple[str, int, int]], gpus: int, budget: str = CHECK_DATA["budgets"]) -> list[tuple[str, float]]:
    """(step, worst-case seconds: its timeout) of --check, in order; the sum is its own estimate."""
    t = CHECK_TIMEOUTS
    plan = [("generate data", t["data"])]
    for model, size, batch in models:
        plan += [(f"bound {model}@{size}:{batch}", t["bound"]), (f"kernel defaults {model}@{size}:{batch}", t["kernel"])]
    plan += [(f"swa=0.25 {models[0][0]}", t["swa"]), (f"budget {budget}", parse_seconds(budget) + t["budget_grace"])]
    if gpus >= 2:
        plan.append((f"2 GPUs (ddp_procs=2) {models[0][0]}", t["ddp"]))
    return plan


def run_check(a, res: dict, options, cc: int, gpus: int) -> None:
    """--check's rows (see the module docstring), each under its planned timeout."""
    models = parse_models(a.models)
    cores, cpus = core_sets(a.cores)[0]
    dtype = kernel_dtype(options, cc)
    for model, size, batch in models:
        a.timeout = CHECK_TIMEOUTS["bound"]
        part_child(a, res, "bound", model, size, batch, cores, cpus, dtypes=[dtype])
        kernel_row(a, res, (model, size, batch), cores, cpus, "kernel defaults", [], options, cc,
                   CHECK_TIMEOUTS["kernel"])
    first = models[0]
    kernel_row(a, res, first, cores, cpus, "kernel: swa 0.25", ["swa=0.25"], options, cc, CHECK_TIMEOUTS["swa"])
    part_budget(a, res, cpus, grace_s=CHECK_TIMEOUTS["budget_grace"])
    if gpus >= 2:
        kernel_row(a, res, first, cores, cpus, "kernel: 2 GPUs (ddp_procs 2)", ["ddp_procs=2"], options, cc,
                   CHECK_TIMEOUTS["ddp"])


# ----------------------------------------------------------------------------- results and table
def load_results(path: Path) -> dict:
    res = json.loads(path.read_text()) if path.is_file() else {}
    res.setdefault("rows", {})
    res.setdefault("budget", {})
    return res


def save(a, res: dict) -> None:
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1, default=str) + "\n")
    os.replace(tmp, a.out)


def bound_for(rows: dict, row: dict) -> float | None:
    """The bound with the same model, size, batch, cores and dtype; else the same dtype at any cores."""
    same = [r for r in rows.values() if r.get("kind") == "bound" and r.get("img_s")
            and (r["model"], r["size"], r["batch"], r.get("dtype")) == (row["model"], row["size"], row["batch"],
                                                                       row.get("dtype"))]
    exact = [r for r in same if r["cores"] == row["cores"]]
    pick = exact or same
    return pick[0]["img_s"] if pick else None


def _fmt(value, spec: str = ".0f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _ckpt(value) -> str:
    if not isinstance(value, dict):
        return "n/a"
    return ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items())


def build_table(res: dict) -> str:
    order = {"bound": 0, "kernel": 1, "reference": 2}
    rows = sorted(res.get("rows", {}).values(), key=lambda r: (r["model"], r["size"], r["cores"],
                                                                 order.get(r["kind"], 3), r["name"] != "kernel defaults"))
    devices = sorted({str(r.get("device", res.get("device"))) for r in rows})
    mixed = len(devices) > 1
    commands = "; ".join(f"`{c}`" for c in res.get("commands", [res.get("command", "")]))
    lines = [f"Device: {' + '.join(devices) if rows else res.get('device', '?')}"
             f"{' (MIXED: compare rows of one device only)' if mixed else ''}; torch {res.get('torch', '?')}, "
             f"timm {res.get('timm', '?')}; {res.get('cpu_count', '?')} cores; {res.get('n_images', '?')} generated "
             f"JPEGs; kernel rows: {res.get('epochs', '?')} epochs, steady img/s excludes the first. Commands: "
             f"{commands}", "",
             "| model @ size, batch | cores | row | dtype | train img/s | share of bound | GPU util (steady) | "
             "longest GPU gap < 10% | checkpoint timing | note |",
             "|---|---|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        bound = bound_for(res["rows"], r)
        share = f"{100 * r['img_s'] / bound:.0f}%" if r.get("img_s") and bound else "n/a"
        status = r.get("status", "")
        note = "" if status == "ok" else status
        for extra in (r.get("note"), f"on {r.get('device')}" if mixed else ""):
            if extra:
                note = (note + "; " if note else "") + extra
        kernel = r["kind"] == "kernel" and status == "ok"
        lines.append(f"| {r['model']} @ {r['size']}, {r['batch']} | {r['cores']} | {r['name']} | {r.get('dtype', '')} | "
                     f"{_fmt(r.get('img_s'))} | {share} | "
                     f"{_fmt(r.get('gpu_util_mean'), '.0f', '%') if kernel else ''} | "
                     f"{_fmt(r.get('gpu_idle_max_s'), '.1f', ' s') if kernel else ''} | "
                     f"{_ckpt(r.get('checkpoint_timing')) if kernel else ''} | {note.replace('|', '/')} |")
    if res.get("budget"):
        lines += ["", "| kernel.py defaults, budget | cores | process wall time | exit | submission rows | "
                      "within budget | model picked | note |", "|---|---|---:|---|---|---|---|---|"]
        for b in res["budget"].values():
            within = "n/a" if b.get("rc") is None else "no: OVERRUN" if b.get("overrun") else "yes"
            note = "" if b.get("status", "ok") == "ok" else b["status"]
            lines.append(f"| {b['budget']} | {b['cores']} | {_fmt(b.get('wall_s'), '.1f', ' s')} | {b.get('rc')} | "
                         f"{b.get('submission_rows')} of {b.get('expected_rows')} | {within} | "
                         f"{b.get('summary_model')} @ {b.get('summary_img_size')} | {note.replace('|', '/')} |")
    return "\n".join(lines)


def write_readme(readme: Path, table: str) -> None:
    """Replace what lies between the markers (idempotent); append the markers when missing."""
    text = readme.read_text()
    block = f"{START}\n{table}\n{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    readme.write_text(text)


# ----------------------------------------------------------------------------- main
def device_info(res: dict) -> int:
    import timm
    import torch
    cc = 0
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        res["device"] = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}"
        cc = p.major
    else:
        res["device"] = f"CPU only ({platform.machine()}; smoke run)"
    res.update(torch=torch.__version__, timm=timm.__version__, cpu_count=len(os.sched_getaffinity(0)),
               python=platform.python_version())
    return cc


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", default=",".join(PARTS), help="comma-separated: " + ", ".join(PARTS))
    ap.add_argument("--cores", default="4,all", help="core counts, e.g. 4,all")
    ap.add_argument("--models", default=DEFAULT_MODELS, help="name@size:batch,...")
    ap.add_argument("--variants", default="all", help="kernel variants whose name contains one of these; all (default) or '' for none")
    ap.add_argument("--variant-cores", default="4",
                    help="core counts (of --cores) that also run the one-switch variants, e.g. 4 or 4,all")
    ap.add_argument("--n-images", type=int, default=24000, help="generated training JPEGs")
    ap.add_argument("--n-test", type=int, default=1000, help="generated test JPEGs")
    ap.add_argument("--epochs", type=int, default=3, help="kernel.py epochs per row (the first is excluded)")
    ap.add_argument("--skip-defaults", action="store_true",
                    help="part kernel: only the variants (when a call is split to fit a time limit)")
    ap.add_argument("--steps", type=int, default=100, help="timed steps of the bound and the reference")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps before them")
    ap.add_argument("--budgets", default="120s,300s", help="budget-check runs of kernel.py")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1500 images, 2 epochs, few steps")
    ap.add_argument("--work", default="/tmp/bench_gpu", help="data, cache and run folders")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu.json"), help="results JSON (merged)")
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    ap.add_argument("--no-readme", action="store_true", help="do not rewrite the README table")
    ap.add_argument("--table-only", action="store_true", help="rebuild the README table from --out and stop")
    ap.add_argument("--timeout", type=float, default=540, help="seconds per row before it is failed")
    ap.add_argument("--keep-outputs", action="store_true", help="keep each kernel run's output folder")
    ap.add_argument("--check", action="store_true",
                    help="the short GPU check (< 8 minutes): bound + defaults for both models, swa, "
                         "a 120 s budget, 2 GPUs when present; results under $OUT")
    ap.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)  # smoke runs without a GPU
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    for name, kind, default in (("model", str, ""), ("size", int, 0), ("batch", int, 0), ("dtype", str, "fp16"),
                                ("data", str, ""), ("workers", int, 0)):
        ap.add_argument("--" + name, type=kind, default=default, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.quick:
        a.n_images, a.n_test, a.epochs, a.steps, a.warmup = min(a.n_images, 1500), min(a.n_test, 100), 2, 8, 3
    if a.check:
        for key, value in CHECK_DATA.items():
            setattr(a, key, value)
        results = Path(os.environ.get("OUT") or ROOT / "bench" / "results")
        a.out, a.models, a.no_readme = results / "gpu_check.json", DEFAULT_MODELS, True
    a.work, a.out = Path(a.work), Path(a.out)
    a.data_dir = a.work / f"data_{a.n_images}"
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.child:
        print(json.dumps((child_bound if a.child == "bound" else child_reference)(a)), flush=True)
        return 0
    res = load_results(a.out)
    if a.table_only:
        write_readme(Path(a.readme), build_table(res))
        print(build_table(res))
        return 0
    import torch
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if a.check:
        plan = check_plan(parse_models(a.models), gpus)
        print(f"gpu check plan ({len(plan)} steps, at most {sum(s for _, s in plan):.0f} s of "
              f"{CHECK_LIMIT_S:.0f}): " + ", ".join(f"{n} <= {s:.0f} s" for n, s in plan), flush=True)
    if not torch.cuda.is_available() and not a.allow_cpu:
        print(SKIP_MESSAGE)
        return 0
    cc = device_info(res)
    command = "python bench/bench_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    res["commands"] = [c for c in res.get("commands", []) if c != command] + [command]
    res.update(command=command,
               n_images=a.n_images, epochs=a.epochs, updated=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    parts = [p.strip() for p in a.part.split(",")]
    if a.check or any(p in parts for p in ("kernel", "reference", "budget")):
        meta = make_data(a.data_dir, a.n_images, a.n_test)
        res["data"] = meta
        print(f"data: {meta}", flush=True)
    help_text = subprocess.run([sys.executable, str(ROOT / "kernel.py"), "--help"], capture_output=True,
                               text=True).stdout
    options = known_options(help_text)
    if a.check:
        res["check_plan_s"] = sum(s for _, s in check_plan(parse_models(a.models), gpus))
        run_check(a, res, options, cc, gpus)
        parts = []
    for model, size, batch in parse_models(a.models):
        for cores, cpus in core_sets(a.cores):
            if "bound" in parts:
                part_child(a, res, "bound", model, size, batch, cores, cpus)
            if "kernel" in parts:
                part_kernel(a, res, model, size, batch, cores, cpus, options, cc)
            if "reference" in parts:
                part_child(a, res, "reference", model, size, batch, cores, cpus)
    if "budget" in parts:
        part_budget(a, res, core_sets("4")[0][1])
    save(a, res)
    table = build_table(res)
    print(table)
    if a.check:
        (a.out.parent / "gpu_check.md").write_text(table + "\n")
    if not a.no_readme:
        write_readme(Path(a.readme), table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
