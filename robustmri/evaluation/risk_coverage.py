"""Risk-coverage curves and the area under them (AURC): does an abstention score refuse the wrong answers?

An abstention score orders the slices (higher = less assessable, :mod:`robustmri.abstention`). Accepting
the ``k`` lowest-scored slices of ``N`` covers ``k / N`` of them; the *risk* at that coverage is the error
rate among the accepted ones. The curve has one point per ``k = 1 .. N`` and
``AURC = 1/N sum_k risk(k)`` (Geifman, Uziel, El-Yaniv, "Bias-Reduced Uncertainty Estimation for Deep
Neural Classifiers", ICLR 2019): lower is better. A score that orders the slices at random has an
expected risk equal to the error rate at every coverage, so its AURC is about the error rate.

*Excess AURC* subtracts the AURC of the oracle ordering (every correct slice before every wrong one),
the best any score can do with these answers: 0 is a perfect score, and it compares scores across
sets whose error rates differ.

Ties: slices with equal scores are accepted together or not at all by any threshold, so their order
must not matter. Within a run of tied scores the curve takes the *expected* risk over every order of
the tied slices: the tied errors are spread evenly over the run (after ``j`` of a run of ``m`` slices
holding ``e`` errors, ``j e / m`` of them are counted). The curve, and so the AURC, are then the same
for any order of equal scores; a constant score gives the error rate at every coverage exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RiskCoverage:
    """A risk-coverage curve: ``coverage[k-1] = k / N`` and ``risk[k-1]`` = error rate of the ``k`` accepted."""

    coverage: np.ndarray
    risk: np.ndarray

    @property
    def aurc(self) -> float:
        return float(np.mean(self.risk))

    def risk_at(self, coverage: float) -> float:
        """The risk when accepting the smallest number of slices that covers at least ``coverage`` of them."""
        if not 0.0 < coverage <= 1.0:
            raise ValueError(f"coverage must be in (0, 1], got {coverage}")
        k = int(np.ceil(coverage * len(self.risk) - 1e-9))
        return float(self.risk[max(k, 1) - 1])


def _check(scores, correct) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    correct = np.asarray(correct).reshape(-1)
    if correct.dtype != bool:
        if not np.isin(correct, (0, 1)).all():
            raise ValueError("correct must be booleans (or 0/1): whether each slice's answer is right")
        correct = correct.astype(bool)
    if len(scores) != len(correct) or not len(scores):
        raise ValueError(f"expected as many scores as answers (at least one), got {len(scores)} and {len(correct)}")
    if not np.isfinite(scores).all():
        raise ValueError("scores hold NaN or Inf: no order to accept the slices in")
    return scores, correct


def risk_coverage_curve(scores, correct) -> RiskCoverage:
    """The curve of accepting the lowest ``scores`` first; ``correct`` [N]: whether each slice's answer is right.

    Tied scores get the expected risk over their orders (see the module's docstring)."""
    scores, correct = _check(scores, correct)
    order = np.argsort(scores, kind="stable")
    sorted_scores, errors = scores[order], (~correct[order]).astype(np.float64)
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    sizes = np.diff(np.r_[starts, len(scores)])
    group_errors = np.add.reduceat(errors, starts)
    errors_before = np.r_[0.0, np.cumsum(group_errors)[:-1]]
    group = np.repeat(np.arange(len(starts)), sizes)
    taken = np.arange(len(scores)) - starts[group] + 1  # slices accepted so far from the slice's own tie group
    accepted_errors = errors_before[group] + taken * group_errors[group] / sizes[group]
    k = np.arange(1, len(scores) + 1, dtype=np.float64)
    return RiskCoverage(coverage=k / len(scores), risk=accepted_errors / k)


def aurc(scores, correct) -> float:
    """Area under the risk-coverage curve: the mean risk over the ``N`` coverages ``k / N`` (lower is better)."""
    return risk_coverage_curve(scores, correct).aurc


def oracle_aurc(correct) -> float:
    """The AURC of the best possible ordering of these answers: every correct slice before every wrong one."""
    correct = np.asarray(correct).reshape(-1).astype(bool)
    return aurc((~correct).astype(np.float64), correct)


def excess_aurc(scores, correct) -> float:
    """``aurc(scores, correct) - oracle_aurc(correct)``: 0 for a score that puts every wrong answer last."""
    return aurc(scores, correct) - oracle_aurc(correct)


def risk_coverage_figure(curves: dict[str, RiskCoverage], path: str | os.PathLike, title: str = "",
                         error_rate: float | None = None) -> str:
    """A PNG of risk (y) against coverage (x), one line per named curve with its AURC in the legend.

    ``error_rate``: drawn as a dotted line, the expected curve of a score that orders at random."""
    from robustmri.outputs import plt, save_figure

    figure, axis = plt.subplots(figsize=(6.4, 4.6))
    for name, curve in curves.items():
        axis.plot(curve.coverage, 100 * curve.risk, linewidth=1.2, label=f"{name} (AURC {100 * curve.aurc:.1f} %)")
    if error_rate is not None:
        axis.axhline(100 * error_rate, color="grey", linestyle=":", linewidth=1, label="random order (error rate)")
    axis.set_xlim(0, 1)
    axis.set_ylim(bottom=0)
    axis.set_xlabel("coverage (share of slices accepted, lowest score first)")
    axis.set_ylabel("risk: error % among accepted slices")
    axis.set_title(title or "risk-coverage")
    axis.legend(fontsize=8)
    save_figure(figure, path)
    return os.fspath(path)
