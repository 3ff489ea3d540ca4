"""ISP: selection, the perturbation step against the influence prediction, its budget in
intensity units, orientation and no-signal control, and isp.json end to end."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from robustmri.influence import ExactSolver, SoftmaxLastLayer, influence_scores, input_gradients
from robustmri.methods.isp import (
                                   ISPHandler,
                                   control_step,
                                   per_image_norms,
                                   perturb,
                                   perturbation_step,
                                   select_for_perturbation,
)
from robustmri.networks import PaperCNN

from helpers import TINY, output_dirs, run_in_process
from test_isr import influence_outputs, items, tiny_model


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


def _influence_gradients(damping: float, n: int = 12, seed: int = 0):
    """Images away from the [0, 1] bounds (in [0.4, 0.6]), labels and their ISP input gradients for the exact
    solver at ``damping``, on a small random PaperCNN (float64)."""
    torch.manual_seed(seed)
    model = PaperCNN(spatial_size=32, padding=2).double()
    model.train()
    model(torch.rand(16, 1, 32, 32, dtype=torch.float64))
    model.eval()
    x = 0.4 + 0.2 * torch.rand(n, 1, 32, 32, dtype=torch.float64)
    y = torch.arange(n) % 3
    val_x, val_y = torch.rand(8, 1, 32, 32, dtype=torch.float64), torch.arange(8) % 3
    with torch.no_grad():
        train_h, val_h = model.features(x), model.features(val_x)
    problem = SoftmaxLastLayer(model.classifier.weight.detach(), model.classifier.bias.detach(), train_h, y)
    s = ExactSolver(damping)(problem, problem.mean_gradient(val_h, val_y))
    return x, input_gradients(model, x, y, s)


def test_unbudgeted_default_is_the_authors_step_bit_for_bit():
    torch.manual_seed(3)
    x, g = torch.rand(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    assert torch.equal(perturb(x, g), (x + 0.1 * g).clamp(0.0, 1.0))
    assert torch.equal(perturb(x, g, seed=5, ids=[9, 8, 7, 6]), (x + 0.1 * g).clamp(0.0, 1.0))  # no control: unused
    assert torch.equal(perturbation_step(g), 0.1 * g)


def test_budgeted_step_has_the_budgets_norm_whatever_the_damping_and_the_gradient_scale():
    unbudgeted = []
    for damping in (0.01, 2.5):
        x, g = _influence_gradients(damping)
        assert (g.reshape(len(g), -1).abs().amax(1) > 0).all()
        unbudgeted.append(per_image_norms(perturb(x, g) - x)[1])
        for scale in (1.0, 1e3):
            linf, _ = per_image_norms(perturb(x, scale * g, budget=0.05, norm="linf") - x)
            torch.testing.assert_close(linf, torch.full_like(linf, 0.05), rtol=0, atol=1e-12)
            _, l2 = per_image_norms(perturb(x, scale * g, budget=0.3, norm="l2") - x)
            torch.testing.assert_close(l2, torch.full_like(l2, 0.3), rtol=0, atol=1e-12)
    # what the budget removes: the unbudgeted step's size follows the damping
    assert not torch.allclose(unbudgeted[0], unbudgeted[1], rtol=0.1)
    # every pixel with a gradient moves by exactly the L-inf budget; a zero gradient gives a zero step
    x, g = _influence_gradients(0.01, n=2)
    g[1] = 0.0
    delta = perturb(x, g, budget=0.05) - x
    torch.testing.assert_close(delta[0].abs(), torch.full_like(delta[0], 0.05), rtol=0, atol=1e-12)
    assert torch.equal(perturbation_step(g, budget=0.3, norm="l2")[1], torch.zeros_like(g[1]))
    assert torch.equal(perturbation_step(g, budget=0.05)[1], torch.zeros_like(g[1]))


@pytest.mark.parametrize("options", [{}, {"direction": "sign", "step": 0.02}, {"budget": 0.05, "norm": "linf"},
                                     {"budget": 0.3, "norm": "l2"}], ids=["gradient", "sign", "linf", "l2"])
def test_harmful_orientation_is_exactly_the_negative_step(options):
    x, g = _influence_gradients(0.01)
    g = g / g.abs().max()  # unbudgeted step at most 0.1: no clipping at the bounds
    helpful = perturbation_step(g, **options)
    harmful = perturbation_step(g, **options, orientation="harmful")
    assert helpful.abs().max() > 0 and torch.equal(harmful, -helpful)
    torch.testing.assert_close(perturb(x, g, **options, orientation="harmful") - x, -(perturb(x, g, **options) - x))


@pytest.mark.parametrize("options, norm", [({}, "l2"), ({"direction": "sign", "step": 0.02}, "l2"),
                                           ({"budget": 0.05, "norm": "linf"}, "linf"),
                                           ({"budget": 0.3, "norm": "l2"}, "l2")],
                         ids=["gradient", "sign", "linf", "l2"])
def test_control_has_the_influence_steps_norms_and_a_random_direction(options, norm):
    x, g = _influence_gradients(0.01)
    g = g / g.abs().max()
    ids = list(range(100, 100 + len(x)))
    influence = perturb(x, g, **options) - x
    control = perturb(x, g, **options, control=True, seed=1, ids=ids) - x
    column = {"linf": 0, "l2": 1}[norm]
    torch.testing.assert_close(per_image_norms(control)[column], per_image_norms(influence)[column], rtol=0,
                               atol=1e-12)
    if norm == "linf":  # random signs: every pixel moves by the budget
        torch.testing.assert_close(control.abs(), torch.full_like(control, 0.05), rtol=0, atol=1e-12)
    cosine = nn.functional.cosine_similarity(control.reshape(len(x), -1), influence.reshape(len(x), -1), dim=1)
    assert cosine.abs().max() < 0.2  # 1024 pixels: |cos| of independent directions is about 0.03
    # reproducible for a seed, independent of batch order, different for another seed
    assert torch.equal(perturb(x, g, **options, control=True, seed=1, ids=ids) - x, control)
    order = list(reversed(range(len(x))))
    shuffled = perturb(x[order], g[order], **options, control=True, seed=1, ids=[ids[k] for k in order]) - x[order]
    torch.testing.assert_close(shuffled, control[order], rtol=0, atol=1e-15)
    other = perturb(x, g, **options, control=True, seed=2, ids=ids) - x
    assert not torch.allclose(other, control)
    # the direction ignores orientation; only the norms come from the influence step
    assert torch.equal(control_step(perturbation_step(g, **options), norm, 1, ids),
                       control_step(perturbation_step(g, **options, orientation="harmful"), norm, 1, ids))


@pytest.mark.parametrize("options, match", [({"budget": 0.05, "step": 0.2}, "budget sets the step"),
                                            ({"budget": 0.05, "direction": "sign"}, "budget sets the step"),
                                            ({"budget": 0.05, "epsilon": 0.01}, "budget sets the step"),
                                            ({"budget": 0.0}, "budget must be positive"),
                                            ({"budget": 0.05, "norm": "l1"}, "norm must be"),
                                            ({"orientation": "away"}, "orientation must be"),
                                            ({"control": "maybe"}, "control must be")])
def test_isp_handler_rejects_unknown_or_contradictory_options(options, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        ISPHandler(1, [], [], str(tmp_path), **options)
    handler = ISPHandler(1, [], [], str(tmp_path), budget=0.05, norm="l2", orientation="harmful", control="true")
    assert handler.options["control"] is True  # as the command line passes it


def _run_handler(tmp_path, name: str, **options) -> tuple[ISPHandler, list[dict], dict]:
    train = items(10, 0)
    handler = ISPHandler(1, train, items(6, 1), str(tmp_path / name), ratio=0.5, batch_size=4, **options)
    handler.run(None, tiny_model(), torch.device("cpu"))
    return handler, train, json.loads((tmp_path / name / "influence_summary.json").read_text())


@pytest.mark.slow
def test_isp_handler_records_options_and_achieved_norms_and_control_keeps_the_selection(tmp_path):
    original = items(10, 0)
    _, budgeted, summary = _run_handler(tmp_path, "linf", budget=0.05)
    assert summary["isp_budget"] == 0.05 and summary["isp_norm"] == "linf" and summary["perturbed"] == 5
    assert summary["isp_orientation"] == "helpful" and summary["isp_control"] is False
    assert summary["perturbation_linf"] == pytest.approx({"mean": 0.05, "min": 0.05, "max": 0.05}, abs=1e-6)
    changed = {k for k, (a, b) in enumerate(zip(original, budgeted)) if not np.array_equal(a["image"], b["image"])}
    assert len(changed) == 5
    _, controlled, control_summary = _run_handler(tmp_path, "control", budget=0.05, control=True, seed=3)
    assert control_summary["isp_control"] is True and control_summary["seed"] == 3
    assert control_summary["perturbation_linf"] == pytest.approx(summary["perturbation_linf"], abs=1e-6)
    assert {k for k, (a, b) in enumerate(zip(original, controlled))
            if not np.array_equal(a["image"], b["image"])} == changed  # same images, another direction
    assert not all(np.array_equal(budgeted[k]["image"], controlled[k]["image"]) for k in changed)
    _, _, default = _run_handler(tmp_path, "default")
    assert default["isp_budget"] is None and default["isp_step"] == 0.1 and default["isp_direction"] == "gradient"
    assert default["perturbation_l2"]["max"] >= default["perturbation_l2"]["mean"] >= default["perturbation_l2"]["min"]
