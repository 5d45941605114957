import numpy as np
import pytest

from kernelkit.data.folds import iterative_stratified_folds, load_oof, make_folds, save_oof, stratified_folds


def zipf_targets(n: int, c: int, seed: int = 0, empty_share: float = 0.0) -> np.ndarray:
    """iMet-like multi-label targets: a few common labels, many rare ones, 1-8 labels per image."""
    rng = np.random.default_rng(seed)
    freq = 1.0 / np.arange(1, c + 1) ** 1.1
    per_image = rng.integers(1, 9, n)
    y = np.zeros((n, c), np.uint8)
    y[np.repeat(np.arange(n), per_image), rng.choice(c, per_image.sum(), p=freq / freq.sum())] = 1
    y[rng.random(n) < empty_share] = 0
    return y


def label_counts(y: np.ndarray, folds: np.ndarray, k: int) -> np.ndarray:
    """(C, k) positives of each label in each fold."""
    return np.stack([y[folds == j].sum(0) for j in range(k)], 1)


def deviation(y: np.ndarray, folds: np.ndarray, k: int) -> float:
    """Mean over labels and folds of |positives in the fold - positives/k|: 0 is a perfect split."""
    return float(np.abs(label_counts(y, folds, k) - y.sum(0)[:, None] / k).mean())


def test_iterative_puts_every_image_in_one_fold_and_gives_it_its_share_of_each_label():
    y, k = zipf_targets(10000, 100), 5  # every label on 50+ images, as most iMet labels
    folds = iterative_stratified_folds(y, k, seed=0)
    assert folds.shape == (len(y),) and set(np.unique(folds)) == set(range(k))
    sizes = np.bincount(folds, minlength=k)
    # Sechidis' algorithm balances labels first and sizes only through ties: folds holding many
    # many-label images fill their label quotas sooner and end up smaller.
    assert sizes.sum() == len(y) and sizes.max() - sizes.min() <= 0.06 * len(y) / k
    counts, total = label_counts(y, folds, k), y.sum(0)
    assert (np.abs(counts - total[:, None] / k) < 1).all()  # floor or ceil of count/k, every label


def test_iterative_is_far_closer_to_the_label_distribution_than_a_random_split():
    y, k = zipf_targets(4000, 300), 5  # few images per label: the hard case
    folds = iterative_stratified_folds(y, k, seed=0)
    counts, total = label_counts(y, folds, k), y.sum(0)
    # Not every label exactly: a label's images may all be placed while rarer labels are dealt out.
    assert (np.abs(counts - total[:, None] / k) < 1).mean() > 0.95
    random = np.random.default_rng(0).permutation(len(y)) % k
    assert deviation(y, folds, k) < 0.3 * deviation(y, random, k)


def test_labels_rarer_than_k_rarely_share_a_fold():
    y, k = zipf_targets(2000, 400, seed=3), 5
    folds = iterative_stratified_folds(y, k, seed=1)
    counts, total = label_counts(y, folds, k), y.sum(0)
    rare = (total > 1) & (total <= k)
    shared = (counts[rare] > 1).any(1).mean()
    random = np.random.default_rng(0).permutation(len(y)) % k
    # Not always: two rare labels on one image are placed together. A random split shares ~60%.
    assert shared < 0.05 and (label_counts(y, random, k)[rare] > 1).any(1).mean() > 0.5


def test_images_without_labels_are_spread_and_level_the_fold_sizes():
    # Helsinki: about half the images have no label.
    y, k = zipf_targets(3000, 14, seed=1, empty_share=0.5), 5
    folds = iterative_stratified_folds(y, k, seed=0)
    empty = y.sum(1) == 0
    sizes = np.bincount(folds, minlength=k)
    assert sizes.max() - sizes.min() <= 1
    per_fold = np.bincount(folds[empty], minlength=k)
    assert np.abs(per_fold - empty.sum() / k).max() <= 0.05 * empty.sum() / k
    assert deviation(y, folds, k) < 1


def test_all_images_without_labels_and_a_label_nobody_has():
    folds = iterative_stratified_folds(np.zeros((11, 3), np.uint8), 3, seed=0)
    assert sorted(np.bincount(folds)) == [3, 4, 4]
    y = zipf_targets(200, 6)
    y[:, 2] = 0
    assert np.bincount(iterative_stratified_folds(y, 4, seed=0), minlength=4).min() > 0


def test_folds_are_deterministic_for_a_seed():
    y = zipf_targets(1500, 60, empty_share=0.2)
    a, b = iterative_stratified_folds(y, 5, seed=7), iterative_stratified_folds(y.astype(bool), 5, seed=7)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, iterative_stratified_folds(y, 5, seed=8))
    labels = np.random.default_rng(0).integers(0, 7, 500)
    assert np.array_equal(stratified_folds(labels, 4, 3), stratified_folds(labels, 4, 3))
    assert not np.array_equal(stratified_folds(labels, 4, 3), stratified_folds(labels, 4, 4))


def test_stratified_folds_give_each_fold_floor_or_ceil_of_every_class():
    rng = np.random.default_rng(0)
    labels = rng.choice(9, 1001, p=np.arange(1, 10) / 45)
    k = 5
    folds = stratified_folds(labels, k, seed=0)
    sizes = np.bincount(folds, minlength=k)
    assert sizes.sum() == len(labels) and sizes.max() - sizes.min() <= 1
    for c in range(9):
        per_fold = np.bincount(folds[labels == c], minlength=k)
        total = (labels == c).sum()
        assert per_fold.min() >= total // k and per_fold.max() <= -(-total // k)


def test_make_folds_dispatches_on_shape_and_refuses_bad_k():
    labels = np.arange(20) % 4
    assert np.array_equal(make_folds(labels, 4, 0), stratified_folds(labels, 4, 0))
    y = zipf_targets(100, 8)
    assert np.array_equal(make_folds(y, 3, 0), iterative_stratified_folds(y, 3, 0))
    with pytest.raises(ValueError, match="at least 2"):
        make_folds(labels, 1, 0)
    with pytest.raises(ValueError, match="20 images"):
        make_folds(labels, 21, 0)
    with pytest.raises(ValueError, match="shape"):
        iterative_stratified_folds(labels, 2, 0)


def test_out_of_fold_predictions_round_trip(tmp_path):
    n, c, k = 50, 6, 3
    folds = make_folds(zipf_targets(n, c), k, seed=0)
    probs = np.random.default_rng(0).random((n, c)).astype(np.float32)
    for f in range(k - 1):
        idx = np.flatnonzero(folds == f)
        save_oof(tmp_path, f, idx, probs[idx])
    got, covered = load_oof(tmp_path, n, c)
    assert np.array_equal(covered, folds < k - 1)
    assert np.array_equal(got[covered], probs[covered]) and not got[~covered].any()
    last = np.flatnonzero(folds == k - 1)
    save_oof(tmp_path, k - 1, last, probs[last])
    got, covered = load_oof(tmp_path, n, c)
    assert covered.all() and np.array_equal(got, probs)
    assert not list(tmp_path.glob("*.tmp"))


def test_out_of_fold_files_that_do_not_fit_are_refused(tmp_path):
    save_oof(tmp_path, 0, np.array([0, 1, 2]), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="expected"):
        load_oof(tmp_path, 10, 5)
    with pytest.raises(ValueError, match="outside"):
        load_oof(tmp_path, 2, 4)
    save_oof(tmp_path, 1, np.array([2, 3]), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="already covered"):
        load_oof(tmp_path, 10, 4)
    with pytest.raises(ValueError, match="len"):
        save_oof(tmp_path, 2, np.array([4, 5]), np.zeros((3, 4)))
