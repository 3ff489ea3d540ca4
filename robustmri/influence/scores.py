"""Influence scores of training samples and the input gradients of ISP, for any classifier.

Every function takes a network (wrapped in :class:`robustmri.influence.adapter.FinalLayer`
when it is not one already) and follows the sign convention of :mod:`robustmri.influence`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from robustmri.influence.adapter import FinalLayer, LastLayerModel
from robustmri.influence.last_layer import SoftmaxLastLayer, augment
from robustmri.influence.solvers import ExactSolver, Solver
from robustmri.networks import eval_mode


def influence_scores(problem: SoftmaxLastLayer, s: torch.Tensor) -> torch.Tensor:
    """score_i = g_i . s / N for every training sample in one batched product (see module doc)."""
    residual = problem.residuals(problem.features, problem.labels)  # [N, C]
    return (residual * (problem.features @ s.T)).sum(1) / problem.n


def self_influence_of(problem: SoftmaxLastLayer, factor: torch.Tensor) -> torch.Tensor:
    """``-g_i . (H + lambda I)^-1 g_i / problem.n`` for the problem's rows, ``factor`` the Cholesky factor of
    ``H + lambda I`` (:meth:`robustmri.influence.solvers.ExactSolver.factor`); float64 [rows]."""
    scores = torch.empty(len(problem.labels), dtype=torch.float64)
    for start in range(0, len(scores), 256):  # bounded memory: 256 gradients of C (d + 1) at a time
        rows = torch.arange(start, min(start + 256, len(scores)))
        gradients = problem.per_sample_gradients(rows).reshape(len(rows), -1)
        solved = torch.cholesky_solve(gradients.T, factor).T
        scores[rows] = (-(gradients * solved).sum(1) / problem.n).to(scores.dtype)
    return scores


@torch.no_grad()
def collect_features(model: nn.Module | LastLayerModel, batches, device="cpu",
                     desc: str = "influence: features") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Penultimate features, labels and sample ids of every batch, the network in eval mode.

    ``batches`` yields dicts with ``image``, ``label`` and optionally ``id``; a progress bar
    named ``desc`` counts them on an interactive terminal.
    """
    from robustmri.progress import progress

    final = FinalLayer.of(model)
    features, labels, ids = [], [], []
    with eval_mode(final.network):
        for batch in progress(batches, desc):
            features.append(final(torch.as_tensor(batch["image"]).to(device))[0].float().cpu())
            labels.append(torch.as_tensor(batch["label"]).reshape(-1).long())
            if "id" in batch:
                ids.append(torch.as_tensor(batch["id"]).reshape(-1).long())
    return torch.cat(features), torch.cat(labels), torch.cat(ids) if ids else torch.arange(sum(map(len, labels)))


def input_gradients(model: nn.Module | LastLayerModel, images: torch.Tensor, labels: torch.Tensor,
                    s: torch.Tensor) -> torch.Tensor:
    """grad_x (g_i . s) for a whole batch in one backward pass.

    In eval mode the samples do not interact (BatchNorm uses running statistics), so the
    gradient of the sum is every sample's own gradient. ``s`` is held constant.
    """
    final = FinalLayer.of(model)
    needs_grad = [p for p in final.network.parameters() if p.requires_grad]
    with eval_mode(final.network):
        try:
            for p in needs_grad:  # only the input gradient is wanted: skip every weight gradient
                p.requires_grad_(False)
            x = images.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                augmented = augment(final(x)[0])
                logits = final.layer(augmented[:, :-1])  # = the network's logits (FinalLayer checks it)
                targets = nn.functional.one_hot(labels.to(logits.device).long().reshape(-1), logits.shape[1])
                residual = torch.softmax(logits, 1) - targets.to(logits.dtype)
                objective = (residual * (augmented @ s.to(augmented.device, augmented.dtype).T)).sum()
                (gradient,) = torch.autograd.grad(objective, x)
        finally:
            for p in needs_grad:
                p.requires_grad_(True)
    return gradient


def solve(solver: Solver, problem: SoftmaxLastLayer, v: torch.Tensor,
          factor: torch.Tensor | None = None) -> torch.Tensor:
    """``solver(problem, v)`` under a one-step progress bar (its elapsed time is what a long solve shows); the
    exact solver uses ``factor`` (the Cholesky factor of its ``H + lambda I``) when one is given."""
    from robustmri.progress import progress

    with progress(desc=f"influence: solve ({type(solver).__name__})", total=1, unit="solve") as bar:
        s = solver.solve_factored(factor, v) if factor is not None and isinstance(solver, ExactSolver) else \
            solver(problem, v)
        bar.update(1)
    return s


def self_influence_factor(solver: Solver, problem: SoftmaxLastLayer) -> torch.Tensor:
    """The Cholesky factor of ``H + lambda I`` with the solver's damping (self-influence needs it): the exact
    solver's own, so that influence and self-influence share one Hessian."""
    exact = solver if isinstance(solver, ExactSolver) else ExactSolver(solver.damping)
    return exact.factor(problem)


@dataclass
class InfluenceResult:
    scores: torch.Tensor  # [N], positive = helpful
    ids: torch.Tensor  # [N] sample ids, aligned with scores
    labels: torch.Tensor
    s: torch.Tensor  # (H + lambda I)^-1 v, [C, d + 1]
    validation_gradient: torch.Tensor  # v, [C, d + 1]
    damping: float
    self_influence: torch.Tensor | None = None  # [N] float64, when asked for (:func:`self_influence_of`)


def compute_influence(model: nn.Module | LastLayerModel, train_batches, val_batches, solver: Solver | None = None,
                      device="cpu", self_influence: bool = False) -> InfluenceResult:
    """Scores of all training samples on the mean clean-validation loss (one feature pass each).

    With ``self_influence`` also every sample's self-influence from the same features and,
    for the exact solver, the same Cholesky factor.
    """
    final = FinalLayer.of(model)
    solver = solver or ExactSolver()
    train_features, train_labels, ids = collect_features(final, train_batches, device, "influence: training features")
    val_features, val_labels, _ = collect_features(final, val_batches, device, "influence: validation features")
    problem = SoftmaxLastLayer.from_linear(final.layer, train_features.double(), train_labels)
    v = problem.mean_gradient(val_features.double(), val_labels)
    factor = self_influence_factor(solver, problem) if self_influence else None
    s = solve(solver, problem, v, factor)
    return InfluenceResult(influence_scores(problem, s).float(), ids, train_labels, s.float(), v.float(),
                           solver.damping, None if factor is None else self_influence_of(problem, factor))


def influence_ranking(scores) -> np.ndarray:
    """Positions from the most harmful (lowest score) to the most helpful; ties keep input order."""
    return np.argsort(np.asarray(scores, dtype=np.float64), kind="stable")
