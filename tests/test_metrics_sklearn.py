"""Metrics against scikit-learn on many random cases, and the threshold rules and their searches."""
import json
import warnings

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from kernelkit.decide.labels import apply_thresholds, decode, decode_multilabel
from kernelkit.decide.metrics import (
    accuracy,
    f1_score,
    fbeta_per_image,
    fbeta_score,
    label_accuracy,
    one_hot,
    per_class_report,
    precision_recall_fbeta,
    precision_score,
    recall_score,
    subset_accuracy,
    top_k_error,
)
from kernelkit.decide.thresholds import (
    ThresholdRule,
    default_grid,
    global_scores,
    groups_from_names,
    search_classes,
    search_global,
    search_groups,
    search_label_limits,
    search_threshold,
)


def random_case(seed):
    """Random (truth, pred) of varied shape and density, often with empty rows and columns."""
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(1, 40)), int(rng.integers(2, 12))  # sklearn reads one column as binary
    dt, dp = rng.choice([0.0, 0.05, 0.2, 0.5, 0.9, 1.0], 2)
    truth, pred = rng.random((n, c)) < dt, rng.random((n, c)) < dp
    truth[rng.random(n) < 0.2] = False  # images with no label (half of Helsinki's)
    pred[rng.random(n) < 0.2] = False
    pred[:, rng.random(c) < 0.2] = False  # classes never predicted
    return truth.astype(int), pred.astype(int)


CASES = range(150)


@pytest.mark.parametrize("average", ["micro", "macro", "samples"])
@pytest.mark.parametrize("zero_division", [0.0, 1.0])
def test_precision_recall_fbeta_match_sklearn(average, zero_division):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit zero_division must not warn either
        for seed in CASES:
            truth, pred = random_case(seed)
            for beta in (0.5, 1.0, 2.0):
                ref = skm.precision_recall_fscore_support(truth, pred, beta=beta, average=average,
                                                          zero_division=zero_division)[:3]
                ours = precision_recall_fbeta(truth, pred, beta, average, zero_division)
                assert ours == pytest.approx(ref, abs=1e-12), (seed, beta)
            assert f1_score(truth, pred, average, zero_division) == pytest.approx(
                skm.f1_score(truth, pred, average=average, zero_division=zero_division), abs=1e-12)
            assert precision_score(truth, pred, average, zero_division) == pytest.approx(
                skm.precision_score(truth, pred, average=average, zero_division=zero_division), abs=1e-12)
            assert recall_score(truth, pred, average, zero_division) == pytest.approx(
                skm.recall_score(truth, pred, average=average, zero_division=zero_division), abs=1e-12)


def test_fbeta_per_image_is_sklearn_samples_average_with_zero_division_1():
    for seed in CASES:
        truth, pred = random_case(seed)
        for beta in (1.0, 2.0):
            ref = skm.fbeta_score(truth, pred, beta=beta, average="samples", zero_division=1)
            assert fbeta_per_image(truth, pred, beta) == pytest.approx(ref, abs=1e-12)
            assert fbeta_score(truth, pred, beta, "samples") == pytest.approx(ref, abs=1e-12)


def test_zero_division_convention_by_hand():
    truth = np.array([[0, 0], [1, 0], [0, 0]])
    pred = np.array([[0, 0], [0, 0], [1, 0]])
    # image 0: nothing true, nothing predicted -> P = R = F = 1 (iMet's F2 scores it 1);
    # image 1: a missed label -> P = 1 (0/0), R = 0, F = 0; image 2: a false positive -> P = 0, R = 1, F = 0.
    assert precision_recall_fbeta(truth, pred, 2.0, "samples") == pytest.approx((2 / 3, 2 / 3, 1 / 3))
    assert fbeta_per_image(truth, pred) == pytest.approx(1 / 3)
    # class 1 is empty in truth and prediction: it scores 1 in the macro average.
    assert f1_score(truth, pred, "macro") == pytest.approx(0.5)
    assert f1_score(truth, pred, "macro", zero_division=0.0) == 0.0
    assert f1_score(np.zeros((2, 2)), np.zeros((2, 2)), "micro") == 1.0


def test_accuracies_and_per_class_report_match_sklearn():
    for seed in CASES:
        truth, pred = random_case(seed)
        assert subset_accuracy(truth, pred) == pytest.approx(skm.accuracy_score(truth, pred))
        assert label_accuracy(truth, pred) == pytest.approx(1 - skm.hamming_loss(truth, pred))
        rep = per_class_report(truth, pred, beta=2.0)
        p, r, f, support = skm.precision_recall_fscore_support(truth, pred, beta=2.0, average=None, zero_division=1)
        np.testing.assert_allclose(rep["precision"], p)
        np.testing.assert_allclose(rep["recall"], r)
        np.testing.assert_allclose(rep["fbeta"], f)
        np.testing.assert_array_equal(rep["support"], support)
        np.testing.assert_array_equal(rep["errors"], (truth != pred).sum(0))


def test_single_label_metrics_match_sklearn():
    for seed in range(60):
        rng = np.random.default_rng(seed)
        n, c = int(rng.integers(1, 50)), int(rng.integers(3, 15))
        labels, probs = rng.integers(0, c, n), rng.dirichlet(np.ones(c), n)
        assert accuracy(labels, probs) == pytest.approx(skm.accuracy_score(labels, probs.argmax(1)))
        for k in (1, 2, c - 1):  # k >= C is meaningless (sklearn warns)
            ref = skm.top_k_accuracy_score(labels, probs, k=k, labels=np.arange(c))
            assert top_k_error(labels, probs, k) == pytest.approx(1 - ref)
        # single-label data through one_hot: macro over all C classes = sklearn with labels=range(C)
        t, p = one_hot(labels, c), one_hot(probs.argmax(1), c)
        for average in ("micro", "macro"):
            ref = skm.f1_score(labels, probs.argmax(1), average=average, labels=np.arange(c), zero_division=1)
            assert f1_score(t, p, average) == pytest.approx(ref)


def test_metric_input_errors():
    with pytest.raises(ValueError, match="shape"):
        f1_score(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="average"):
        f1_score(np.zeros((3, 2)), np.zeros((3, 2)), "weighted")
    assert precision_recall_fbeta(np.zeros((0, 3)), np.zeros((0, 3)), average="samples") == (0.0, 0.0, 0.0)


# ----------------------------------------------------------------------------- threshold rules

def separable(seed, n=300, c=8, thresholds=None, gap=0.04):
    """Truth and probs where class c is positive exactly when probs > thresholds[c] (with a gap)."""
    rng = np.random.default_rng(seed)
    thr = np.full(c, 0.4) if thresholds is None else np.asarray(thresholds)
    truth = rng.random((n, c)) < 0.3
    lo, hi = rng.uniform(0, thr - gap, (n, c)), rng.uniform(thr + gap, 1.0, (n, c))
    return truth, np.where(truth, hi, lo)


def separates(truth, probs, t):
    """True when threshold t puts every negative of these columns at or below it, every positive above."""
    return probs[~truth].max() <= t < probs[truth].min()


def noisy(seed, n=400, c=12):
    rng = np.random.default_rng(seed)
    truth = rng.random((n, c)) < rng.uniform(0.05, 0.5, c)
    probs = 1 / (1 + np.exp(-(rng.normal(0, 1.5, (n, c)) + np.where(truth, 1.5, -1.5) + rng.normal(0, 1, c))))
    return truth, probs


def old_search_threshold(truth, probs, beta=2.0, min_labels=0, grid=None):
    """The loop search_threshold used to be, as a reference for the vectorised one."""
    grid = np.round(np.arange(0.02, 0.96, 0.01), 2) if grid is None else grid
    best_t, best_s = 0.5, -1.0
    for t in grid:
        s = fbeta_per_image(truth, decode_multilabel(probs, float(t), min_labels), beta)
        if s > best_s:
            best_t, best_s = float(t), s
    return best_t, best_s


def test_vectorised_global_scores_equal_decoding_each_threshold():
    grid = default_grid()
    for seed in range(4):
        truth, probs = noisy(seed)
        for mn, mx in [(0, 0), (1, 0), (0, 2), (1, 3), (2, 2)]:
            fast = global_scores(truth, probs, grid, 2.0, mn, mx, chunk=97)  # several chunks
            slow = [fbeta_per_image(truth, apply_thresholds(probs, t, mn, mx)) for t in grid]
            np.testing.assert_allclose(fast, slow, atol=1e-12)
        for mn in (0, 1):
            t, s = search_threshold(truth, probs, 2.0, mn)
            t0, s0 = old_search_threshold(truth, probs, 2.0, mn)
            assert t == t0 and s == pytest.approx(s0, abs=1e-12)


def test_global_search_recovers_a_separating_threshold():
    truth, probs = separable(0, thresholds=[0.4] * 8)
    rule, s = search_global(truth, probs, show_progress=True)
    assert rule.kind == "global" and 0.36 <= rule.values[0] < 0.44 and s == pytest.approx(1.0)
    assert rule.score(truth, probs) == pytest.approx(s)


def test_group_search_recovers_one_threshold_per_group_and_beats_global():
    names = [f"culture::{i}" for i in range(5)] + [f"tag::{i}" for i in range(7)]
    groups = groups_from_names(names)
    assert groups == ["culture"] * 5 + ["tag"] * 7
    truth, probs = separable(1, c=12, thresholds=[0.25] * 5 + [0.7] * 7)
    g_rule, g_score = search_global(truth, probs)
    rule, s = search_groups(truth, probs, groups)
    assert g_score < 0.99 and s == pytest.approx(1.0)
    assert rule.group_names == ["culture", "tag"]
    assert separates(truth[:, :5], probs[:, :5], rule.values[0]) and abs(rule.values[0] - 0.25) < 0.04
    assert separates(truth[:, 5:], probs[:, 5:], rule.values[1]) and abs(rule.values[1] - 0.7) < 0.04
    assert rule.score(truth, probs) == pytest.approx(s)


def test_class_search_recovers_per_class_thresholds():
    thr = np.array([0.15, 0.3, 0.45, 0.6, 0.75, 0.85])
    truth, probs = separable(2, n=500, c=6, thresholds=thr)
    rule, s = search_classes(truth, probs)
    assert rule.kind == "class" and s == pytest.approx(1.0)
    assert all(separates(truth[:, j], probs[:, j], t) for j, t in enumerate(rule.values))
    assert np.all(np.abs(np.array(rule.values) - thr) <= 0.05 + 1e-9)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mn,mx", [(0, 0), (1, 0), (1, 3)])
def test_finer_rules_never_score_below_coarser_ones(seed, mn, mx):
    truth, probs = noisy(seed)
    groups = ["a" if i % 3 else "b" for i in range(truth.shape[1])]
    g_rule, g = search_global(truth, probs, min_labels=mn, max_labels=mx)
    gr_rule, gr = search_groups(truth, probs, groups, min_labels=mn, max_labels=mx)
    c_rule, cl = search_classes(truth, probs, min_labels=mn, max_labels=mx, start=g_rule)
    assert gr >= g - 1e-12 and cl >= g - 1e-12
    for rule, score in ((g_rule, g), (gr_rule, gr), (c_rule, cl)):  # reported scores are exact
        assert (rule.min_labels, rule.max_labels) == (mn, mx)
        assert rule.score(truth, probs) == pytest.approx(score, abs=1e-12)


def test_class_search_leaves_rare_classes_at_the_start_threshold():
    truth, probs = noisy(5)
    truth[:, 0] = False
    truth[:2, 0] = True  # two positives only
    start, _ = search_global(truth, probs)
    rule, _ = search_classes(truth, probs, start=start, min_positives=3)
    assert rule.values[0] == start.values[0]


def test_max_and_min_labels_bound_each_images_count_and_keep_the_most_probable():
    rng = np.random.default_rng(0)
    probs = rng.random((50, 10))
    rule = ThresholdRule("class", rng.uniform(0.2, 0.6, 10).tolist(), min_labels=1, max_labels=3)
    pred = rule.apply(probs)
    counts = pred.sum(1)
    assert counts.min() >= 1 and counts.max() <= 3
    uncapped = probs > np.array(rule.values)
    assert (counts == np.clip(uncapped.sum(1), 1, 3)).all()
    for p, row, free in zip(probs, pred, uncapped):
        if free.sum() > 3:  # the kept labels are the most probable of those above threshold
            assert row[free].sum() == 3 and p[row].min() >= p[free & ~row].max()
        if free.sum() == 0:
            assert row[p.argmax()]
    with pytest.raises(ValueError, match="min_labels"):
        ThresholdRule(min_labels=3, max_labels=2)
    with pytest.raises(ValueError, match="min_labels"):
        apply_thresholds(probs, 0.5, 3, 2)


def test_label_limit_search_finds_one_label_per_image():
    rng = np.random.default_rng(3)
    n, c = 300, 10
    labels = rng.integers(0, c, n)
    truth = one_hot(labels, c)
    probs = np.clip(rng.uniform(0, 0.6, (n, c)) + 0.35 * truth, 0, 1)  # one true label, noisy others
    start, s0 = search_global(truth, probs)
    rule, s = search_label_limits(truth, probs, start)
    assert s > s0 and (rule.min_labels, rule.max_labels) == (1, 1)
    assert rule.values == start.values and rule.score(truth, probs) == pytest.approx(s)


def test_rule_round_trips_through_a_weights_only_checkpoint(tmp_path):
    truth, probs = noisy(0)
    groups = groups_from_names([f"{'culture' if i < 4 else 'tag'}::{i}" for i in range(truth.shape[1])])
    rules = [search_global(truth, probs, min_labels=1)[0], search_groups(truth, probs, groups, max_labels=4)[0],
             search_classes(truth, probs)[0]]
    for rule in rules:
        d = rule.to_dict()
        assert json.loads(json.dumps(d)) == d  # plain types only
        torch.save({"threshold_rule": d}, tmp_path / "ckpt.pt")
        loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)["threshold_rule"]
        back = ThresholdRule.from_dict(loaded)
        assert back == rule and (back.apply(probs) == rule.apply(probs)).all()
    # numpy scalars from a search are stored as Python floats
    assert all(type(v) is float for v in ThresholdRule("class", list(np.float32([0.1, 0.2]))).values)
    with pytest.raises(ValueError, match="unknown threshold rule fields"):
        ThresholdRule.from_dict({"kind": "global", "values": [0.5], "colour": 1})


def test_rule_validation_and_decode_with_a_rule():
    with pytest.raises(ValueError, match="kind"):
        ThresholdRule("per-image", [0.5])
    with pytest.raises(ValueError, match="one value"):
        ThresholdRule("global", [0.1, 0.2])
    with pytest.raises(ValueError, match="groups"):
        ThresholdRule("group", [0.1])
    with pytest.raises(ValueError, match="without a threshold"):
        ThresholdRule("group", [0.1], groups=["a", "b"], group_names=["a"])
    with pytest.raises(ValueError, match="3 class thresholds"):
        ThresholdRule("class", [0.1, 0.2, 0.3]).apply(np.zeros((2, 4)))
    probs = np.array([[0.1, 0.2, 0.05], [0.9, 0.8, 0.1]])
    rule = ThresholdRule("group", [0.15, 0.85], groups=["a", "b", "a"], group_names=["a", "b"])
    np.testing.assert_allclose(rule.thresholds(3), [0.15, 0.85, 0.15])
    assert decode("multilabel", probs, rule=rule) == [[], [0]]
    assert decode("multilabel", probs, rule=ThresholdRule(min_labels=1)) == [[1], [0, 1]]
    assert groups_from_names(["culture::a", "plain", "tag::b::c"]) == ["culture", "other", "tag"]
