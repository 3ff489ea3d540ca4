"""Risk-coverage curves and AURC: by hand, ties, the oracle and a random order."""

import itertools

import numpy as np
import pytest

from robustmri.evaluation.risk_coverage import (
    aurc,
    excess_aurc,
    oracle_aurc,
    risk_coverage_curve,
    risk_coverage_figure,
)


def test_curve_and_aurc_by_hand():
    # accepted in score order: right, wrong, right, wrong -> risks 0/1, 1/2, 1/3, 2/4
    scores, correct = [0.4, 0.1, 0.3, 0.2], [False, True, True, False]
    curve = risk_coverage_curve(scores, correct)
    np.testing.assert_allclose(curve.coverage, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(curve.risk, [0, 1 / 2, 1 / 3, 2 / 4])
    assert aurc(scores, correct) == pytest.approx((0 + 1 / 2 + 1 / 3 + 1 / 2) / 4)
    # oracle: right, right, wrong, wrong -> 0, 0, 1/3, 2/4
    assert oracle_aurc(correct) == pytest.approx((1 / 3 + 1 / 2) / 4)
    assert excess_aurc(scores, correct) == pytest.approx(1 / 8)
    assert curve.risk_at(0.5) == pytest.approx(0.5) and curve.risk_at(0.6) == pytest.approx(1 / 3)


def test_ties_take_the_mean_over_every_order():
    scores, correct = np.array([2.0, 1.0, 1.0, 1.0, 0.0]), np.array([True, False, True, True, False])
    curve = risk_coverage_curve(scores, correct)
    tied = np.flatnonzero(scores == 1.0)
    by_order = []
    for order in itertools.permutations(tied):  # break the tie every way with distinct scores
        broken = scores.copy()
        broken[list(order)] = 1.0 + np.arange(3) * 1e-3
        by_order.append(risk_coverage_curve(broken, correct).risk)
    np.testing.assert_allclose(curve.risk, np.mean(by_order, axis=0), atol=1e-12)
    permutation = np.random.default_rng(0).permutation(5)  # the input order of equal scores does not matter
    np.testing.assert_allclose(risk_coverage_curve(scores[permutation], correct[permutation]).risk, curve.risk)


def test_a_constant_score_gives_the_error_rate_at_every_coverage():
    correct = np.random.default_rng(1).random(50) < 0.7
    curve = risk_coverage_curve(np.zeros(50), correct)
    np.testing.assert_allclose(curve.risk, 1 - correct.mean())


def test_oracle_score_has_no_excess_and_a_random_one_about_the_error_rate():
    rng = np.random.default_rng(2)
    correct = rng.random(2000) < 0.8
    oracle = np.where(correct, rng.random(2000), 1 + rng.random(2000))  # every wrong answer scores higher
    assert excess_aurc(oracle, correct) == pytest.approx(0, abs=1e-12)
    random_aurcs = [aurc(rng.random(2000), correct) for _ in range(20)]
    assert np.mean(random_aurcs) == pytest.approx(1 - correct.mean(), abs=0.01)
    reversed_order = excess_aurc(-oracle, correct)  # the worst ordering: far above both
    assert reversed_order > np.mean(random_aurcs) - oracle_aurc(correct) > 0


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="as many scores"):
        aurc([0.1, 0.2], [True])
    with pytest.raises(ValueError, match="NaN"):
        aurc([np.nan], [True])
    with pytest.raises(ValueError, match="booleans"):
        aurc([0.1], [2])


def test_figure_is_written(tmp_path):
    correct = np.array([True, False, True, True])
    path = risk_coverage_figure({"a": risk_coverage_curve([0.1, 0.9, 0.2, 0.3], correct)}, tmp_path / "rc.png",
                                error_rate=0.25)
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
