"""The final linear layer with softmax cross-entropy: closed forms for influence (no MONAI inside).

Parameters theta are the final layer's weight and bias, held as one matrix
``W~ = [W | b]`` of shape [C, d + 1] (flattened row-major when a vector is needed);
``h~ = [h; 1]`` are the penultimate features with a constant 1 appended.

For softmax cross-entropy the top layer has closed forms:

- per-sample gradient     g_i = (p_i - y_i) outer h~_i
- training-loss Hessian   H = (1/N) sum_i kron(diag(p_i) - p_i p_i^T, h~_i h~_i^T)

``H`` is singular (adding one vector to every class's row leaves the softmax
unchanged), so every solver works with ``H + lambda I``.

The scores built from these closed forms follow the one sign convention stated in
:mod:`robustmri.influence` (positive = helpful).
"""

from __future__ import annotations

import torch
from torch import nn


def augment(features: torch.Tensor) -> torch.Tensor:
    """Append the constant 1 that multiplies the bias: h -> [h; 1]."""
    return torch.cat([features, features.new_ones(features.shape[0], 1)], dim=1)


class SoftmaxLastLayer:
    """The final linear layer with softmax cross-entropy, on cached training features.

    Everything influence needs (gradients, Hessian-vector products, the Hessian) is a
    closed form in the features, so no network pass is needed after caching them.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, labels: torch.Tensor):
        dtype = features.dtype
        # [C, d + 1]
        self.theta = torch.cat([weight.detach(), bias.detach()[:, None]], dim=1).to(features.device, dtype)
        self.features = augment(features.detach())  # [N, d + 1]
        self.labels = labels.detach().long()
        self.num_classes, self.dim = self.theta.shape
        self.n = self.features.shape[0]
        self.probabilities = self.predict(self.features)  # [N, C], fixed: theta does not move

    @classmethod
    def from_linear(cls, layer: nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> "SoftmaxLastLayer":
        if layer.bias is None:
            raise ValueError("the final layer needs a bias (the influence parameters are its weight and bias)")
        return cls(layer.weight, layer.bias, features, labels)

    def predict(self, augmented: torch.Tensor) -> torch.Tensor:
        return torch.softmax(augmented @ self.theta.T, dim=1)

    def residuals(self, augmented: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """p - y, the factor shared by the loss gradients: [M, C]."""
        return self.predict(augmented) - nn.functional.one_hot(labels.long(), self.num_classes).to(augmented.dtype)

    def mean_gradient(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Gradient of the mean cross-entropy over a group (e.g. the validation set): [C, d + 1]."""
        augmented = augment(features.to(self.theta.dtype))
        return self.residuals(augmented, labels).T @ augmented / augmented.shape[0]

    def per_sample_gradients(self, indices=None) -> torch.Tensor:
        """[n, C, d + 1] training gradients; meant for checks: scores never materialise them."""
        features = self.features if indices is None else self.features[indices]
        labels = self.labels if indices is None else self.labels[indices]
        residual = self.residuals(features, labels)
        return residual[:, :, None] * features[:, None, :]

    def hvp(self, vector: torch.Tensor, indices=None) -> torch.Tensor:
        """H V for V of shape [C, d + 1], on all training samples or on ``indices`` (a mini-batch)."""
        features = self.features if indices is None else self.features[indices]
        probabilities = self.probabilities if indices is None else self.probabilities[indices]
        projected = features @ vector.T  # u_i = V h~_i: [M, C]
        curvature = probabilities * projected - probabilities * (probabilities * projected).sum(1, keepdim=True)
        return curvature.T @ features / features.shape[0]

    def hessian(self) -> torch.Tensor:
        """The full [C(d + 1), C(d + 1)] Hessian, built block by block (symmetric blocks once)."""
        c, k = self.num_classes, self.dim
        p = self.probabilities
        blocks = [[None] * c for _ in range(c)]
        for a in range(c):
            for b in range(a, c):
                coefficient = p[:, a] * ((1.0 if a == b else 0.0) - p[:, b])  # (diag(p) - p p^T)[a, b]
                block = (self.features * coefficient[:, None]).T @ self.features / self.n
                blocks[a][b] = block
                blocks[b][a] = block if a == b else block.T
        return torch.cat([torch.cat(row, dim=1) for row in blocks], dim=0).reshape(c * k, c * k)
