"""The influence engine against independent references: autograd, exact solves, leave-one-out retraining."""

import numpy as np
import pytest
import torch
from torch import nn

from robustmri.influence import (
    ConjugateGradientSolver,
    ExactSolver,
    LissaSolver,
    SoftmaxLastLayer,
    influence_scores,
    input_gradients,
)
from robustmri.networks import PaperCNN


@pytest.fixture(autouse=True)
def float64():
    """The references are compared at 1e-10: compute in double precision."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _problem(n=40, d=5, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, d, generator=g)
    labels = torch.randint(c, (n,), generator=g)
    weight, bias = torch.randn(c, d, generator=g), torch.randn(c, generator=g)
    return SoftmaxLastLayer(weight, bias, features, labels), features, labels, weight, bias


def _loss(theta_flat, features, labels, c, reduction="mean"):
    theta = theta_flat.reshape(c, -1)
    logits = features @ theta[:, :-1].T + theta[:, -1]
    return nn.functional.cross_entropy(logits, labels, reduction=reduction)


def test_closed_form_per_sample_gradients_equal_autograd():
    problem, features, labels, weight, bias = _problem()
    closed = problem.per_sample_gradients()
    theta = torch.cat([weight, bias[:, None]], 1).reshape(-1)
    for i in range(len(labels)):
        t = theta.clone().requires_grad_()
        (grad,) = torch.autograd.grad(_loss(t, features[i:i + 1], labels[i:i + 1], 3), t)
        assert (closed[i].reshape(-1) - grad).abs().max() < 1e-10


def test_exact_hessian_matches_autograd_hvp():
    problem, features, labels, weight, bias = _problem()
    theta = torch.cat([weight, bias[:, None]], 1).reshape(-1)
    hessian = problem.hessian()
    for seed in range(3):
        vector = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(seed))
        _, reference = torch.autograd.functional.hvp(lambda t: _loss(t, features, labels, 3), theta, vector)
        closed = hessian @ vector
        assert (closed - reference).norm() / reference.norm() < 1e-8
        fast = problem.hvp(vector.reshape(3, -1)).reshape(-1)
        assert (fast - reference).norm() / reference.norm() < 1e-8


def test_hessian_null_space_needs_damping():
    problem, *_ = _problem()
    shift = torch.zeros(3, problem.dim)
    shift[:, 0] = 1.0  # the same vector added to every class row leaves the softmax unchanged
    assert problem.hvp(shift).abs().max() < 1e-12
    with pytest.raises(ValueError, match="damping must be positive"):
        ExactSolver(damping=0.0)


def test_cg_agrees_with_exact():
    problem, *_ = _problem()
    v = torch.randn(3, problem.dim, generator=torch.Generator().manual_seed(1))
    exact = ExactSolver(0.05)(problem, v)
    cg = ConjugateGradientSolver(0.05)(problem, v)
    assert (cg - exact).norm() / exact.norm() < 1e-8


def test_lissa_reference_setting_converges_to_damp_times_scale():
    # reference setting: damp 0.05, scale 50, batch 10, depth N / 10 (effective damping 2.5)
    problem, *_ = _problem(n=600, d=30, seed=2)
    v = torch.randn(3, problem.dim, generator=torch.Generator().manual_seed(3)) * 0.1
    lissa = LissaSolver(damp=0.05, scale=50, batch_size=10)
    assert lissa.damping == pytest.approx(2.5)
    estimate = lissa(problem, v)
    exact = ExactSolver(lissa.damping)(problem, v)
    cosine = torch.nn.functional.cosine_similarity(estimate.reshape(1, -1), exact.reshape(1, -1)).item()
    assert cosine >= 0.98
    far = ExactSolver(0.01)(problem, v)  # a different damping gives a different answer
    assert torch.nn.functional.cosine_similarity(estimate.reshape(1, -1), far.reshape(1, -1)).item() < cosine


def test_batched_scores_equal_explicit_gradient_products():
    problem, *_ = _problem()
    s = torch.randn(3, problem.dim, generator=torch.Generator().manual_seed(5))
    explicit = (problem.per_sample_gradients() * s).sum((1, 2)) / problem.n
    assert torch.allclose(influence_scores(problem, s), explicit, atol=1e-14)


def _fit_regularised(features, labels, c, lam, weights=None, start=None):
    """L-BFGS (scipy, autograd gradients) on sum_j w_j L_j / N + lam / 2 |theta|^2, to tight tolerance."""
    from scipy.optimize import minimize

    n, d = features.shape
    weights = torch.ones(n) if weights is None else weights

    def objective(flat):
        t = torch.from_numpy(flat).requires_grad_(True)
        value = (_loss(t, features, labels, c, "none") * weights).sum() / n + 0.5 * lam * (t * t).sum()
        (grad,) = torch.autograd.grad(value, t)
        return value.item(), grad.numpy()

    x0 = np.zeros(c * (d + 1)) if start is None else start.numpy()
    result = minimize(objective, x0, jac=True, method="L-BFGS-B", options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 1000})
    return torch.from_numpy(result.x)


def test_scores_agree_with_leave_one_out_retraining():
    g = torch.Generator().manual_seed(11)
    n, d, c, lam = 50, 3, 3, 0.05
    centres = torch.randn(c, d, generator=g) * 1.5
    labels = torch.randint(c, (n,), generator=g)
    features = centres[labels] + torch.randn(n, d, generator=g)
    val_labels = torch.randint(c, (30,), generator=g)
    val_features = centres[val_labels] + torch.randn(30, d, generator=g)

    theta = _fit_regularised(features, labels, c, lam)
    matrix = theta.reshape(c, d + 1)
    problem = SoftmaxLastLayer(matrix[:, :-1], matrix[:, -1], features, labels)
    v = problem.mean_gradient(val_features, val_labels)
    predicted = influence_scores(problem, ExactSolver(lam)(problem, v))

    base = _loss(theta, val_features, val_labels, c).item()
    actual = []
    for i in range(n):  # remove sample i: its weight in (1/N) sum_j w_j L_j goes to 0
        weights = torch.ones(n)
        weights[i] = 0.0
        refit = _fit_regularised(features, labels, c, lam, weights, start=theta)
        actual.append(_loss(refit, val_features, val_labels, c).item()
                      - base)
    pearson = np.corrcoef(predicted.numpy(), np.array(actual))[0, 1]
    assert pearson >= 0.99


def test_mislabelled_point_is_harmful():
    g = torch.Generator().manual_seed(4)
    n, d, c = 90, 2, 3
    centres = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]])
    labels = torch.arange(n) % c
    features = centres[labels] + 0.7 * torch.randn(n, d, generator=g)
    labels[0] = 1  # sample 0 sits in class 0's cluster
    val_labels = torch.arange(30) % c
    val_features = centres[val_labels] + 0.7 * torch.randn(30, d, generator=g)
    theta = _fit_regularised(features, labels, c, 0.01).reshape(c, d + 1)
    problem = SoftmaxLastLayer(theta[:, :-1], theta[:, -1], features, labels)
    scores = influence_scores(problem, ExactSolver(0.01)(problem, problem.mean_gradient(val_features, val_labels)))
    assert scores[0] < 0
    assert scores[0] == scores.min()


def test_batched_input_gradient_equals_per_sample_double_backward():
    torch.manual_seed(0)
    model = PaperCNN(spatial_size=32, padding=2).double()
    model.train()
    model(torch.rand(8, 1, 32, 32))  # give BatchNorm non-trivial running statistics
    model.eval()
    images, labels = torch.rand(4, 1, 32, 32), torch.tensor([0, 2, 1, 2])
    s = torch.randn(3, model.feature_dim + 1)
    batched = input_gradients(model, images, labels, s)
    params = [model.classifier.weight, model.classifier.bias]
    for i in range(len(labels)):
        x = images[i:i + 1].clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(model(x), labels[i:i + 1])
        gw, gb = torch.autograd.grad(loss, params, create_graph=True)
        dot = (gw * s[:, :-1]).sum() + (gb * s[:, -1]).sum()
        (reference,) = torch.autograd.grad(dot, x)
        assert (batched[i] - reference[0]).abs().max() < 1e-10
    assert not model.training
