"""Influence functions on the final linear layer of a classifier (no MONAI inside).

Parameters theta are the final layer's weight and bias, held as one matrix
``W~ = [W | b]`` of shape [C, d + 1] (flattened row-major when a vector is needed);
``h~ = [h; 1]`` are the penultimate features with a constant 1 appended.

For softmax cross-entropy the top layer has closed forms:

- per-sample gradient     g_i = (p_i - y_i) outer h~_i
- training-loss Hessian   H = (1/N) sum_i kron(diag(p_i) - p_i p_i^T, h~_i h~_i^T)

``H`` is singular (adding one vector to every class's row leaves the softmax
unchanged), so every solver works with ``H + lambda I``.

Sign convention (stated once, used everywhere): with v the gradient of the mean
clean-validation loss and s = (H + lambda I)^-1 v,

    score_i = g_i . s / N

is the first-order change of the validation loss when training sample i is removed.
A positive score means the sample is helpful (removing it would raise the validation
loss); a negative score means it is harmful. It equals -I_up,loss / N of Koh & Liang.
Moving an input along +grad_x(g_i . s) raises its score, i.e. lowers the predicted
validation loss: that is the ISP step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
        self.theta = torch.cat([weight.detach(), bias.detach()[:, None]], dim=1).to(features.device, dtype)  # [C, d + 1]
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

    @property
    def num_parameters(self) -> int:
        return self.num_classes * self.dim

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


# -- inverse-Hessian-vector product strategies --------------------------------------------------


class ExactSolver:
    """(H + lambda I)^-1 v by Cholesky of the closed-form Hessian (float64)."""

    def __init__(self, damping: float = 0.01):
        if damping <= 0:
            raise ValueError("damping must be positive: the last-layer Hessian is singular")
        self.damping = float(damping)

    def factor(self, problem: SoftmaxLastLayer) -> torch.Tensor:
        """Cholesky factor of H + lambda I, for solving many right-hand sides with ``torch.cholesky_solve``."""
        hessian = problem.hessian().double()
        hessian.diagonal().add_(self.damping)
        return torch.linalg.cholesky(hessian)

    def __call__(self, problem: SoftmaxLastLayer, v: torch.Tensor) -> torch.Tensor:
        solution = torch.cholesky_solve(v.double().reshape(-1, 1), self.factor(problem))
        return solution.reshape(v.shape).to(v.dtype)


class LissaSolver:
    """LiSSA (Agarwal et al. 2017) as the authors ran it.

    h_t = v + (1 - damp) h_{t-1} - H_B h_{t-1} / scale with mini-batches B drawn with
    replacement, s = h_T / scale. Its fixed point is (H + damp * scale * I)^-1 v, so the
    effective damping is ``damp * scale`` (2.5 in the reference setting), not ``damp``.
    """

    def __init__(self, damp: float = 0.05, scale: float = 50.0, batch_size: int = 10, depth: int | None = None,
                 repeats: int = 1, seed: int = 0):
        self.damp, self.scale, self.batch_size = float(damp), float(scale), int(batch_size)
        self.depth, self.repeats, self.seed = depth, int(repeats), int(seed)

    @property
    def damping(self) -> float:
        return self.damp * self.scale

    def __call__(self, problem: SoftmaxLastLayer, v: torch.Tensor) -> torch.Tensor:
        depth = self.depth or max(1, math.ceil(problem.n / self.batch_size))
        generator = torch.Generator().manual_seed(self.seed)
        estimates = []
        for _ in range(self.repeats):
            h = v.clone()
            for _ in range(depth):
                batch = torch.randint(problem.n, (self.batch_size,), generator=generator)
                h = v + (1 - self.damp) * h - problem.hvp(h, batch) / self.scale
            estimates.append(h / self.scale)
        return torch.stack(estimates).mean(0)


class ConjugateGradientSolver:
    """(H + lambda I)^-1 v by conjugate gradients on full-batch Hessian-vector products."""

    def __init__(self, damping: float = 0.01, tol: float = 1e-10, max_iter: int = 1000):
        if damping <= 0:
            raise ValueError("damping must be positive: the last-layer Hessian is singular")
        self.damping, self.tol, self.max_iter = float(damping), float(tol), int(max_iter)

    def __call__(self, problem: SoftmaxLastLayer, v: torch.Tensor) -> torch.Tensor:
        def apply(x):
            return problem.hvp(x) + self.damping * x

        x = torch.zeros_like(v)
        r = v.clone()
        p = r.clone()
        rr = (r * r).sum()
        threshold = self.tol ** 2 * (v * v).sum()  # stop at relative residual norm tol
        for _ in range(self.max_iter):
            if rr <= threshold:
                break
            ap = apply(p)
            alpha = rr / (p * ap).sum()
            x = x + alpha * p
            r = r - alpha * ap
            rr_new = (r * r).sum()
            p = r + (rr_new / rr) * p
            rr = rr_new
        return x


SOLVERS = {"exact": ExactSolver, "lissa": LissaSolver, "cg": ConjugateGradientSolver}


def make_solver(name: str = "exact", **kwargs):
    if name not in SOLVERS:
        raise ValueError(f"unknown inverse-Hessian solver {name!r}; expected one of {sorted(SOLVERS)}")
    return SOLVERS[name](**kwargs)


# -- scores and input perturbations -------------------------------------------------------------


def influence_scores(problem: SoftmaxLastLayer, s: torch.Tensor) -> torch.Tensor:
    """score_i = g_i . s / N for every training sample in one batched product (see module doc)."""
    residual = problem.residuals(problem.features, problem.labels)  # [N, C]
    return (residual * (problem.features @ s.T)).sum(1) / problem.n


@torch.no_grad()
def collect_features(model: nn.Module, batches, device="cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Penultimate features, labels and sample ids of every batch, model in eval mode.

    ``batches`` yields dicts with ``image``, ``label`` and optionally ``id``.
    """
    was_training = model.training
    model.eval()
    features, labels, ids = [], [], []
    try:
        for batch in batches:
            features.append(model.features(torch.as_tensor(batch["image"]).to(device)).float().cpu())
            labels.append(torch.as_tensor(batch["label"]).reshape(-1).long())
            if "id" in batch:
                ids.append(torch.as_tensor(batch["id"]).reshape(-1).long())
    finally:
        model.train(was_training)
    return torch.cat(features), torch.cat(labels), torch.cat(ids) if ids else torch.arange(sum(map(len, labels)))


def input_gradients(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """grad_x (g_i . s) for a whole batch in one backward pass.

    In eval mode the samples do not interact (BatchNorm uses running statistics), so the
    gradient of the sum is every sample's own gradient. ``s`` is held constant.
    """
    was_training = model.training
    needs_grad = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    try:
        for p in needs_grad:  # only the input gradient is wanted: skip every weight gradient
            p.requires_grad_(False)
        x = images.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            augmented = augment(model.features(x))
            logits = model.classifier(augmented[:, :-1])
            residual = torch.softmax(logits, 1) - nn.functional.one_hot(labels.long(), logits.shape[1]).to(logits.dtype)
            objective = (residual * (augmented @ s.to(augmented.device, augmented.dtype).T)).sum()
            (gradient,) = torch.autograd.grad(objective, x)
    finally:
        for p in needs_grad:
            p.requires_grad_(True)
        model.train(was_training)
    return gradient


@dataclass
class InfluenceResult:
    scores: torch.Tensor  # [N], positive = helpful
    ids: torch.Tensor  # [N] sample ids, aligned with scores
    labels: torch.Tensor
    s: torch.Tensor  # (H + lambda I)^-1 v, [C, d + 1]
    validation_gradient: torch.Tensor  # v, [C, d + 1]
    damping: float


def compute_influence(model: nn.Module, train_batches, val_batches, solver=None, device="cpu") -> InfluenceResult:
    """Scores of all training samples on the mean clean-validation loss (one feature pass each)."""
    solver = solver or ExactSolver()
    train_features, train_labels, ids = collect_features(model, train_batches, device)
    val_features, val_labels, _ = collect_features(model, val_batches, device)
    classifier = model.classifier
    problem = SoftmaxLastLayer.from_linear(classifier, train_features.double(), train_labels)
    v = problem.mean_gradient(val_features.double(), val_labels)
    s = solver(problem, v)
    return InfluenceResult(influence_scores(problem, s).float(), ids, train_labels, s.float(), v.float(),
                           solver.damping)
