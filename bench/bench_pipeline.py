"""How fast the image pipeline feeds a model, against the naive seed method, side by side.

Makes a corpus of real-size photographic JPEGs in a temp dir (short side 300, long side 300-5000,
a share of extreme strips, noise and smooth structure so file sizes are realistic: ~2.9 bits per
pixel at quality 90), then times, with the same worker count W and batch size:

* naive seed: `Image.open(p).convert("RGB").resize((S, S))` -> tensor (what the seeds did);
* kernelkit direct: ImageDataset + EvalTransform without cache (decode + resize every time);
* kernelkit cache build: the first pass that decodes once and writes the pre-resized cache;
* kernelkit cached eval / cached train: later epochs and inference, read from the cache
  (train adds the random resized crop + flip of aug='light' on the cached tensor);
* kernelkit cached rows item by item: the cached eval batches built one row at a time, as the
  loader did before whole-batch gathers (`ImageDataset.batch`), which now serve eval batches and
  training batches whose augmentation runs on the GPU (`gpu_aug=auto`).

naive uses a torch DataLoader with W worker processes; the kernelkit modes use `make_loader`
exactly as run.py does: W worker processes for decoding, W threads for cached data. Every mode
runs once per round, rounds interleaved; the table gives medians over rounds, and each ratio to
naive is taken within a round (same load) before the median. images/s per core = images/s / W.
Rates are steady-state: the clock starts at the first batch (worker start-up, paid once per run,
is reported separately for the cache build).
Prints a markdown table.

    .venv/bin/python bench/bench_pipeline.py [--n 600] [--size 256] [--workers 2] [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from kernelkit.data.cache import build_cache  # noqa: E402
from kernelkit.data.loaders import ImageDataset, make_loader  # noqa: E402
from kernelkit.data.transforms import EvalTransform, TrainTransform  # noqa: E402


# ----------------------------------------------------------------------------- corpus
def photo(w: int, h: int, rng: np.random.Generator) -> Image.Image:
    """Smooth colour structure + fine luminance/chroma noise: JPEG sizes like photographs."""
    lw, lh = max(2, w // 24), max(2, h // 24)
    base = rng.integers(0, 256, (lh, lw, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC), dtype=np.int16)
    noise = rng.normal(0, 6, (h, w, 1)) + rng.normal(0, 2, (h, w, 3))
    return Image.fromarray(np.clip(img + noise, 0, 255).astype(np.uint8))


def make_corpus(root: Path, n: int, seed: int = 0) -> list[str]:
    """Short side 300; long side 300-600 (70%), 600-1200 (20%, padded), 1200-5000 (10%, strips)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        u = rng.random()
        long = int(rng.uniform(300, 600) if u < 0.7 else rng.uniform(600, 1200) if u < 0.9 else rng.uniform(1200, 5000))
        w, h = (long, 300) if rng.random() < 0.5 else (300, long)
        p = root / f"{i:05d}.jpg"
        photo(w, h, rng).save(p, quality=90)
        paths.append(str(p))
    return paths


# ----------------------------------------------------------------------------- datasets
class NaiveDataset(Dataset):
    """The seed method: PIL open, convert, resize to the working size, to a tensor."""

    def __init__(self, paths: list[str], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        img = Image.open(self.paths[i]).convert("RGB").resize((self.size, self.size))
        return torch.from_numpy(np.array(img)).permute(2, 0, 1), torch.zeros(()), torch.tensor(1.0)


class ItemByItem(ImageDataset):
    """The cached dataset without its whole-batch gather: the loader builds batches row by row."""
    batch = None


def images_per_s(loader, passes: int = 1) -> float:
    """Steady-state rate: the clock starts when the first batch arrives (worker start-up, seconds
    under spawn, is paid once per run, not per image), for every mode alike."""
    t0, n = None, 0
    for _ in range(passes):
        for x, _, _ in loader:
            if t0 is None:
                t0 = time.perf_counter()
            else:
                n += len(x)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=600, help="corpus size")
    ap.add_argument("--size", type=int, default=256, help="working size")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cached-passes", type=int, default=5, help="passes over the corpus per cached timing")
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the main process only collects batches; workers are single-threaded anyway

    tmp = Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    try:
        t0 = time.time()
        (tmp / "img").mkdir()
        paths = make_corpus(tmp / "img", args.n)
        sizes = [Image.open(p).size for p in paths]
        px = np.array([w * h for w, h in sizes], float)
        nbytes = np.array([os.path.getsize(p) for p in paths], float)
        aspect = np.array([max(s) / min(s) for s in sizes])
        print(f"corpus: {len(paths)} JPEGs in {time.time() - t0:.0f}s, {px.mean() / 1e6:.2f} MP and "
              f"{nbytes.mean() / 1e3:.0f} kB on average ({8 * nbytes.sum() / px.sum():.1f} bits/pixel), "
              f"{(aspect > 2).mean():.0%} with aspect > 2, longest side {max(max(s) for s in sizes)}", flush=True)

        S, W, B = args.size, args.workers, args.batch
        ev, tr = EvalTransform(S), TrainTransform(S, aug="light")
        modes = ["naive seed (PIL open + resize)", "kernelkit direct (no cache)", "kernelkit cache build (cold)",
                 "kernelkit cached, eval", "kernelkit cached, train aug", "kernelkit cached, rows item by item"]
        per_round = []  # {mode: images/s}, one dict per round
        whole = []  # cache build rate over the whole call, worker start-up included
        for r in range(args.rounds):
            root = tmp / f"cache{r}"
            rates = {}
            rates[modes[0]] = images_per_s(DataLoader(NaiveDataset(paths, S), batch_size=B, num_workers=W))
            rates[modes[1]] = images_per_s(make_loader(ImageDataset(paths, None, ev, S), B, False, W))
            t = time.perf_counter()
            cache = build_cache(paths, ev.geometry, root, num_workers=W)
            whole.append(len(paths) / (time.perf_counter() - t))
            rates[modes[2]] = cache.meta["steady_images_per_s"]
            k = args.cached_passes
            rates[modes[3]] = images_per_s(make_loader(ImageDataset(paths, None, ev, S, cache=cache), B, False, W), k)
            rates[modes[4]] = images_per_s(make_loader(ImageDataset(paths, None, tr, S, cache=cache), B, True, W), k)
            rates[modes[5]] = images_per_s(make_loader(ItemByItem(paths, None, ev, S, cache=cache), B, False, W), k)
            print(f"round {r + 1}: " + ", ".join(f"{m.split(' (')[0]} {v:.0f}/s" for m, v in rates.items()), flush=True)
            per_round.append(rates)
            shutil.rmtree(root)

        # The machine is shared: report medians over rounds, and ratios taken within each round
        # (side by side, same load) before the median.
        med = {m: float(np.median([r[m] for r in per_round])) for m in modes}
        ratio = {m: float(np.median([r[m] / r[modes[0]] for r in per_round])) for m in modes}
        print()
        print(f"{len(paths)} JPEGs -> {S}x{S}, {W} workers, batch {B}, median of {args.rounds} rounds; "
              f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
              f"torch {torch.__version__.split('+')[0]}")
        print()
        print("| loader | images/s | images/s per core | vs naive (same round) |")
        print("|---|---:|---:|---:|")
        for m in modes:
            print(f"| {m} | {med[m]:.0f} | {med[m] / max(W, 1):.0f} | {ratio[m]:.1f}x |")
        print()
        print(f"cache build including worker start-up and the final fsync: {np.median(whole):.0f} images/s "
              f"for these {len(paths)} images")
        if args.json:
            Path(args.json).write_text(json.dumps({"n": len(paths), "size": S, "workers": W, "batch": B,
                                                   "rounds": per_round, "median_images_per_s": med,
                                                   "median_ratio_vs_naive": ratio}, indent=1) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
