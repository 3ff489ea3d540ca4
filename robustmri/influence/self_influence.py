"""Self-influence: how far the model had to bend to fit each sample's own label.

    score_i = -g_i . (H + lambda I)^-1 g_i / N   (<= 0)

is the first-order change of sample i's own training loss if it were up-weighted (Koh and
Liang 2017, section 5.4, "fixing mislabeled examples"), in the sign convention of
:mod:`robustmri.influence`: a wrong label is fitted against the evidence of the other samples
and gets the most negative score. Used where no clean validation set exists (label review).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from robustmri.data.batching import item_batches
from robustmri.influence.adapter import FinalLayer, LastLayerModel
from robustmri.influence.last_layer import SoftmaxLastLayer
from robustmri.influence.scores import collect_features
from robustmri.influence.solvers import DEFAULT_DAMPING, ExactSolver


def self_influence_scores(model: nn.Module | LastLayerModel, images: np.ndarray, labels,
                          damping: float = DEFAULT_DAMPING, batch_size: int = 64, device="cpu") -> np.ndarray:
    """``-g_i . (H + damping I)^-1 g_i / N`` for every image [N, 1, H, W], one Cholesky factor for all."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    items = [{"image": image, "label": label, "id": k} for k, (image, label) in enumerate(zip(images, labels))]
    scores, _ = self_influence_of_batches(model, item_batches(items, batch_size), damping, device)
    return scores.numpy()


def self_influence_of_batches(model: nn.Module | LastLayerModel, batches, damping: float = DEFAULT_DAMPING,
                              device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Self-influence (float64) and ids of every sample of ``batches`` (dicts with ``image``, ``label``, ``id``)."""
    solver = ExactSolver(damping)  # refuses a non-positive damping before any work
    final = FinalLayer.of(model)
    features, feature_labels, ids = collect_features(final, batches, device, "self-influence: features")
    problem = SoftmaxLastLayer.from_linear(final.layer, features.double(), feature_labels)
    return self_influence_of(problem, solver.factor(problem)), ids


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
