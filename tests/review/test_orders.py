"""Review orders by name (robustmri.review.orders): hand-computed small cases, and cleanlab's own rule."""

import warnings

import numpy as np
import pytest

from robustmri.review.orders import (
    ORDERS,
    ReviewOrderError,
    ReviewValues,
    confident_joint,
    confident_learning_issues,
    rank,
    ranks_of,
    self_confidence,
)

LABELS = np.array([0, 1, 0, 1])


def test_loss_self_influence_and_influence_orders_hand_computed():
    values = ReviewValues(LABELS, losses=np.array([0.1, 2.0, 0.5, 2.0]),
                          self_influence=np.array([-0.1, -0.5, 0.0, -0.3]), influence=np.array([0.2, -0.1, -0.4, 0.0]))
    assert rank("loss", values).positions.tolist() == [1, 3, 2, 0]  # largest first, the tie in input order
    assert rank("self_influence", values).positions.tolist() == [1, 3, 0, 2]  # most negative first
    assert rank("influence", values).positions.tolist() == [2, 1, 3, 0]  # most harmful first
    np.testing.assert_array_equal(rank("loss", values).scores, [0.1, 2.0, 0.5, 2.0])  # in input order


def test_confident_learning_hand_computed():
    """Two classes, eight samples. Thresholds: t0 = mean p0 of the given-0 samples = (.95+.9+.45+.2)/4 = .625,
    t1 = (.99*3+.3)/4 = .8175. Counted: samples 0, 1 in class 0; 4, 5, 6 in class 1; 7 (given 1, p0 .7 >= t0) in
    class 0; 2 and 3 exceed no threshold. Joint [[2, 0], [1, 3]], rows scaled to the class counts: [[4, 0],
    [1, 3]]. So one given-1 sample is flagged (7, the largest p0 - p1) and no given-0 one, though 2 and 3 are
    predicted 1. Flagged first by p(given label), then the rest: 7, then 3 (.2), 2 (.45), 1, 0, 4, 5, 6."""
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p1 = np.array([0.05, 0.1, 0.55, 0.8, 0.99, 0.99, 0.99, 0.3])
    probabilities = np.stack([1 - p1, p1], axis=1)
    np.testing.assert_array_equal(confident_joint(labels, probabilities), [[4, 0], [1, 3]])
    assert np.flatnonzero(confident_learning_issues(labels, probabilities)).tolist() == [7]
    values = ReviewValues(labels, probabilities=probabilities, losses=-np.log(self_confidence(labels, probabilities)))
    assert rank("confident_learning", values).positions.tolist() == [7, 3, 2, 1, 0, 4, 5, 6]
    assert rank("loss", values).positions.tolist() == [3, 7, 2, 1, 0, 4, 5, 6]  # the order differs where CL prunes
    np.testing.assert_allclose(rank("confident_learning", values).scores, self_confidence(labels, probabilities))


def test_a_prediction_that_agrees_with_its_label_is_never_flagged():
    labels = np.array([0, 0, 1, 1])
    probabilities = np.array([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8], [0.3, 0.7]])  # sample 1: a tie, goes to its label
    assert not confident_learning_issues(labels, probabilities).any()


def test_random_order_is_seeded():
    values = ReviewValues(np.zeros(50, dtype=int))
    first = rank("random", values, seed=3).positions
    assert sorted(first.tolist()) == list(range(50))
    assert rank("random", values, seed=3).positions.tolist() == first.tolist()
    assert rank("random", values, seed=4).positions.tolist() != first.tolist()


def test_orders_by_name_and_their_errors():
    assert list(ORDERS) == ["random", "loss", "confident_learning", "self_influence", "influence"]
    assert [ORDERS[name].cost for name in ORDERS] == [0, 1, 2, 3, 4]
    assert [name for name, order in ORDERS.items() if order.needs_validation_set] == ["influence"]
    with pytest.raises(ReviewOrderError, match="unknown review order 'margin' .*loss, confident_learning"):
        rank("margin", ReviewValues(LABELS))
    with pytest.raises(ReviewOrderError, match="'influence' needs influence"):
        rank("influence", ReviewValues(LABELS, losses=np.ones(4)))
    with pytest.raises(ReviewOrderError, match="losses has 3 rows for 4 labels"):
        ReviewValues(LABELS, losses=np.ones(3))


def test_ranks_of_positions():
    assert ranks_of([2, 0, 1]).tolist() == [2, 3, 1]


def _noisy_probabilities(seed, n=300, classes=3):
    rng = np.random.default_rng(seed)
    true = rng.integers(0, classes, n)
    logits = rng.normal(0, 1.5, (n, classes))
    logits[np.arange(n), true] += rng.uniform(0.5, 3.0)
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = true.copy()
    flip = rng.random(n) < 0.2
    labels[flip] = (labels[flip] + rng.integers(1, classes, flip.sum())) % classes
    return labels, probabilities


@pytest.mark.parametrize("seed", range(6))
def test_confident_learning_is_cleanlabs_find_label_issues(seed):
    """The same flagged set as cleanlab's default find_label_issues, ranked as return_indices_ranked_by=
    "self_confidence" ranks them; with probabilities rounded to 2 decimals (ties in self-confidence) the set is
    the same and the ranking differs at most among equal self-confidences (cleanlab's sort is not stable)."""
    filters = pytest.importorskip("cleanlab.filter")
    labels, probabilities = _noisy_probabilities(seed)
    for rounded in (False, True):
        if rounded:
            probabilities = probabilities.round(2) / probabilities.round(2).sum(axis=1, keepdims=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # cleanlab's advice to use out-of-sample probabilities
            expected = filters.find_label_issues(labels, probabilities, return_indices_ranked_by="self_confidence",
                                                 n_jobs=1)
        issues = confident_learning_issues(labels, probabilities)
        assert len(expected) > 10
        assert sorted(expected.tolist()) == np.flatnonzero(issues).tolist()
        ours = rank("confident_learning", ReviewValues(labels, probabilities=probabilities)).positions[:len(expected)]
        confidence = self_confidence(labels, probabilities)
        if rounded:
            np.testing.assert_array_equal(confidence[ours], confidence[expected])
        else:
            assert ours.tolist() == expected.tolist()
