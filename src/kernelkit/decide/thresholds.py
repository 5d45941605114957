"""Multi-label decision rules and their search on validation probabilities.

A `ThresholdRule` turns (N, C) probabilities into (N, C) booleans: a threshold that is global,
one per group of classes (iMet's 'culture::' vs 'tag::' labels) or one per class, then at least
`min_labels` and (when > 0) at most `max_labels` labels per image. `to_dict()` holds plain Python
types only, so the rule can sit inside a checkpoint read with torch.load(weights_only=True).

The searches maximise F-beta averaged per image (iMet's metric; `beta`). F-beta per image does not
split into a sum over classes, so group and class thresholds are found by coordinate ascent: one
group's (or class's) threshold is swept over the grid while the others stay fixed. Each sweep is
vectorised: a histogram over the grid counts, per image, the labels (and true labels) that a
threshold keeps, so a sweep costs O(N C + N G) rather than G decodings.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Iterable, Iterator, Sequence

import numpy as np

from ..core.progress import progress
from .labels import apply_thresholds, limit_labels, order_and_ranks
from .metrics import fbeta_per_image

KINDS = ("global", "group", "class")
CHUNK_CELLS = 2 ** 22  # probabilities scored at a time: int64 grid indices of ~32 MB


def default_grid() -> np.ndarray:
    """0.02, 0.03, ..., 0.95: the grid `metrics.search_threshold` always used."""
    return np.round(np.arange(0.02, 0.96, 0.01), 2)


@dataclass
class ThresholdRule:
    """How to decode multi-label probabilities.

    kind 'global': values = [t]. kind 'group': values[i] is the threshold of group_names[i], and
    groups[c] names the group of class c. kind 'class': values[c] for class c.
    max_labels = 0 means no cap.
    """
    kind: str = "global"
    values: list[float] = field(default_factory=lambda: [0.5])
    min_labels: int = 0
    max_labels: int = 0
    groups: list[str] | None = None
    group_names: list[str] | None = None

    def __post_init__(self) -> None:
        # Plain types, whatever came in (numpy floats would not load under weights_only=True).
        self.values = [float(v) for v in self.values]
        self.min_labels, self.max_labels = int(self.min_labels), int(self.max_labels)
        if self.groups is not None:
            self.groups = [str(g) for g in self.groups]
        if self.group_names is not None:
            self.group_names = [str(g) for g in self.group_names]
        if self.kind not in KINDS:
            raise ValueError(f"unknown threshold kind {self.kind!r}; choose from {KINDS}")
        if self.min_labels < 0 or self.max_labels < 0:
            raise ValueError("min_labels and max_labels must be >= 0")
        if self.max_labels and self.min_labels > self.max_labels:
            raise ValueError(f"min_labels ({self.min_labels}) > max_labels ({self.max_labels})")
        if self.kind == "global" and len(self.values) != 1:
            raise ValueError(f"a global rule has one value, got {len(self.values)}")
        if self.kind == "group":
            if self.groups is None or self.group_names is None or len(self.group_names) != len(self.values):
                raise ValueError("a group rule needs groups (one per class) and group_names (one per value)")
            missing = set(self.groups) - set(self.group_names)
            if missing:
                raise ValueError(f"groups without a threshold: {sorted(missing)}")

    def thresholds(self, num_classes: int) -> np.ndarray:
        """(C,) threshold of each class."""
        if self.kind == "global":
            return np.full(num_classes, self.values[0])
        if self.kind == "group":
            if len(self.groups) != num_classes:
                raise ValueError(f"rule has groups for {len(self.groups)} classes, probabilities have {num_classes}")
            by_name = dict(zip(self.group_names, self.values))
            return np.array([by_name[g] for g in self.groups])
        if len(self.values) != num_classes:
            raise ValueError(f"rule has {len(self.values)} class thresholds, probabilities have {num_classes}")
        return np.array(self.values)

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """(N, C) probabilities -> (N, C) bool predictions."""
        return apply_thresholds(probs, self.thresholds(probs.shape[1]), self.min_labels, self.max_labels)

    def score(self, truth: np.ndarray, probs: np.ndarray, beta: float = 2.0) -> float:
        """F-beta per image of this rule's predictions."""
        return fbeta_per_image(truth, self.apply(probs), beta)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "values": list(self.values), "min_labels": self.min_labels,
                "max_labels": self.max_labels, "groups": None if self.groups is None else list(self.groups),
                "group_names": None if self.group_names is None else list(self.group_names)}

    @classmethod
    def from_dict(cls, d: dict) -> "ThresholdRule":
        unknown = set(d) - {"kind", "values", "min_labels", "max_labels", "groups", "group_names"}
        if unknown:
            raise ValueError(f"unknown threshold rule fields {sorted(unknown)}")
        return cls(**d)


def groups_from_names(names: Iterable[str], sep: str = "::", default: str = "other") -> list[str]:
    """Group of each class from its name's prefix: 'culture::japan' -> 'culture', 'tag::men' -> 'tag';
    names without `sep` go to `default`."""
    return [n.split(sep, 1)[0] if sep in n else default for n in names]


# ------------------------------------------------------------------------------- vectorised scoring


def _fbeta(tp: np.ndarray, n_pred: np.ndarray, n_true: np.ndarray, b2: float) -> np.ndarray:
    """Per-image F-beta from counts; an image with no true and no predicted label scores 1."""
    denom = b2 * n_true + n_pred
    return np.where(denom > 0, (1 + b2) * tp / np.maximum(denom, 1e-12), 1.0)


def _above(idx: np.ndarray, n_grid: int, weights: np.ndarray | None = None) -> np.ndarray:
    """(N, G): per image and grid point j, the (weighted) number of entries with idx > j.

    idx[n, c] = how many grid values lie below probs[n, c], so class c is predicted at grid[j]
    exactly when j < idx[n, c]. A per-image histogram of idx, summed from the right, counts them.
    """
    n = idx.shape[0]
    flat = (np.arange(n)[:, None] * (n_grid + 1) + idx).ravel()
    w = None if weights is None else weights.ravel().astype(np.float64)
    hist = np.bincount(flat, weights=w, minlength=n * (n_grid + 1)).reshape(n, n_grid + 1)
    return np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:]


def _force_top(probs: np.ndarray, min_labels: int) -> np.ndarray:
    """Probs with each image's top `min_labels` set to +inf: above every threshold, so thresholding
    these is exactly thresholding plus min_labels, and the sweeps handle min_labels for free."""
    if min_labels <= 0:
        return probs
    _, ranks = order_and_ranks(probs)
    return np.where(ranks < min_labels, np.inf, probs)


def _prepare(truth: np.ndarray, probs: np.ndarray, grid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    truth, probs = np.asarray(truth).astype(bool), np.asarray(probs, dtype=np.float64)
    nan = np.isnan(probs)
    if nan.any():  # NaN is below every threshold, as `labels.apply_thresholds` decodes it (NaN > t is
        # False): the searched score is then the score of what the submission will say
        probs = np.where(nan, -np.inf, probs)
    if truth.shape != probs.shape or truth.ndim != 2:
        raise ValueError(f"truth {truth.shape} and probs {probs.shape} must be the same (N, C) shape")
    grid = np.unique(np.asarray(default_grid() if grid is None else grid, dtype=np.float64))  # sorted
    if not len(grid):
        raise ValueError("empty threshold grid")
    return truth, probs, grid


def _pick(scores: np.ndarray, grid: np.ndarray, current_score: float, current_t: float, tol: float) -> float | None:
    """Grid value to move to, or None to stay: only a strict gain counts, and among (near) ties the
    value nearest the current one wins, so plateaus do not make thresholds wander."""
    best = scores.max()
    if best <= current_score + tol:
        return None
    near_best = np.flatnonzero(scores >= best - tol)
    return float(grid[near_best[np.argmin(np.abs(grid[near_best] - current_t))]])


def _image_scores(truth: np.ndarray, probs: np.ndarray, grid: np.ndarray, beta: float, min_labels: int,
                  max_labels: int, show_progress: bool, chunk: int) -> Iterator[np.ndarray]:
    """(rows, G) F-beta of each image at each threshold of the sorted `grid`, `chunk` images at a time
    (chunk x C grid indices, chunk x G scores); 0 = as many rows as make CHUNK_CELLS cells, so 15,000
    classes get smaller chunks."""
    b2 = beta * beta
    chunk = chunk or max(1, min(4096, CHUNK_CELLS // max(probs.shape[1], 1)))
    starts = range(0, len(probs), chunk)
    if show_progress:
        starts = progress(starts, desc="threshold", total=len(starts))
    for s in starts:
        y, p = truth[s:s + chunk], probs[s:s + chunk]
        n_true = y.sum(1)[:, None]
        if max_labels > 0:
            # A global threshold keeps each image's top k; min/max labels make it the top clip(k).
            k = _above(np.searchsorted(grid, p, side="left"), len(grid))
            k = np.clip(k, min_labels, max_labels).astype(np.int64)
            order, _ = order_and_ranks(p)
            cum_tp = np.concatenate([np.zeros((len(p), 1)), np.cumsum(np.take_along_axis(y, order, 1), 1)], 1)
            tp = np.take_along_axis(cum_tp, k, axis=1)
        else:
            idx = np.searchsorted(grid, _force_top(p, min_labels), side="left")
            k, tp = _above(idx, len(grid)), _above(idx, len(grid), y)
        yield _fbeta(tp, k, n_true, b2)


def global_scores(truth: np.ndarray, probs: np.ndarray, grid: np.ndarray, beta: float = 2.0, min_labels: int = 0,
                  max_labels: int = 0, show_progress: bool = False, chunk: int = 0) -> np.ndarray:
    """(G,) F-beta per image for each threshold of the sorted `grid`, min/max labels included exactly."""
    total = np.zeros(len(grid))
    for f in _image_scores(truth, probs, grid, beta, min_labels, max_labels, show_progress, chunk):
        total += f.sum(0)
    return total / max(len(probs), 1)


# ------------------------------------------------------------------------------- searches


def threshold_curve(truth: np.ndarray, probs: np.ndarray, beta: float = 2.0, grid: np.ndarray | None = None,
                    min_labels: int = 0, max_labels: int = 0,
                    show_progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """-> (sorted grid, F-beta per image at each of its thresholds), min/max labels included."""
    truth, probs, grid = _prepare(truth, probs, grid)
    return grid, global_scores(truth, probs, grid, beta, min_labels, max_labels, show_progress)


def gaps_to_best(truth: np.ndarray, probs: np.ndarray, beta: float = 2.0, min_labels: int = 0, max_labels: int = 0,
                 chunk: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`threshold_curve`, and how far each of its thresholds falls behind the best one, image by image
    -> (sorted grid, (G,) scores, (G,) mean gap, (G,) its standard error); the inputs prepared once.
    Paired: two thresholds that decode all but one image alike differ by that image only, which the
    spread of the two scores over all images would drown."""
    truth, probs, grid = _prepare(truth, probs, None)
    scores = global_scores(truth, probs, grid, beta, min_labels, max_labels, chunk=chunk)
    best = int(np.argmax(scores))
    total, squares = np.zeros(len(grid)), np.zeros(len(grid))
    for f in _image_scores(truth, probs, grid, beta, min_labels, max_labels, False, chunk):
        d = f[:, best:best + 1] - f
        total += d.sum(0)
        squares += (d * d).sum(0)
    n = max(len(probs), 1)
    mean = total / n
    return grid, scores, mean, np.sqrt(np.maximum(squares / n - mean * mean, 0.0) / n)


def search_global(truth: np.ndarray, probs: np.ndarray, beta: float = 2.0, grid: np.ndarray | None = None,
                  min_labels: int = 0, max_labels: int = 0,
                  show_progress: bool = False) -> tuple[ThresholdRule, float]:
    """Best single threshold on the grid -> (rule, F-beta per image). Ties go to the lowest threshold."""
    grid, scores = threshold_curve(truth, probs, beta, grid, min_labels, max_labels, show_progress)
    j = int(np.argmax(scores))
    return ThresholdRule("global", [float(grid[j])], min_labels, max_labels), float(scores[j])


def _state(truth: np.ndarray, forced: np.ndarray, thr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pred = forced > thr
    return pred, pred.sum(1), (pred & truth).sum(1)


def _finish(rule: ThresholdRule, fallback: ThresholdRule, truth: np.ndarray, probs: np.ndarray,
            beta: float) -> tuple[ThresholdRule, float]:
    """Exact score of the found rule. The sweeps ignore max_labels, so with a cap keep whichever of
    the found rule and its start scores higher; without one the ascent never loses to its start."""
    s_rule = rule.score(truth, probs, beta)
    if rule.max_labels <= 0:
        return rule, s_rule
    s_fallback = fallback.score(truth, probs, beta)
    return (rule, s_rule) if s_rule >= s_fallback else (fallback, s_fallback)


def search_groups(truth: np.ndarray, probs: np.ndarray, groups: Sequence[Hashable], beta: float = 2.0,
                  grid: np.ndarray | None = None, min_labels: int = 0, max_labels: int = 0,
                  start: float | None = None, rounds: int = 3) -> tuple[ThresholdRule, float]:
    """One threshold per group of classes (groups[c] = group of class c) -> (rule, F-beta per image).

    Coordinate ascent from the best global threshold (or `start`): each round sweeps every group's
    threshold over the grid with the other groups fixed, until a round changes nothing. Starting
    from the global optimum, the result scores at least as well as the global rule.
    """
    truth, probs, grid = _prepare(truth, probs, grid)
    if len(groups) != probs.shape[1]:
        raise ValueError(f"{len(groups)} groups for {probs.shape[1]} classes")
    names = list(dict.fromkeys(str(g) for g in groups))
    gidx = np.array([names.index(str(g)) for g in groups])
    if start is None:
        start = search_global(truth, probs, beta, grid, min_labels, max_labels)[0].values[0]
    values = [float(start)] * len(names)
    b2, n_true = beta * beta, truth.sum(1)
    forced = _force_top(probs, min_labels)
    pred, k, tp = _state(truth, forced, np.array(values)[gidx])
    current = float(_fbeta(tp, k, n_true, b2).mean())
    for _ in range(rounds):
        moved = False
        for g in range(len(names)):
            cols = gidx == g
            k_o, tp_o = k - pred[:, cols].sum(1), tp - (pred[:, cols] & truth[:, cols]).sum(1)
            idx = np.searchsorted(grid, forced[:, cols], side="left")
            kg, tpg = _above(idx, len(grid)), _above(idx, len(grid), truth[:, cols])
            scores = _fbeta(tp_o[:, None] + tpg, k_o[:, None] + kg, n_true[:, None], b2).mean(0)
            t = _pick(scores, grid, current, values[g], 1e-12)
            if t is None:
                continue
            values[g], current, moved = t, float(scores[np.searchsorted(grid, t)]), True
            pred, k, tp = _state(truth, forced, np.array(values)[gidx])
        if not moved:
            break
    group_list = [str(g) for g in groups]
    rule = ThresholdRule("group", values, min_labels, max_labels, groups=group_list, group_names=names)
    fallback = ThresholdRule("group", [float(start)] * len(names), min_labels, max_labels, groups=group_list,
                             group_names=names)
    return _finish(rule, fallback, truth, probs, beta)


def search_classes(truth: np.ndarray, probs: np.ndarray, beta: float = 2.0, grid: np.ndarray | None = None,
                   min_labels: int = 0, max_labels: int = 0, start: ThresholdRule | None = None,
                   rounds: int = 2, min_positives: int = 3,
                   show_progress: bool = False) -> tuple[ThresholdRule, float]:
    """One threshold per class -> (rule, F-beta per image).

    Coordinate ascent from `start` (default: the best global rule): each class's threshold is
    swept with all others fixed; only the images' scores with that class on vs off are needed,
    so a sweep is O(N + G). Classes with fewer than `min_positives` positives in `truth` keep
    their start threshold: a threshold fitted to one or two examples is noise on the test set.
    """
    truth, probs, grid = _prepare(truth, probs, grid)
    n, c = probs.shape
    if start is None:
        start = search_global(truth, probs, beta, grid, min_labels, max_labels)[0]
    thr = start.thresholds(c).astype(np.float64)
    b2, n_true = beta * beta, truth.sum(1)
    forced = _force_top(probs, min_labels)
    pred, k, tp = _state(truth, forced, thr)
    tunable = np.flatnonzero(truth.sum(0) >= max(min_positives, 0))
    tol = 1e-12 * max(n, 1)
    for r in range(rounds):
        moved = False
        cols = tunable
        if show_progress:
                cols = progress(tunable, desc=f"class thresholds {r + 1}/{rounds}", total=len(tunable))
        for j in cols:
            on, yc = pred[:, j], truth[:, j]
            k_o, tp_o = k - on, tp - (on & yc)
            f_on, f_off = _fbeta(tp_o + yc, k_o + 1, n_true, b2), _fbeta(tp_o, k_o, n_true, b2)
            idx = np.searchsorted(grid, forced[:, j], side="left")
            gain = np.bincount(idx, weights=f_on - f_off, minlength=len(grid) + 1)
            scores = f_off.sum() + np.cumsum(gain[::-1])[::-1][1:]  # totals, not means: cheaper
            current = f_off.sum() + (f_on - f_off)[on].sum()
            t = _pick(scores, grid, current, thr[j], tol)
            if t is None:
                continue
            thr[j], moved = t, True
            new_on = forced[:, j] > t
            k, tp = k_o + new_on, tp_o + (new_on & yc)
            pred[:, j] = new_on
        if not moved:
            break
    rule = ThresholdRule("class", thr.tolist(), min_labels, max_labels)
    fallback = ThresholdRule("class", start.thresholds(c).tolist(), min_labels, max_labels)
    return _finish(rule, fallback, truth, probs, beta)


def search_label_limits(truth: np.ndarray, probs: np.ndarray, rule: ThresholdRule, beta: float = 2.0,
                        min_choices: Sequence[int] = (0, 1, 2, 3),
                        max_choices: Sequence[int] = (0, 1, 2, 3, 4, 5, 6, 8, 10, 15, 20)) -> tuple[ThresholdRule, float]:
    """Best (min_labels, max_labels) for `rule`'s thresholds -> (rule with them, F-beta per image).

    Every pair with min <= max (max 0: no cap) is scored exactly; the probabilities are sorted
    once. Ties keep the smaller min and the larger cap (the less forcing rule).
    """
    truth, probs, _ = _prepare(truth, probs, None)
    base = probs > rule.thresholds(probs.shape[1])
    order, ranks = order_and_ranks(probs)
    best: tuple[float, int, int] | None = None
    # Loosest first, so that on ties the first (least forcing) pair stays: no cap (0), then
    # falling caps; within a cap, rising min.
    for mx in sorted(set(max_choices), key=lambda m: -m if m > 0 else -np.inf):
        for mn in sorted(set(min_choices)):
            if mx > 0 and mn > mx:
                continue
            s = fbeta_per_image(truth, limit_labels(base, order, ranks, mn, mx), beta)
            if best is None or s > best[0] + 1e-12:
                best = (s, mn, mx)
    s, mn, mx = best
    d = rule.to_dict()
    d.update(min_labels=mn, max_labels=mx)
    return ThresholdRule.from_dict(d), s


def search_threshold(truth: np.ndarray, probs: np.ndarray, beta: float = 2.0, min_labels: int = 0,
                     grid: np.ndarray | None = None) -> tuple[float, float]:
    """Best single global threshold on validation probabilities -> (threshold, score).

    Ties go to the lowest threshold.
    """
    rule, score = search_global(truth, probs, beta, grid, min_labels)
    return rule.values[0], score


def prior_baseline(task: str, train_targets: np.ndarray, val_targets: np.ndarray, beta: float = 2.0) -> float:
    """Score of the best constant prediction from training label frequencies: the bar to beat."""
    if task == "multiclass":
        majority = np.bincount(train_targets).argmax() if len(train_targets) else 0
        return float((val_targets == majority).mean()) if len(val_targets) else 0.0
    freq = train_targets.mean(0)
    probs = np.broadcast_to(freq, val_targets.shape)
    return search_threshold(val_targets, probs, beta, grid=np.unique(np.concatenate([[0.0], freq])))[1]
