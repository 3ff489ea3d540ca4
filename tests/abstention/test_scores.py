"""Abstention scores by name: each against an independent computation, and the sign (farther = higher)."""

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from robustmri.abstention.mahalanobis import RIDGE, MahalanobisDetector
from robustmri.abstention.scores import (
    SCORES,
    AbstentionScore,
    empirical_cdf,
    ensemble_scores,
    gate_cut,
    score_by_name,
)


@pytest.fixture(scope="module")
def fitted():
    """Features of three separated classes, logits of a linear layer on them, and far-away queries."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], [40, 60, 30])
    features = rng.normal(size=(130, 6)) @ rng.normal(size=(6, 6)) + 4.0 * np.eye(3, 6)[labels]
    weight = rng.normal(size=(6, 3))
    queries = np.concatenate([features[:5] + rng.normal(0, 0.1, (5, 6)), 20.0 + rng.normal(size=(5, 6))])
    return features, features @ weight, labels, queries, queries @ weight


def test_registry_and_interface():
    assert list(SCORES) == ["mahalanobis", "max_softmax", "energy", "mahalanobis+max_softmax",
                            "mahalanobis_gate+max_softmax"]
    for name, score in SCORES.items():
        assert isinstance(score, AbstentionScore) and score.name == name and score_by_name(name) is score
    with pytest.raises(ValueError, match=r"unknown abstention score 'softmax'; valid names: mahalanobis, max_softmax"):
        score_by_name("softmax")


def test_mahalanobis_params_and_value_against_scipy(fitted):
    features, logits, labels, queries, query_logits = fitted
    score = score_by_name("mahalanobis")
    params = score.fit(features, logits, labels)
    assert sorted(params) == ["means", "precision_factor"] and params["means"].shape == (3, 6)
    # independent: pooled within-class covariance with the same ridge, scipy's Mahalanobis distance
    means = np.stack([features[labels == c].mean(0) for c in range(3)])
    centred = features - means[labels]
    covariance = centred.T @ centred / len(features)
    covariance += RIDGE * np.trace(covariance) / 6 * np.eye(6)
    expected = (cdist(queries, means, metric="mahalanobis", VI=np.linalg.inv(covariance)) ** 2).min(1)
    values = score.score(params, queries, query_logits)
    np.testing.assert_allclose(values, expected, rtol=1e-9)
    detector = MahalanobisDetector.fit(features, labels, 3)  # the product's detector gives the same
    np.testing.assert_allclose(values, detector.score(queries), rtol=1e-12)
    assert values[5:].min() > values[:5].max()  # far from every class mean: higher


def test_max_softmax_and_energy_against_torch(fitted):
    _, _, _, _, query_logits = fitted
    logits = torch.from_numpy(query_logits)
    max_softmax, energy = score_by_name("max_softmax"), score_by_name("energy")
    assert max_softmax.fit(None, query_logits, None) == {} and energy.fit(None, query_logits, None) == {}
    np.testing.assert_allclose(max_softmax.score({}, None, query_logits),
                               (1 - torch.softmax(logits, 1).max(1).values).numpy(), atol=1e-12)
    np.testing.assert_allclose(energy.score({}, None, query_logits), (-torch.logsumexp(logits, 1)).numpy(), rtol=1e-12)
    # sign: a confident answer (one large logit) scores lower than a hesitant one (equal logits)
    confident, hesitant = np.array([[12.0, 0.0, 0.0]]), np.array([[1.0, 1.0, 1.0]])
    for score in (max_softmax, energy):
        assert score.score({}, None, confident)[0] < score.score({}, None, hesitant)[0]
    assert max_softmax.score({}, None, hesitant)[0] == pytest.approx(2 / 3)
    assert energy.score({}, None, hesitant)[0] == pytest.approx(-1 - np.log(3))


def test_empirical_cdf_by_hand():
    np.testing.assert_allclose(empirical_cdf([3.0, 1.0, 2.0, 2.0], [0.5, 1.0, 2.0, 2.5, 9.0]), [0, 0.25, 0.75, 0.75, 1])


def test_combination_is_the_mean_of_the_cdfs_on_the_reference(fitted):
    features, logits, labels, queries, query_logits = fitted
    combined = score_by_name("mahalanobis+max_softmax")
    reference = (features[::2] + 0.3, logits[::2] * 0.7)
    params = combined.fit(features, logits, labels, reference=reference)
    assert sorted(params) == ["mahalanobis.cdf_reference", "mahalanobis.means", "mahalanobis.precision_factor",
                              "max_softmax.cdf_reference"]
    own = score_by_name("mahalanobis").fit(features, logits, labels)
    maha_ref = score_by_name("mahalanobis").score(own, *reference)
    soft_ref = 1 - torch.softmax(torch.from_numpy(reference[1]), 1).max(1).values.numpy()
    maha = score_by_name("mahalanobis").score(own, queries, query_logits)
    soft = 1 - torch.softmax(torch.from_numpy(query_logits), 1).max(1).values.numpy()
    expected = [((maha_ref <= m).mean() + (soft_ref <= s).mean()) / 2 for m, s in zip(maha, soft)]
    np.testing.assert_allclose(combined.score(params, queries, query_logits), expected, atol=1e-12)
    assert combined.score(params, queries, query_logits)[5:].min() >= 0.5  # far away: beyond every reference distance
    # no reference: the fit data's own scores
    np.testing.assert_allclose(combined.fit(features, logits, labels)["mahalanobis.cdf_reference"],
                               np.sort(score_by_name("mahalanobis").score(own, features, logits)))


def test_gate_cut_by_hand():
    reference = np.arange(1.0, 201.0)  # 200 scores 1..200: 99 % of them (198) lie at or below 198
    assert gate_cut(reference, 0.99) == 198.5  # midway between the 198th and the 199th
    assert gate_cut([5.0, 1.0, 3.0, 2.0], 0.5) == 2.5 and gate_cut([4.0], 0.5) == 4.0
    assert gate_cut([1.0, 2.0], 0.999) == 1.5 and gate_cut(np.arange(10.0), 0.99) == 8.5
    with pytest.raises(ValueError, match="at least one"):
        gate_cut([], 0.99)


def test_gate_refuses_the_unfamiliar_whatever_the_softmax_and_ranks_the_rest_by_it(fitted):
    features, logits, labels, queries, query_logits = fitted
    gated = score_by_name("mahalanobis_gate+max_softmax")
    assert gated.level == 0.99 and [c.name for c in gated.components] == ["mahalanobis", "max_softmax"]
    params = gated.fit(features, logits, labels)
    # the same parameters as the mean of the two CDFs: only the way they combine differs
    assert sorted(params) == sorted(score_by_name("mahalanobis+max_softmax").fit(features, logits, labels))
    maha_ref, soft_ref = params["mahalanobis.cdf_reference"], params["max_softmax.cdf_reference"]
    own = score_by_name("mahalanobis").fit(features, logits, labels)
    maha = score_by_name("mahalanobis").score(own, queries, query_logits)
    soft = 1 - torch.softmax(torch.from_numpy(query_logits), 1).max(1).values.numpy()
    ordered = np.sort(maha_ref)  # 130 reference scores: floor(0.99 * 130) = 128 at or below the cut
    cut = (ordered[127] + ordered[128]) / 2
    expected = [1 + (maha_ref <= m).mean() if m > cut else (soft_ref <= s).mean() for m, s in zip(maha, soft)]
    scores = gated.score(params, queries, query_logits)
    np.testing.assert_allclose(scores, expected, atol=1e-12)
    # the far-away queries are gated (above every ungated score) even where the softmax is certain
    assert scores[5:].min() > 1 >= scores[:5].max()
    assert (soft[5:] < 0.5).any()
    # on the reference itself the gate refuses the 2 of 130 above the cut, and the rest keep their softmax rank
    on_reference = gated.score(params, features, logits)
    own_maha = score_by_name("mahalanobis").score(own, features, logits)
    own_soft = 1 - torch.softmax(torch.from_numpy(logits), 1).max(1).values.numpy()
    assert set(np.flatnonzero(on_reference > 1)) == set(np.argsort(own_maha)[-2:])
    np.testing.assert_allclose(on_reference[own_maha <= cut], [(soft_ref <= v).mean() for v in own_soft[own_maha <= cut]],
                               atol=1e-12)


def test_ensemble_scores_by_hand():
    agree = [[[0.5, 0.5]], [[0.5, 0.5]]]  # both members hesitate alike: uncertain, but no disagreement
    disagree = [[[1.0, 0.0]], [[0.0, 1.0]]]  # each member certain of another class
    a, d = ensemble_scores(agree), ensemble_scores(disagree)
    assert a["ensemble_entropy"][0] == pytest.approx(np.log(2)) and a["ensemble_disagreement"][0] == pytest.approx(0)
    assert d["ensemble_entropy"][0] == pytest.approx(np.log(2))
    assert d["ensemble_disagreement"][0] == pytest.approx(np.log(2))
    with pytest.raises(ValueError, match="at least|M >= 2"):
        ensemble_scores([[[1.0, 0.0]]])
