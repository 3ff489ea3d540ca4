"""The Mahalanobis abstention score against an independent computation, and its threshold."""

import numpy as np
import pytest

from robustmri.abstention.mahalanobis import RIDGE, MahalanobisDetector, calibrate_threshold

from helpers import independent_mahalanobis as independent_score


def test_score_equals_an_independent_computation():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], [40, 70, 30])
    features = rng.normal(size=(140, 12)) @ rng.normal(size=(12, 12)) + 3.0 * labels[:, None]
    features[:, 5] = 0.0  # a dead unit: the ridge keeps the covariance invertible
    detector = MahalanobisDetector.fit(features, labels, 3)
    queries = np.concatenate([rng.normal(size=(10, 12)), rng.normal(size=(5, 12)) * 10])
    queries[:5, 5] = 1.0  # the dead unit lit: far out of distribution
    expected = independent_score(features, labels, queries, RIDGE)
    np.testing.assert_allclose(detector.score(queries), expected, rtol=1e-9)
    np.testing.assert_allclose(detector.score(features), independent_score(features, labels, features, RIDGE), rtol=1e-9)
    assert detector.n_train == 140 and detector.score(queries[:5]).min() > detector.score(features).max()
    with pytest.raises(ValueError, match="every class needs training slices"):
        MahalanobisDetector.fit(features[:100], labels[:100], 3)


@pytest.mark.parametrize("n, target, k", [(20, 0.95, 19), (7, 0.95, 7), (100, 0.9, 90), (3, 1.0, 3), (10, 0.01, 1)])
def test_calibrate_threshold_accepts_the_target_within_one_slice(n, target, k):
    scores = np.random.default_rng(n).permutation(np.arange(n, dtype=np.float64) * 1.5)
    threshold, acceptance = calibrate_threshold(scores, target)
    assert threshold == 1.5 * (k - 1) and acceptance == k / n and target <= acceptance < target + 1 / n
