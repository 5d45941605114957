import numpy as np
import pytest

from kernelkit.decide.labels import decode, decode_multilabel
from kernelkit.decide.metrics import accuracy, fbeta_per_image, top_k_error
from kernelkit.decide.thresholds import prior_baseline, search_threshold


def test_fbeta_per_image_by_hand():
    truth = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]])
    pred = np.array([[1, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]])
    # image 0: tp=1, p=2, t=2 -> 5*1/(4*2+2) = 0.5; image 1: 1; image 2 (both empty): 1; 3, 4: 0
    assert fbeta_per_image(truth, pred, 2.0) == pytest.approx((0.5 + 1 + 1 + 0 + 0) / 5)
    assert fbeta_per_image(truth, pred, 1.0) == pytest.approx((0.5 + 1 + 1) / 5)


def test_threshold_search_finds_the_separating_threshold():
    rng = np.random.default_rng(0)
    truth = rng.random((200, 6)) < 0.3
    probs = np.where(truth, rng.uniform(0.62, 1, truth.shape), rng.uniform(0, 0.58, truth.shape))
    t, s = search_threshold(truth, probs)
    assert 0.58 <= t < 0.62 and s == pytest.approx(1.0)


def test_decode_min_labels_and_multiclass():
    probs = np.array([[0.1, 0.2, 0.05], [0.9, 0.8, 0.1]])
    assert decode_multilabel(probs, 0.5, 0).sum(1).tolist() == [0, 2]
    assert decode("multilabel", probs, 0.5, min_labels=1) == [[1], [0, 1]]
    assert decode("multiclass", probs) == [1, 0]


def test_accuracy_top_k_and_baseline():
    labels = np.array([0, 1, 2, 2])
    probs = np.array([[.8, .1, .1], [.5, .4, .1], [.1, .2, .7], [.2, .7, .1]])
    assert accuracy(labels, probs) == 0.5
    assert top_k_error(labels, probs, 1) == 0.5 and top_k_error(labels, probs, 2) == 0.25
    assert top_k_error(labels, probs, 3) == 0.0
    assert prior_baseline("multiclass", np.array([2, 2, 1]), labels) == 0.5
    truth = np.array([[1, 0], [1, 0], [1, 1]])
    # the best constant answer here is "both labels" (F2 0.889), better than "label 0 only" (0.852)
    both, first = fbeta_per_image(truth, np.ones_like(truth)), fbeta_per_image(truth, np.array([[1, 0]] * 3))
    assert both > first
    assert prior_baseline("multilabel", truth, truth) == pytest.approx(both)
