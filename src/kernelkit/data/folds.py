"""K-fold splits that keep label frequencies equal across folds, and out-of-fold predictions.

- `iterative_stratified_folds`: multi-label (N, C) 0/1 targets, the iterative stratification of
  Sechidis, Tsoumakas & Vlahavas, "On the Stratification of Multi-Label Data" (ECML PKDD 2011),
  as the iMet 2019 kernels used it. A random split leaves iMet's rare labels (1103 of them, many
  with a handful of images) missing from some folds; this one gives every fold its share of each.
- `stratified_folds`: single-label (N,) class indices.
- `make_folds`: picks one of the two by the targets' shape.
- `save_oof` / `load_oof`: each fold's validation probabilities as .npy files, assembled into one
  (N, C) array for threshold search and ensembling.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..core.fileio import write_npy

log = logging.getLogger("kernelkit")


def _check_k(n: int, k: int) -> None:
    if k < 2:
        raise ValueError(f"k={k}: need at least 2 folds")
    if k > n:
        raise ValueError(f"k={k} folds for {n} images: every fold needs at least one image")


def _rows_to_labels(targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indptr, indices) of the positive labels of each row (CSR), so the work scales with the
    number of labels present (iMet: ~4 per image), not with N x C."""
    rows, cols = np.nonzero(targets)  # row-major order: rows come sorted
    indptr = np.zeros(len(targets) + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=len(targets)), out=indptr[1:])
    return indptr, cols.astype(np.int64)


def _gather(indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels of `rows`, flattened, and for each the position in `rows` it came from."""
    lens = indptr[rows + 1] - indptr[rows]
    owner = np.repeat(np.arange(len(rows)), lens)
    # Offset of each label inside its row: global position minus the start of the row's run.
    within = np.arange(len(owner)) - np.repeat(np.cumsum(lens) - lens, lens)
    return indices[indptr[rows][owner] + within], owner


def _greedy_folds(primary: np.ndarray, secondary: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """Folds for m examples placed one at a time, each in the fold with the largest `primary`
    (ties: largest `secondary`, then random), both dropping by 1 in the chosen fold.

    One fold's keys fall with every pick (primary - t), so the sequential greedy choice is the
    merge of k falling sequences: the m largest of the k*m keys, in falling order. That turns a
    Python loop over every image into one sort per label.
    """
    k = len(primary)
    t = np.arange(m, dtype=np.float64)
    p = (primary[:, None] - t).ravel()
    s = (secondary[:, None] - t).ravel()
    fold = np.repeat(np.arange(k), m)
    order = np.lexsort((rng.random(k * m), s, p))[::-1][:m]
    return fold[order]


def iterative_stratified_folds(targets: np.ndarray, k: int, seed: int) -> np.ndarray:
    """(N,) fold index in [0, k) for multi-label (N, C) 0/1 targets (Sechidis et al. 2011).

    Labels are handled rarest first (fewest images not yet placed): each of that label's images
    goes to the fold that still wants the most of the label, ties to the fold that wants the most
    images, then random. Images with no label at all (half of the Helsinki set) come last and fill
    the folds that are short of images, which spreads them evenly and levels the fold sizes.

    Labels come first, sizes only through ties: a fold that drew many many-label images fills its
    label quotas sooner and ends up smaller (1-5% off n/k on iMet-like targets unless unlabelled
    images level it). Deterministic for a seed; 109k x 1103 iMet-sized targets take about a second.
    """
    targets = np.asarray(targets)
    if targets.ndim != 2:
        raise ValueError(f"targets must be (N, C) 0/1, got shape {targets.shape}")
    n, c = targets.shape
    _check_k(n, k)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)  # the order in which a label's images are dealt out
    indptr, indices = _rows_to_labels(targets[perm])

    folds = np.full(n, -1, np.int64)  # by position in perm
    remaining = np.bincount(indices, minlength=c).astype(np.int64)  # unplaced images per label
    want_label = np.repeat(remaining[:, None] / k, k, axis=1)  # (C, k) desired, Sechidis' c_j^i
    want_size = np.full(k, n / k)  # desired images per fold, c_j
    # Images of each label, in perm order (CSC view), to find a label's unplaced images fast.
    by_label = np.argsort(indices, kind="stable")
    owners = np.repeat(np.arange(n), np.diff(indptr))[by_label]
    starts = np.concatenate([[0], np.cumsum(np.bincount(indices, minlength=c))])
    tiebreak = rng.random(c)

    while True:
        left = np.flatnonzero(remaining > 0)
        if not len(left):
            break
        # Rarest label first; random among equals (drawn once, so the loop stays O(C)).
        label = left[np.lexsort((tiebreak[left], remaining[left]))[0]]
        rows = owners[starts[label]:starts[label + 1]]
        rows = rows[folds[rows] < 0]
        chosen = _greedy_folds(want_label[label], want_size, len(rows), rng)
        folds[rows] = chosen
        labels, owner = _gather(indptr, indices, rows)
        remaining -= np.bincount(labels, minlength=c)
        np.subtract.at(want_label, (labels, chosen[owner]), 1.0)
        want_size -= np.bincount(chosen, minlength=k)

    empty = np.flatnonzero(folds < 0)
    if len(empty):
        folds[empty] = _greedy_folds(want_size, np.zeros(k), len(empty), rng)
    out = np.empty(n, np.int64)
    out[perm] = folds
    return out


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """(N,) fold index for single-label (N,) class indices: each fold gets floor or ceil of
    count/k of every class and the fold sizes differ by at most 1. Deterministic for a seed."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be (N,) class indices, got shape {labels.shape}")
    n = len(labels)
    _check_k(n, k)
    rng = np.random.default_rng(seed)
    # Shuffle, group by class, deal the groups out round-robin: a class is one contiguous run of
    # the deal, so its images land in folds as evenly as possible, and so does the whole deal.
    shuffled = rng.permutation(n)
    dealt = shuffled[np.argsort(labels[shuffled], kind="stable")]
    out = np.empty(n, np.int64)
    out[dealt] = rng.permutation(k)[np.arange(n) % k]  # which fold gets the leftovers is random
    return out


def make_folds(targets: np.ndarray, k: int, seed: int) -> np.ndarray:
    """(N,) fold index: stratified by class for (N,) targets, iterative stratification for (N, C)."""
    targets = np.asarray(targets)
    if targets.ndim == 1:
        return stratified_folds(targets, k, seed)
    return iterative_stratified_folds(targets, k, seed)


def _oof_paths(out_dir: Path, fold: int) -> tuple[Path, Path]:
    return out_dir / f"oof_fold{fold}_idx.npy", out_dir / f"oof_fold{fold}_probs.npy"


def save_oof(out_dir: Path, fold: int, indices: np.ndarray, probs: np.ndarray) -> Path:
    """Save one fold's validation probabilities (rows of `probs` belong to the images at
    `indices` of the full training set) as oof_fold{fold}_idx.npy + oof_fold{fold}_probs.npy.
    -> the probs file."""
    indices, probs = np.asarray(indices, np.int64), np.asarray(probs, np.float32)
    if probs.ndim != 2 or len(probs) != len(indices):
        raise ValueError(f"probs {probs.shape} must be (len(indices)={len(indices)}, C)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    idx_path, probs_path = _oof_paths(out_dir, fold)
    # Probabilities first, indices last: load_oof goes by the index files, so a fold is only
    # seen once both are complete.
    write_npy(probs_path, probs)
    write_npy(idx_path, indices)
    return probs_path


def saved_folds(out_dir: Path, n: int, num_classes: int) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Every fold saved in `out_dir`, checked against the data: (name 'oof_fold<k>', indices, probs)."""
    for idx_path in sorted(Path(out_dir).glob("oof_fold*_idx.npy")):
        probs_path = idx_path.with_name(idx_path.name.replace("_idx.npy", "_probs.npy"))
        idx, p = np.load(idx_path), np.load(probs_path)
        if p.shape != (len(idx), num_classes):
            raise ValueError(f"{probs_path}: shape {p.shape}, expected ({len(idx)}, {num_classes})")
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"{idx_path}: indices outside 0..{n - 1}; saved for another data set?")
        yield idx_path.name.replace("_idx.npy", ""), idx, p


def cover(probs: np.ndarray, covered: np.ndarray, idx: np.ndarray, p: np.ndarray, name: str) -> None:
    """Put one fold's rows into the assembled (n, C) array."""
    if covered[idx].any():
        # Two folds predicting the same image means files from different splits were mixed.
        raise ValueError(f"{name}: {int(covered[idx].sum())} images already covered by another fold")
    probs[idx], covered[idx] = p, True


def load_oof(out_dir: Path, n: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Assemble every saved fold -> (probs (n, C) float32, covered (n,) bool). Rows no fold
    covered are 0 and False in `covered`: search thresholds on probs[covered] only."""
    probs = np.zeros((n, num_classes), np.float32)
    covered = np.zeros(n, bool)
    for name, idx, p in saved_folds(out_dir, n, num_classes):
        cover(probs, covered, idx, p, name)
    log.info("out-of-fold predictions cover %d of %d images", int(covered.sum()), n)
    return probs, covered
