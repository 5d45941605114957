"""Pre-resized image cache: decode every image once to the working geometry, then read uint8 rows.

Layout: `<root>/<size>px-<key>/` holding

    images.u8   uint8 memmap (n_cached, size, size, 3): rows of images.load_resized's output, stored
                channels-last (HWC), so a row is read as a channels-last (3, size, size) tensor,
                which the random crop resizes ~1.5x faster and ThreadLoader stacks with one memcpy
    ok.npy      bool (n_cached,): False for an unreadable file (its row is the blank grey image)
    bad.txt     one line per unreadable file: why
    meta.json   written last; a directory without a valid one is not a cache

The key hashes the geometry (size, pad_aspect, fill), the decoder version and the file list
(paths, and by default each file's size and mtime), so another size, pad setting, file list or
a changed file never reuses a stale cache. A build writes into a hidden temporary directory that
is renamed into place only once its data, flags and metadata are on disk: a build killed at any
point leaves no directory that looks complete (the leftover is removed by the next build).

Rows are written by DataLoader workers (spawn-safe: module-level classes, no lambdas) straight
into the pixel file (pwrite at the row's offset), so no pixels cross process boundaries during
the build. At 256 px a row
is 192 KiB: 109k iMet images take 21.5 GB, more than /kaggle/working's 20 GB. `max_bytes` (and
the free disk space) bound the cache; images beyond what fits are left out of it and decoded on
the fly, with a warning saying so.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..core.clock import now as clock_now
from ..core.progress import progress
from ..core.stopping import ignore_in_worker
from .images import RECT, RECT_FORMAT, DECODER_VERSION, BadImage, blank_image, column_rows, load_rect, load_resized, load_tiles, tv_jpeg_decoder

log = logging.getLogger("kernelkit")

CACHE_FORMAT = 2  # 2: NHWC rows
DATA, OK, BAD, META = "images.u8", "ok.npy", "bad.txt", "meta.json"
FREE_DISK_MARGIN = 1 << 30  # leave 1 GiB free for checkpoints and the submission
MAX_LOGGED_BAD = 50

Geometry = Sequence  # (size, pad_aspect, fill[, tiles]), e.g. EvalTransform(...).geometry


def _geometry(geometry: Geometry) -> tuple[int, float, int, int]:
    size, pad_aspect, fill, *rest = geometry
    return int(size), float(pad_aspect), int(fill), int(rest[0]) if rest else 1


def cache_key(paths: Sequence[str], geometry: Geometry, stat_files: bool = True) -> str:
    """Hex digest of everything the cached pixels depend on."""
    size, pad_aspect, fill, tiles = _geometry(geometry)
    what = {"format": CACHE_FORMAT, "decoder": DECODER_VERSION, "size": size, "pad_aspect": pad_aspect,
            "fill": fill, "n": len(paths)}
    if tiles != 1:  # only then (tiles, or RECT): square caches keep the keys they had before tiles existed
        what["tiles"] = tiles
    if tiles == RECT:  # the buckets and the packing, whatever pad_aspect says (rect ignores it)
        what.update(rect=RECT_FORMAT, pad_aspect=0.0)
    h = hashlib.sha256(json.dumps(what, sort_keys=True).encode())
    for p in paths:
        h.update(str(p).encode("utf-8", "surrogateescape") + b"\0")
        if stat_files:
            try:
                st = os.stat(p)
                h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            except OSError:
                h.update(b"missing")
        h.update(b"\n")
    return h.hexdigest()[:24]


def cache_dir(root: str | Path, geometry: Geometry, key: str) -> Path:
    return Path(root) / f"{_geometry(geometry)[0]}px-{key}"


class ImageCache:
    """Read side of a complete cache. Picklable for DataLoader workers: the memmap is opened
    lazily in each process and never pickled. `subset(indices)` gives a view for a split."""

    def __init__(self, directory: str | Path, meta: dict, ok: np.ndarray, index: np.ndarray | None = None):
        self.dir = Path(directory)
        self.meta = meta
        self.size = int(meta["size"])
        self.tiles = int(meta.get("tiles", 1))
        self.geometry = (self.size, float(meta["pad_aspect"]), int(meta["fill"]), self.tiles)
        self.row_shape = (column_rows(self.size, self.tiles), self.size, 3)  # a square, a column of tiles, a rect
        self.n_cached = int(meta["n_cached"])
        self.ok_rows = ok
        self.index = np.arange(int(meta["n"]), dtype=np.int64) if index is None else np.asarray(index, np.int64)
        self._mm = None

    # -- opening
    @classmethod
    def open(cls, directory: str | Path, key: str | None = None) -> "ImageCache | None":
        """The cache in `directory` if it is complete and (when given) has this key, else None."""
        d = Path(directory)
        try:
            meta = json.loads((d / META).read_text())
            if meta.get("format") != CACHE_FORMAT or (key is not None and meta.get("key") != key):
                return None
            n_cached, size, tiles = int(meta["n_cached"]), int(meta["size"]), int(meta.get("tiles", 1))
            ok = np.load(d / OK)
            if ok.shape != (n_cached,) or (d / DATA).stat().st_size != n_cached * 3 * size * column_rows(size, tiles):
                return None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return cls(d, meta, ok.astype(bool))

    def subset(self, indices) -> "ImageCache":
        """A view whose item j is this cache's item indices[j] (e.g. the train or validation split)."""
        view = ImageCache(self.dir, self.meta, self.ok_rows, self.index[np.asarray(indices, np.int64)])
        return view

    # -- reading
    def __len__(self) -> int:
        return len(self.index)

    def has(self, i: int) -> bool:
        return bool(self.index[i] < self.n_cached)

    @property
    def ok(self) -> np.ndarray:
        """Per item: True readable, False unreadable (items beyond the cached rows count as readable
        here: they are decoded on the fly)."""
        rows = self.index
        out = np.ones(len(rows), bool)
        inside = rows < self.n_cached
        out[inside] = self.ok_rows[rows[inside]]
        return out

    def _images(self) -> np.ndarray:
        if self._mm is None:
            self._mm = np.memmap(self.dir / DATA, dtype=np.uint8, mode="r",
                                 shape=(self.n_cached, *self.row_shape))
        return self._mm

    def get(self, i: int) -> tuple[torch.Tensor, bool]:
        """(uint8 (3, H, W) tensor at row_shape (channels-last strides), readable?) of item i; requires has(i)."""
        row = int(self.index[i])
        return torch.from_numpy(np.array(self._images()[row])).permute(2, 0, 1), bool(self.ok_rows[row])

    def all_cached(self, items: np.ndarray | None = None) -> bool:
        """Are `items` (default: every item) all in the cached rows? False for none."""
        rows = self.index if items is None else self.index[items]
        return len(rows) > 0 and bool((rows < self.n_cached).all())

    def gather(self, items: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Copy the rows of `items` (all cached) into `out` (len(items), *row_shape) uint8 with one
        numpy take (no per-image Python work; numpy drops the GIL for the copy); -> readable flags."""
        rows = self.index[items]
        np.take(self._images(), rows, axis=0, out=out)
        return self.ok_rows[rows]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_mm"] = None
        return state

    def __repr__(self) -> str:
        return (f"ImageCache({str(self.dir)!r}, {len(self)} items, {self.n_cached} rows cached, "
                f"{int((~self.ok_rows).sum())} unreadable)")


# ----------------------------------------------------------------------------- building
class CacheWriter(Dataset):
    """Decodes item i into row i of the pixel file at `data_path`; yields (i, ok, message).
    Rows are written with pwrite (no page faults in this process: ~5x cheaper than a memmap)."""

    def __init__(self, paths: Sequence[str], geometry: Geometry, data_path: str):
        self.paths, self.geometry, self.data_path = list(paths), _geometry(geometry), str(data_path)
        self._fd = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, bool, str]:
        size, pad_aspect, fill, tiles = self.geometry
        if self._fd is None:
            self._fd = os.open(self.data_path, os.O_WRONLY | getattr(os, "O_BINARY", 0))
        try:
            if tiles == RECT:
                x = load_rect(self.paths[i], size, fill)
            elif tiles > 1:
                x = load_tiles(self.paths[i], size, tiles, fill)
            else:
                x = load_resized(self.paths[i], size, pad_aspect, fill)
            ok, msg = True, ""
        except BadImage as e:
            x, ok, msg = blank_image(size, tiles), False, str(e)
        row = np.ascontiguousarray(x.permute(1, 2, 0).numpy())  # HWC; no copy for channels-last x
        _write_at(self._fd, memoryview(row).cast("B"), i * row.nbytes)
        return i, ok, msg

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fd"] = None
        return state


class BuildStopped(Exception):
    """The build was abandoned: a stop request (SIGTERM), its deadline passed, or no disk room for one image."""


def _write_at(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):
        if hasattr(os, "pwrite"):
            n = os.pwrite(fd, buf, offset)
        else:  # pragma: no cover (Windows)
            os.lseek(fd, offset, os.SEEK_SET)
            n = os.write(fd, buf)
        buf, offset = buf[n:], offset + n


def collate_status(batch: list) -> list:
    return batch


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _allocate(path: Path, nbytes: int) -> None:
    """Reserve the pixel file's blocks up front: a full disk then fails here with a clear
    OSError instead of killing a worker with SIGBUS halfway through writing the memmap."""
    with open(path, "wb") as f:
        if nbytes and hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(f.fileno(), 0, nbytes)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise OSError(e.errno, f"cannot reserve {nbytes / 1e9:.2f} GB for the image cache at {path}: "
                                           f"{e.strerror}") from e
        f.truncate(nbytes)


def _remove_stale_builds(root: Path) -> None:
    """Temporary directories of builds whose process is gone (killed) are removed."""
    for d in root.glob(".*.tmp-*"):
        try:
            pid = int(d.name.rsplit(".tmp-", 1)[1].split("-")[0])
        except (IndexError, ValueError):
            continue
        if pid == os.getpid():
            alive = False  # our own leftover from an interrupted build: nothing is writing it now
        else:
            try:
                os.kill(pid, 0)
                alive = True
            except ProcessLookupError:
                alive = False
            except OSError:
                alive = True
        if not alive:
            shutil.rmtree(d, ignore_errors=True)


def open_cache(paths: Sequence[str], geometry: Geometry, root: str | Path,
               stat_files: bool = True) -> ImageCache | None:
    """The complete cache for exactly these files and geometry under `root`, or None."""
    key = cache_key(paths, geometry, stat_files)
    return ImageCache.open(cache_dir(root, geometry, key), key)


def _rows_that_fit(root: Path, n: int, per: int, max_bytes: int) -> int:
    room = shutil.disk_usage(root).free - FREE_DISK_MARGIN
    if max_bytes:
        room = min(room, max_bytes)
    n_fit = int(max(0, min(n, room // per)))
    if n_fit < n:
        log.warning("image cache: room for %d of %d images (%.1f GB needed, %.1f GB allowed); the other %d "
                    "are decoded every time they are used", n_fit, n, n * per / 1e9, max(room, 0) / 1e9, n - n_fit)
    return n_fit


def _decode_into(writer: CacheWriter, num_workers: int, mp_context: str, batch_size: int, desc: str,
                 stop, deadline: float) -> tuple[np.ndarray, list[str], float]:
    """Decode every image into its row -> (ok per row, messages of the bad ones, steady decode rate)."""
    ok = np.zeros(len(writer), bool)
    bad: list[str] = []
    tv_jpeg_decoder()  # import torchvision's decoder once here; forked workers inherit it
    kwargs = {}
    if num_workers > 0 and mp_context:
        kwargs["multiprocessing_context"] = mp_context
    loader = DataLoader(writer, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_status, worker_init_fn=ignore_in_worker if num_workers else None,
                        **kwargs)
    t_first, n_after = None, 0
    for batch in progress(loader, desc=desc, total=len(loader)):
        if stop is not None and stop.requested:
            raise BuildStopped(f"image cache build stopped by {stop.signal_name}")
        if deadline and clock_now() > deadline:
            raise BuildStopped("image cache build abandoned: it would take more than its share of the budget")
        if t_first is None:
            t_first = clock_now()
        else:
            n_after += len(batch)
        for i, good, msg in batch:
            ok[i] = good
            if not good:
                bad.append(msg)
                if len(bad) <= MAX_LOGGED_BAD:
                    log.warning("unreadable image (kept with ok=0): %s", msg)
    # decode rate after the first batch (worker start-up excluded), for benchmarks and planning
    steady = round(n_after / max(clock_now() - t_first, 1e-9), 1) if t_first else 0.0
    return ok, bad, steady


def _write_index(tmp: Path, ok: np.ndarray, bad: list[str], meta: dict) -> None:
    np.save(tmp / OK, ok)
    (tmp / BAD).write_text("".join(m + "\n" for m in bad))
    (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
    for name in (OK, BAD, META):
        _fsync(tmp / name)
    _fsync(tmp, directory=True)


def _publish(tmp: Path, final: Path, key: str) -> None:
    """Move a finished build into place; a concurrent builder that finished first wins."""
    if final.exists() and ImageCache.open(final, key) is None:
        shutil.rmtree(final)  # an incomplete or foreign directory in the way
    try:
        os.rename(tmp, final)
    except OSError:
        if ImageCache.open(final, key) is None:  # not a concurrent builder that finished first
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync(final.parent, directory=True)


def build_cache(paths: Sequence[str], geometry: Geometry, root: str | Path, *, num_workers: int = 0,
                mp_context: str = "", max_bytes: int = 0, stat_files: bool = True, batch_size: int = 8,
                desc: str = "image cache", stop=None, deadline: float = 0.0) -> ImageCache:
    """Open the cache for `paths` at `geometry` under `root`, building it first if needed.

    geometry: (size, pad_aspect, fill), e.g. `EvalTransform(...).geometry`. max_bytes: upper
    bound on the pixel file (0 = only the free disk space, minus 1 GiB, bounds it). `stop`
    (stopping.StopFlag): when it is raised the build is abandoned with BuildStopped, nothing kept;
    likewise when the wall clock passes `deadline` (clock_now() value; 0 = none), and when the disk
    has no room for a single image (an empty cache is no speed-up).
    """
    t0 = clock_now()
    geometry = _geometry(geometry)
    size = geometry[0]
    key = cache_key(paths, geometry, stat_files)
    final = cache_dir(root, geometry, key)
    found = ImageCache.open(final, key)
    if found is not None:
        log.info("image cache: reusing %s (%d images, %d unreadable)", final, len(found), int((~found.ok_rows).sum()))
        return found
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(root)
    if deadline and clock_now() > deadline:  # checked per batch below too, but 0 rows make 0 batches
        raise BuildStopped("image cache build abandoned: its share of the budget was spent before it began")
    per = 3 * size * column_rows(size, geometry[3])
    n, n_fit = len(paths), _rows_that_fit(root, len(paths), per, max_bytes)
    if n_fit == 0:  # an empty cache would only add a lookup per image
        raise BuildStopped("image cache: no disk room for a single image")
    tmp = root / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        data_path = tmp / DATA
        _allocate(data_path, n_fit * per)
        writer = CacheWriter(list(paths)[:n_fit], geometry, str(data_path))
        ok, bad, steady = _decode_into(writer, num_workers, mp_context, batch_size, desc, stop, deadline)
        writer.close()
        _fsync(data_path)
        _write_index(tmp, ok, bad, {"format": CACHE_FORMAT, "key": key, "n": n, "n_cached": n_fit, "size": size,
                                    "layout": "NHWC", "pad_aspect": geometry[1], "fill": geometry[2],
                                    "tiles": geometry[3],
                                    "decoder": DECODER_VERSION, "bad": len(bad), "build_s": round(clock_now() - t0, 3),
                                    "steady_images_per_s": steady, "created": clock_now()})
        _publish(tmp, final, key)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    cache = ImageCache.open(final, key)
    if cache is None:
        raise RuntimeError(f"image cache at {final} unreadable right after building it")
    dt = clock_now() - t0
    if len(bad) > MAX_LOGGED_BAD:
        log.warning("... and %d more unreadable images, all listed in %s", len(bad) - MAX_LOGGED_BAD, final / BAD)
    log.info("image cache: %d images at %d px in %.1fs (%.0f/s), %d unreadable, %.2f GB in %s",
             n_fit, size, dt, n_fit / max(dt, 1e-9), len(bad), n_fit * per / 1e9, final)
    return cache
