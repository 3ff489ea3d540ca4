"""Review orders: which labelled samples a reviewer should look at first, chosen by name.

The one convention, stated here once: **an order returns positions, most suspicious first** — a
permutation of ``range(N)`` into the samples as given — together with the per-sample value it ranked
by (:class:`Ranking`). Every order reads one model's view of the same N labelled samples
(:class:`ReviewValues`) and names the fields it needs, so orders are interchangeable by name
(:func:`rank`, :data:`ORDERS`), as torch-influence's and Kronfluence's strategies are.

- ``loss``: the training loss of the given label, largest first (``-log p(given label)``).
- ``confident_learning``: Northcutt, Jiang and Chuang, "Confident learning: estimating uncertainty in
  dataset labels", JAIR 2021, as cleanlab 2.x's ``filter.find_label_issues`` runs it by default
  (``filter_by="prune_by_noise_rate"``, ``frac_noise=1``, ``min_examples_per_class=1``), with the issues
  ranked as ``return_indices_ranked_by="self_confidence"`` ranks them (:func:`confident_learning_issues`
  writes that rule out). Samples flagged as label issues come first, by self-confidence ``p(given label)``
  (lowest first); the samples not flagged follow, by self-confidence as well (cleanlab returns only the
  flagged ones: the tail is ours, so that every order ranks every sample).
- ``self_influence``: ``-g_i . (H + lambda I)^-1 g_i / N`` (:mod:`robustmri.influence`), most negative first.
- ``influence``: validation-set influence (:mod:`robustmri.influence`), most harmful first. It needs a
  trusted validation set, which an annotation project does not have.
- ``random``: a seeded random order, the reference any useful order has to beat.

Ties keep the input order (stable sorts), so an order is a function of its inputs and seed; only the choice
of which samples of a class confident learning flags sorts as cleanlab does (its margins rarely tie). Among
flagged samples of equal self-confidence cleanlab's order is arbitrary and ours is the input order: the one
difference from cleanlab, checked in tests/review.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import numpy as np

from robustmri.influence import influence_ranking


class ReviewOrderError(ValueError):
    """An unknown order name, or values that lack what the order needs."""


@dataclass(frozen=True)
class ReviewValues:
    """What one model says about N labelled samples, in one sample order. An order reads only what it names.

    ``labels``: given class per sample [N]; ``probabilities``: the model's softmax [N, C]; ``losses``:
    cross-entropy of the given label [N]; ``self_influence`` [N] (<= 0); ``influence``: validation-set
    influence [N] (negative = harmful).
    """

    labels: np.ndarray
    probabilities: np.ndarray | None = None
    losses: np.ndarray | None = None
    self_influence: np.ndarray | None = None
    influence: np.ndarray | None = None

    def __post_init__(self):
        n = len(self.labels)
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None and len(value) != n:
                raise ReviewOrderError(f"{field.name} has {len(value)} rows for {n} labels")


@dataclass(frozen=True)
class Ranking:
    """``positions``: sample positions, most suspicious first; ``scores``: per sample (input order), the value
    the order ranked by, in that order's own unit (see its ``score``)."""

    positions: np.ndarray
    scores: np.ndarray


@dataclass(frozen=True)
class ReviewOrder:
    """An order by name: the :class:`ReviewValues` fields it ``needs``, its ``cost`` (the pre-registered cost
    order, cheaper first, which settles a tie between two measured orders), what its ``score`` is, the one
    line a reviewer reads about a sample it serves (``explanation``) and ``rank(values, seed) -> Ranking``."""

    name: str
    needs: tuple[str, ...]
    cost: int
    score: str
    explanation: str
    rank: Callable[[ReviewValues, int], Ranking]

    @property
    def needs_validation_set(self) -> bool:
        return "influence" in self.needs


def _ascending(values) -> np.ndarray:
    return np.argsort(np.asarray(values, dtype=np.float64), kind="stable")


def self_confidence(labels, probabilities) -> np.ndarray:
    """``p(given label)`` of every sample (cleanlab's ``self_confidence`` label-quality score)."""
    labels = np.asarray(labels, dtype=np.int64)
    return np.asarray(probabilities, dtype=np.float64)[np.arange(len(labels)), labels]


# --- confident learning, as cleanlab.filter.find_label_issues runs it by default ---------------------------

_FLOAT_TOLERANCE = 1e-6  # cleanlab's FLOATING_POINT_COMPARISON
_MISSING_CLASS_THRESHOLD = 2.0  # above any probability: nothing is counted into a class no sample is given


def _round_preserving_sum(row: np.ndarray) -> np.ndarray:
    """Round to integers keeping the (rounded) total: the entries rounded furthest down go up first."""
    ints = row.round()
    total = row.sum().round()
    while abs(ints.sum().round() - total) > _FLOAT_TOLERANCE:
        step = 1 if total > ints.sum() else -1
        changes = min(int(abs(total - ints.sum().round())), len(row))
        ints[np.argsort(row - ints)[::-step][:changes]] += step
    return ints.astype(int)


def _round_rows(matrix: np.ndarray) -> np.ndarray:
    return np.stack([_round_preserving_sum(np.asarray(row, dtype=float)) for row in matrix])


def confident_joint(labels, probabilities) -> np.ndarray:
    """The calibrated confident joint ``C[given, true]`` (counts summing to N, row sums = given-class counts).

    Per-class threshold ``t_k`` = mean ``p_k`` over the samples given class k. A sample is counted in the
    class it exceeds the threshold of (the largest ``p`` where several); one that exceeds none is not
    counted. The diagonal is at least 1; then each row is scaled to its class count, the whole to N, and
    rounded keeping row totals.
    """
    labels, probabilities = np.asarray(labels, dtype=np.int64), np.asarray(probabilities, dtype=np.float64)
    n_classes = probabilities.shape[1]
    counts = np.bincount(labels, minlength=n_classes)
    thresholds = np.array([probabilities[labels == k, k].mean() if counts[k] else _MISSING_CLASS_THRESHOLD
                           for k in range(n_classes)])
    thresholds = np.clip(thresholds, 2 * _FLOAT_TOLERANCE, None)
    confident = probabilities >= thresholds - _FLOAT_TOLERANCE
    n_confident = confident.sum(axis=1)
    guess = np.where(n_confident > 1, probabilities.argmax(axis=1), confident.argmax(axis=1))
    counted = n_confident > 0
    # built as [true, given] and transposed, as cleanlab's (sklearn's) confusion matrix is: the memory order
    # decides the summation order below, and rounding ties follow the last bit of those sums
    by_true = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(by_true, (guess[counted], labels[counted]), 1)
    joint = by_true.T
    np.fill_diagonal(joint, np.maximum(joint.diagonal(), 1))
    calibrated = (joint.T / np.clip(joint.sum(axis=1), 1e-100, None) * counts).T
    calibrated = calibrated / np.clip(np.sum(calibrated), 1e-100, None) * counts.sum()
    return _round_rows(calibrated)


def confident_learning_issues(labels, probabilities) -> np.ndarray:
    """Boolean mask of the label issues by prune-by-noise-rate (cleanlab's default ``find_label_issues``).

    From the confident joint C: for every given class k and other class j, flag the ``C[k, j]`` samples
    given k with the largest margin ``p_j - p_k`` (after keeping at least one sample on each diagonal);
    classes with a single sample are left alone. Finally a sample whose largest probability is its given
    label's (ties to the given label) is never flagged.
    """
    labels, probabilities = np.asarray(labels, dtype=np.int64), np.asarray(probabilities, dtype=np.float64)
    n_classes = probabilities.shape[1]
    prune = confident_joint(labels, probabilities).T.astype(float)  # [true, given]
    # at least one sample per diagonal, the increase taken evenly from the column's non-zero noise counts
    diagonal = prune.diagonal().copy()
    raised = np.maximum(diagonal, 1)
    prune -= (raised - diagonal) / np.maximum(np.count_nonzero(prune, axis=0) - 1.0, 1.0)
    prune[prune < 0] = 0
    np.fill_diagonal(prune, raised)
    prune = _round_rows(prune.astype(int))
    issues = np.zeros(len(labels), dtype=bool)
    for k in range(n_classes):
        members = np.flatnonzero(labels == k)
        if len(members) <= 1:
            continue
        for j in range(n_classes):
            if j != k and prune[j, k] > 0:
                margin = probabilities[members, j] - probabilities[members, k]
                issues[members[np.argsort(-margin)[:prune[j, k]]]] = True
    nudged = probabilities.copy()
    nudged[np.arange(len(labels)), labels] += _FLOAT_TOLERANCE
    issues[nudged.argmax(axis=1) == labels] = False
    return issues


# --- the orders ----------------------------------------------------------------------------------------------

def _by_loss(values: ReviewValues, seed: int) -> Ranking:
    losses = np.asarray(values.losses, dtype=np.float64)
    return Ranking(_ascending(-losses), losses)


def _by_confident_learning(values: ReviewValues, seed: int) -> Ranking:
    confidence = self_confidence(values.labels, values.probabilities)
    issues = confident_learning_issues(values.labels, values.probabilities)
    by_confidence = _ascending(confidence)
    return Ranking(np.concatenate([by_confidence[issues[by_confidence]], by_confidence[~issues[by_confidence]]]),
                   confidence)


def _by_self_influence(values: ReviewValues, seed: int) -> Ranking:
    scores = np.asarray(values.self_influence, dtype=np.float64)
    return Ranking(influence_ranking(scores), scores)


def _by_influence(values: ReviewValues, seed: int) -> Ranking:
    scores = np.asarray(values.influence, dtype=np.float64)
    return Ranking(influence_ranking(scores), scores)


def _at_random(values: ReviewValues, seed: int) -> Ranking:
    draws = np.random.default_rng(seed).random(len(values.labels))
    return Ranking(_ascending(draws), draws)


#: Costs follow the order fixed before the benchmark (loss < confident learning < self-influence < influence);
#: random, which that order does not list, costs nothing.
ORDERS: dict[str, ReviewOrder] = {order.name: order for order in (
    ReviewOrder("random", (), 0, "a uniform draw, smallest first",
                "served in random order (the reference: nothing is measured about this image)", _at_random),
    ReviewOrder("loss", ("losses",), 1, "training loss of the given label, largest first",
                "the model, trained on these labels, gives this label a low probability: the label may be wrong, "
                "or the image unusual", _by_loss),
    ReviewOrder("confident_learning", ("probabilities",), 2,
                "probability of the given label (issues flagged by confident learning first), smallest first",
                "the model confidently predicts another class than this label (confident learning): the label "
                "may be wrong, or the image unusual", _by_confident_learning),
    ReviewOrder("self_influence", ("self_influence",), 3, "self-influence (<= 0), most negative first",
                "the model's fit to this label depends most on this image: the label may be wrong, or the image "
                "unusual", _by_self_influence),
    ReviewOrder("influence", ("influence",), 4, "validation-set influence, most harmful (negative) first",
                "this label raises the loss on the trusted validation set: it may be wrong", _by_influence),
)}


#: The order the review page uses unless ``--conf review_order`` names another: the outcome of the rule fixed
#: before the review_order_cpu benchmark, measured in docs/results.md ("Which order finds the wrong labels first?").
DEFAULT_ORDER = "loss"
#: Why that order, in one sentence (the measured result), for the reviewer.
DEFAULT_ORDER_REASON = (
    "with 5, 10 and 20 % of figshare's training labels flipped (5 seeds each), ranking by training loss put 79.0 % "
    "wrong labels among as many first images as there were wrong labels, level with confident learning (the same "
    "images in 14 of 15 runs), ahead of self-influence (78.0 %, paired 95 % interval of the difference -1.9 to "
    "-0.1 points) and random (11.7 %), and it is the cheapest of them")


def review_order(name: str) -> ReviewOrder:
    """The order called ``name``; an unknown name is a :class:`ReviewOrderError` listing the known ones."""
    if name not in ORDERS:
        raise ReviewOrderError(f"unknown review order {name!r} (expected one of {', '.join(ORDERS)})")
    return ORDERS[name]


def rank(name: str, values: ReviewValues, seed: int = 0) -> Ranking:
    """Rank the samples of ``values`` by the order ``name``: positions, most suspicious first."""
    order = review_order(name)
    missing = [field for field in order.needs if getattr(values, field) is None]
    if missing:
        raise ReviewOrderError(f"review order {name!r} needs {', '.join(missing)}, which these values lack")
    return order.rank(values, int(seed))


def ranks_of(positions) -> np.ndarray:
    """Per sample, its 1-based place in ``positions`` (1 = reviewed first)."""
    positions = np.asarray(positions)
    ranks = np.empty(len(positions), dtype=np.int64)
    ranks[positions] = np.arange(1, len(positions) + 1)
    return ranks
