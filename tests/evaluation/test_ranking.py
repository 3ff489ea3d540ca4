"""Precision and recall among the first k positions of a review order (robustmri.evaluation.ranking)."""

import pytest

from robustmri.evaluation.ranking import precision_at_k, recall_at_k

WRONG = [False, True, False, True, True]  # three wrong labels, at positions 1, 3, 4


def test_precision_and_recall_at_k_hand_computed():
    order = [1, 0, 3, 2, 4]
    assert precision_at_k(order, WRONG, 1) == 1.0
    assert precision_at_k(order, WRONG, 2) == 0.5
    assert recall_at_k(order, WRONG, 2) == pytest.approx(1 / 3)
    assert precision_at_k(order, WRONG, 3) == pytest.approx(2 / 3) == recall_at_k(order, WRONG, 3)  # k = wrong labels
    assert recall_at_k(order, WRONG, 5) == 1.0 and precision_at_k(order, WRONG, 5) == 0.6
    assert recall_at_k(order, [False] * 5, 2) == 0.0


def test_k_outside_the_order_is_refused():
    for k in (0, 6):
        with pytest.raises(ValueError, match=r"k must lie in \[1, 5\]"):
            precision_at_k([0, 1, 2, 3, 4], WRONG, k)
