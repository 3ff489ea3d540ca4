"""ISP: selection, the perturbation step against the influence prediction, and isp.json end to end."""

import numpy as np
import pytest
import torch
from torch import nn

from robustmri.influence import ExactSolver, SoftmaxLastLayer, influence_scores, input_gradients
from robustmri.methods.isp import perturb, select_for_perturbation
from robustmri.networks import PaperCNN

from helpers import TINY, output_dirs, run_in_process
from test_isr import influence_outputs


def test_selection_and_perturbation_options():
    scores = torch.tensor([0.3, -2.0, 1.0, -0.1, 5.0])
    assert select_for_perturbation(scores, 0.4, "harmful").tolist() == [1, 3]
    assert select_for_perturbation(scores, 0.4, "influential").tolist() == [4, 1]
    assert len(select_for_perturbation(scores, 1.0)) == 5
    x = torch.full((1, 4, 4), 0.5)
    g = torch.linspace(-3, 3, 16).reshape(1, 4, 4)
    assert torch.allclose(perturb(x, g, step=0.1, epsilon=0.05) - x, (0.1 * g).clamp(-0.05, 0.05))
    assert torch.allclose((perturb(x, g, step=0.02, direction="sign") - x).abs(), torch.tensor(0.02))
    assert perturb(x, 10 * g, step=0.1).min() == 0.0 and perturb(x, 10 * g, step=0.1).max() == 1.0
    quantised = perturb(x, g, step=0.001, quantisation="uint8_truncate")
    assert torch.allclose(quantised * 255, torch.floor(quantised * 255))


def _fit_last_layer(features, labels, lam, c=3):
    """Damped multinomial logistic regression by L-BFGS (independent of the closed forms)."""
    from scipy.optimize import minimize

    features = features.double()
    d = features.shape[1]

    def objective(flat):
        t = torch.from_numpy(flat).requires_grad_(True)
        theta = t.reshape(c, d + 1)
        value = nn.functional.cross_entropy(features @ theta[:, :-1].T + theta[:, -1], labels) + 0.5 * lam * (t * t).sum()
        (grad,) = torch.autograd.grad(value, t)
        return value.item(), grad.numpy()

    result = minimize(objective, np.zeros(c * (d + 1)), jac=True, method="L-BFGS-B",
                      options={"gtol": 1e-10, "ftol": 1e-14, "maxiter": 5000})
    return torch.from_numpy(result.x).reshape(c, d + 1)


def test_isp_step_lowers_the_validation_loss():
    torch.manual_seed(0)
    model = PaperCNN(spatial_size=32, padding=2).double()
    model.train()
    model(torch.rand(16, 1, 32, 32, dtype=torch.float64))
    model.eval()
    lam = 0.05
    train_x, train_y = torch.rand(40, 1, 32, 32, dtype=torch.float64), torch.randint(3, (40,))
    val_x, val_y = torch.rand(20, 1, 32, 32, dtype=torch.float64), torch.randint(3, (20,))
    with torch.no_grad():
        train_h, val_h = model.features(train_x), model.features(val_x)
    theta = _fit_last_layer(train_h, train_y, lam)
    with torch.no_grad():
        model.classifier.weight.copy_(theta[:, :-1])
        model.classifier.bias.copy_(theta[:, -1])

    def val_loss(t):
        return nn.functional.cross_entropy(val_h @ t[:, :-1].T + t[:, -1], val_y).item()

    problem = SoftmaxLastLayer(theta[:, :-1], theta[:, -1], train_h, train_y)
    s = ExactSolver(lam)(problem, problem.mean_gradient(val_h, val_y))
    before = influence_scores(problem, s)
    perturbed = perturb(train_x, input_gradients(model, train_x, train_y, s), step=1e-3)
    with torch.no_grad():
        new_h = model.features(perturbed)
    after = influence_scores(SoftmaxLastLayer(theta[:, :-1], theta[:, -1], new_h, train_y), s)
    predicted_change = (before - after).sum().item()  # remove each old sample, add its perturbed version
    assert predicted_change < 0
    actual_change = val_loss(_fit_last_layer(new_h, train_y, lam)) - val_loss(theta)
    assert actual_change < 0
    assert actual_change == pytest.approx(predicted_change, rel=0.2)


@pytest.mark.slow
def test_isp_json_perturbs_every_training_image(tmp_path):
    run_in_process("training", "configs/isp.json", "--epochs", "2", "--influence_epoch", "1", *TINY,
           *output_dirs(tmp_path))
    rows, summary, linf = influence_outputs(tmp_path, "perturbation_linf")
    assert summary["method"] == "ISP" and summary["n_train"] == len(rows)
    assert max(linf) > 0
