"""Self-influence: how far the model had to bend to fit each sample's own label.

    score_i = -g_i . (H + lambda I)^-1 g_i / N   (<= 0)

is the first-order change of sample i's own training loss if it were up-weighted (Koh and
Liang 2017, section 5.4, "fixing mislabeled examples"), in the sign convention of
:mod:`robustmri.influence`: a wrong label is fitted against the evidence of the other samples
and gets the most negative score. Used where no clean validation set exists (label review).
"""

from __future__ import annotations

import numpy as np
from torch import nn

from robustmri.data.batching import item_batches
from robustmri.influence.adapter import FinalLayer, LastLayerModel
from robustmri.influence.last_layer import SoftmaxLastLayer
from robustmri.influence.scores import collect_features, self_influence_of
from robustmri.influence.solvers import DEFAULT_DAMPING, ExactSolver


def last_layer_problem(model: nn.Module | LastLayerModel, images: np.ndarray, labels, batch_size: int = 64,
                       device="cpu") -> SoftmaxLastLayer:
    """The final layer's closed forms on every image [N, 1, H, W] and its label (one feature pass); its
    ``probabilities`` are the model's softmax."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    final = FinalLayer.of(model)
    items = [{"image": image, "label": label, "id": k} for k, (image, label) in enumerate(zip(images, labels))]
    features, feature_labels, _ = collect_features(final, item_batches(items, batch_size), device)
    return SoftmaxLastLayer.from_linear(final.layer, features.double(), feature_labels)


def self_influence_scores(model: nn.Module | LastLayerModel, images: np.ndarray, labels,
                          damping: float = DEFAULT_DAMPING, batch_size: int = 64, device="cpu") -> np.ndarray:
    """``-g_i . (H + damping I)^-1 g_i / N`` for every image [N, 1, H, W], one Cholesky factor for all."""
    solver = ExactSolver(damping)  # refuses a non-positive damping before any work
    problem = last_layer_problem(model, images, labels, batch_size, device)
    return self_influence_of(problem, solver.factor(problem)).numpy()
