"""Abstention scores by name: one interface, several strategies (higher = less assessable).

Every score is an :class:`AbstentionScore`: ``fit(features, logits, labels)`` returns its fitted
parameters as a dict of float64 arrays (what :class:`~robustmri.abstention.state.AbstentionState`
stores as ``arrays``; ``{}`` for a score with nothing to fit) and ``score(params, features, logits)``
returns one value per slice, higher for a slice the model can vouch for less. ``features`` [N, d] are
the penultimate features (the input of the final ``nn.Linear``) and ``logits`` [N, C] its output, both
from one forward pass (:func:`~robustmri.abstention.mahalanobis.network_outputs`).

Strategies (:data:`SCORES`, :func:`score_by_name`):

- ``mahalanobis``: squared Mahalanobis distance of the features to the nearest class mean under one
  tied covariance (:class:`~robustmri.abstention.mahalanobis.MahalanobisDetector`; params ``means``
  [C, d] and ``precision_factor`` [d, d]), the product's score today;
- ``max_softmax``: ``1 - max_c softmax(logits)_c`` (Hendrycks and Gimpel, ICLR 2017);
- ``energy``: ``-logsumexp_c(logits_c)``, the free energy at temperature 1 (Liu, Wang, Owens, Li,
  "Energy-based Out-of-distribution Detection", NeurIPS 2020), higher = less assessable;
- ``mahalanobis+max_softmax``: the mean of the two scores' empirical CDFs, each CDF taken on a
  reference set's scores (:class:`CdfMean`), so that two scores on unrelated scales weigh the same;
- ``mahalanobis_gate+max_softmax``: the maximum-softmax CDF orders the slices, and a slice less
  familiar (Mahalanobis) than :data:`GATE_LEVEL` of the reference set is refused whatever its
  softmax (:class:`CdfGate`): one score for wrong answers, one for images unlike the training slices.

A small deep ensemble needs several networks, so it is not a fitted strategy of one checkpoint:
:func:`ensemble_scores` scores the members' probabilities.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
from scipy.special import logsumexp, softmax

from robustmri.abstention.mahalanobis import RIDGE, MahalanobisDetector


@runtime_checkable
class AbstentionScore(Protocol):
    """A score fitted on labelled features and logits, then applied to any slice (higher = less assessable)."""

    name: str

    def fit(self, features: np.ndarray, logits: np.ndarray, labels: np.ndarray,
            reference: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Parameters (float64 arrays by name) fitted on ``features`` [N, d], ``logits`` [N, C], ``labels`` [N].

        ``reference``: held-out ``(features, logits)`` (e.g. the validation split) for a score that normalises
        itself on data it was not fitted on; None: the fit data. Scores that need none ignore it."""
        ...

    def score(self, params: dict[str, np.ndarray], features: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """One float64 score per slice [N]; higher = less assessable."""
        ...


def _as_2d(array, name: str) -> np.ndarray:
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be [N, k], got shape {array.shape}")
    return array


class Mahalanobis:
    """Squared Mahalanobis distance to the nearest class mean (:class:`MahalanobisDetector`, fitted in float64)."""

    name = "mahalanobis"

    def __init__(self, ridge: float = RIDGE):
        self.ridge = float(ridge)

    def fit(self, features, logits, labels, reference=None) -> dict[str, np.ndarray]:
        detector = MahalanobisDetector.fit(_as_2d(features, "features"), labels, _as_2d(logits, "logits").shape[1],
                                           self.ridge)
        return {"means": detector.means, "precision_factor": detector.precision_factor}

    def score(self, params, features, logits) -> np.ndarray:
        detector = MahalanobisDetector(means=np.asarray(params["means"], np.float64),
                                       precision_factor=np.asarray(params["precision_factor"], np.float64),
                                       ridge=self.ridge, n_train=0)
        return detector.score(_as_2d(features, "features"))


class MaxSoftmax:
    """``1 - max_c p_c``: the probability mass the model does not give its own answer; nothing to fit."""

    name = "max_softmax"

    def fit(self, features, logits, labels, reference=None) -> dict[str, np.ndarray]:
        return {}

    def score(self, params, features, logits) -> np.ndarray:
        return 1.0 - softmax(_as_2d(logits, "logits"), axis=1).max(axis=1)


class Energy:
    """``-logsumexp(logits)`` (temperature 1): low for confident, in-distribution inputs; nothing to fit."""

    name = "energy"

    def fit(self, features, logits, labels, reference=None) -> dict[str, np.ndarray]:
        return {}

    def score(self, params, features, logits) -> np.ndarray:
        return -logsumexp(_as_2d(logits, "logits"), axis=1)


def empirical_cdf(reference: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``F(v)`` = share of ``reference`` scores ``<= v``, for each of ``values`` (0 below every one, 1 above)."""
    reference = np.sort(np.asarray(reference, dtype=np.float64).reshape(-1))
    if not len(reference):
        raise ValueError("an empirical CDF needs at least one reference score")
    return np.searchsorted(reference, np.asarray(values, dtype=np.float64), side="right") / len(reference)


#: The gate of :class:`CdfGate`: a slice whose gate score lies above this share of the reference set's is refused.
#: Fixed before any measurement: the gate alone refuses about 1 % of ordinary slices, so the 95 % acceptance
#: target is set by the ranking score.
GATE_LEVEL = 0.99


class CdfMean:
    """The mean of several scores' empirical CDFs (each in [0, 1], higher = less assessable).

    Each component is fitted on the fit data; its CDF is the share of the *reference* set's scores
    (``fit(..., reference=(features, logits))``, the validation split in the bench; the fit data when
    none is given) at or below a slice's score. A rank on held-out data puts scores of unrelated scales
    on one scale; on the fit data a fitted score would look better than it is (training slices are closer
    to their own class means, and more confidently classified). Beyond the reference's largest score the
    CDF is 1, so among slices that far out only the other components order them. Params: each
    component's own, prefixed ``<name>.``, and ``<name>.cdf_reference`` (its sorted reference scores).
    """

    def __init__(self, components: tuple[AbstentionScore, ...]):
        if len(components) < 2:
            raise ValueError("a combination needs at least two scores")
        self.components = tuple(components)
        self.name = "+".join(c.name for c in self.components)

    def fit(self, features, logits, labels, reference=None) -> dict[str, np.ndarray]:
        ref_features, ref_logits = reference if reference is not None else (features, logits)
        params = {}
        for component in self.components:
            own = component.fit(features, logits, labels)
            params.update({f"{component.name}.{key}": value for key, value in own.items()})
            params[f"{component.name}.cdf_reference"] = np.sort(component.score(own, ref_features, ref_logits))
        return params

    def combine(self, values: list[np.ndarray], references: list[np.ndarray]) -> np.ndarray:
        """The score from each component's ``values`` and its sorted ``references`` (in the order of
        ``components``): the mean of the empirical CDFs."""
        return np.mean([empirical_cdf(ref, v) for ref, v in zip(references, values)], axis=0)

    def score(self, params, features, logits) -> np.ndarray:
        values, references = [], []
        for component in self.components:
            prefix = f"{component.name}."
            own = {key[len(prefix):]: value for key, value in params.items() if key.startswith(prefix)}
            references.append(own.pop("cdf_reference"))
            values.append(component.score(own, features, logits))
        return self.combine(values, references)


def gate_cut(reference: np.ndarray, level: float = GATE_LEVEL) -> float:
    """The gate score above which :class:`CdfGate` refuses: midway between the reference scores on either side of
    ``level`` (the ``floor(level n)``-th and next smallest of ``n``), so that no reference slice's own score sits
    on it (a float32 and a float64 score of that slice then fall on the same side); ``inf`` when ``level n`` is
    beyond the last one."""
    reference = np.sort(np.asarray(reference, dtype=np.float64).reshape(-1))
    if not len(reference):
        raise ValueError("a gate needs at least one reference score")
    above = int(np.floor(level * len(reference)))
    if above >= len(reference):
        return float("inf")
    return float(reference[above] if above == 0 else (reference[above - 1] + reference[above]) / 2)


class CdfGate(CdfMean):
    """A ranking score behind a gate: ``F_rank`` where the gate score is at most :func:`gate_cut` of its reference
    (the ``level`` share of the reference set lies below it), else ``1 + F_gate``.

    ``components`` is ``(gate, rank)``, fitted and ranked on the reference set as in :class:`CdfMean` (the same
    parameters). Every gated slice scores above every ungated one (``1 + F_gate > 1 >= F_rank``), so a threshold
    that accepts most of the reference set (the product's 95 %) refuses every gated slice, and among the others
    the ranking score alone decides: the gate refuses images unlike the training slices (a far-away Mahalanobis
    distance), the ranking score the slices the model is least sure of.
    """

    def __init__(self, components: tuple[AbstentionScore, AbstentionScore], level: float = GATE_LEVEL):
        if len(components) != 2:
            raise ValueError(f"a gate needs two scores (gate, rank), got {len(components)}")
        if not 0.0 < level < 1.0:
            raise ValueError(f"the gate level must lie in (0, 1), got {level!r}")
        super().__init__(components)
        self.level = float(level)
        self.name = f"{components[0].name}_gate+{components[1].name}"

    def combine(self, values: list[np.ndarray], references: list[np.ndarray]) -> np.ndarray:
        (gate, rank), (gate_ref, rank_ref) = values, references
        gated = np.asarray(gate, dtype=np.float64) > gate_cut(gate_ref, self.level)
        return np.where(gated, 1.0 + empirical_cdf(gate_ref, gate), empirical_cdf(rank_ref, rank))


#: Every strategy by name.
SCORES: dict[str, AbstentionScore] = {score.name: score for score in (
    Mahalanobis(), MaxSoftmax(), Energy(), CdfMean((Mahalanobis(), MaxSoftmax())),
    CdfGate((Mahalanobis(), MaxSoftmax())))}


def build_score(name: str, ridge: float = RIDGE) -> AbstentionScore:
    """A fresh strategy called ``name``, its Mahalanobis part (alone or in a combination) with ``ridge``."""
    template = score_by_name(name)
    if isinstance(template, Mahalanobis):
        return Mahalanobis(ridge)
    if isinstance(template, CdfMean):
        components = tuple(Mahalanobis(ridge) if isinstance(c, Mahalanobis) else c for c in template.components)
        return CdfGate(components, template.level) if isinstance(template, CdfGate) else CdfMean(components)
    return template


def score_by_name(name: str) -> AbstentionScore:
    """The strategy called ``name`` in :data:`SCORES`; ``ValueError`` naming the valid ones otherwise."""
    try:
        return SCORES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown abstention score {name!r}; valid names: {', '.join(SCORES)}") from None


def ensemble_scores(probabilities) -> dict[str, np.ndarray]:
    """Scores of a deep ensemble from its members' probabilities [M, N, C] (M networks, e.g. training seeds).

    - ``ensemble_entropy``: entropy (nats) of the mean probability, total uncertainty;
    - ``ensemble_disagreement``: the mutual information between the answer and the member, i.e. the entropy
      of the mean minus the mean of the members' entropies (Lakshminarayanan et al., NeurIPS 2017; the
      BALD term): 0 when every member gives the same distribution.

    Both are higher for a slice the ensemble can vouch for less. The ensemble's answer is the argmax of
    the mean probability.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 3 or probabilities.shape[0] < 2:
        raise ValueError(f"expected probabilities [M >= 2 members, N, C], got shape {probabilities.shape}")

    def entropy(p):
        return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)

    total = entropy(probabilities.mean(axis=0))
    return {"ensemble_entropy": total, "ensemble_disagreement": total - entropy(probabilities).mean(axis=0)}
