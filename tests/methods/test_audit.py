import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

from robustmri.data.label_noise import flip_labels
from robustmri.influence import compute_influence, influence_ranking
from robustmri.methods.audit import audit_report, loss_ranking, precision_at_k, resolve_ks

from helpers import run_noisy


class LinearOnFeatures(nn.Module):
    """Softmax regression exposing ``features``/``classifier`` like PaperCNN."""

    def __init__(self, dim, classes):
        super().__init__()
        self.classifier = nn.Linear(dim, classes)

    def features(self, x):
        return x.flatten(1)

    def forward(self, x):
        return self.classifier(self.features(x))


def test_precision_at_k_against_a_hand_count():
    wrong = np.array([0, 1, 0, 1, 1, 0], dtype=bool)
    scores = np.array([0.3, -2.0, 0.1, -0.5, 0.2, -1.0])  # most harmful first: 1, 5, 3, 2, 4, 0
    np.testing.assert_array_equal(influence_ranking(scores), [1, 5, 3, 2, 4, 0])
    assert precision_at_k(influence_ranking(scores), wrong, 3) == pytest.approx(2 / 3)
    np.testing.assert_array_equal(loss_ranking([1.0, 3.0, 2.0]), [1, 2, 0])
    assert resolve_ks([0.5, 2, "flipped", 100], n=6, n_wrong=3) == [2, 3]
    with pytest.raises(ValueError):
        precision_at_k([0, 1], [True, False], 3)


def test_influence_ranking_finds_flipped_labels_far_better_than_random():
    """3 Gaussian classes in 6-d, 20% symmetric flips, clean validation set, softmax regression."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1.5, (3, 6))

    def blobs(n):
        y = np.arange(n) % 3
        return torch.tensor(centres[y] + rng.normal(0, 1, (n, 6)), dtype=torch.float32), y

    x, y = blobs(300)
    x_val, y_val = blobs(90)
    noisy, flipped = flip_labels(y, 0.2, 3, "symmetric", seed=0)
    torch.manual_seed(0)
    model = LinearOnFeatures(6, 3)
    optimiser = torch.optim.Adam(model.parameters(), 0.05)
    labels = torch.tensor(noisy)
    for _ in range(300):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(x), labels).backward()
        optimiser.step()
    result = compute_influence(model, [{"image": x, "label": labels, "id": torch.arange(300)}],
                               [{"image": x_val, "label": torch.tensor(y_val)}])
    losses = nn.functional.cross_entropy(model(x), labels, reduction="none").detach()
    report = audit_report(result.scores, losses, flipped, ["flipped"])
    row = report["precision_at_k"][0]
    assert report["wrong_labels"] == row["k"] == 60 and row["random"] == pytest.approx(0.2)
    # margin stated: at k = number of wrong labels, at least 0.4 above the random rate of 0.2
    assert row["influence"] >= row["random"] + 0.4


@pytest.mark.slow
def test_audit_reports_precision_at_k_against_baselines(tmp_path):
    out = run_noisy(tmp_path, "audit", "--epochs", "2")
    report = json.loads((out / "audit_summary.json").read_text())
    assert report["wrong_labels"] == round(0.2 * report["n"])
    assert report["precision_at_k"] and {"influence", "loss", "random"} <= set(report["precision_at_k"][0])
    rows = list(csv.DictReader(open(out / "audit_ranking.csv")))
    assert len(rows) == report["n"] and "true_label" not in rows[0]
    values = json.loads((out / "audit_values.json").read_text())  # the benchmark's record, beside the ranking
    wrong = np.array(values["labels"]) != np.array(values["true_labels"])
    assert wrong.sum() == report["wrong_labels"] and len(values["losses"]) == report["n"]
    assert np.allclose(np.array(values["probabilities"]).sum(axis=1), 1.0, atol=1e-4)


@pytest.mark.parametrize("solver", ["exact", "cg", "lissa"])
def test_the_audit_self_influence_is_the_label_reviews_from_the_same_pass(solver):
    """compute_influence(self_influence=True) gives self_influence_scores' numbers (checked against autograd in
    tests/review) with the solver's damping, and leaves the influence scores as they are without it."""
    from robustmri.influence import make_solver, self_influence_scores

    rng = np.random.default_rng(1)
    x = torch.tensor(rng.normal(0, 1, (40, 5)), dtype=torch.float32)
    y = torch.tensor(rng.integers(0, 3, 40))
    torch.manual_seed(0)
    model = LinearOnFeatures(5, 3)
    args = {"damp": 0.01, "scale": 20.0, "batch_size": 10, "depth": 50} if solver == "lissa" else {"damping": 0.05}
    train = [{"image": x[:25], "label": y[:25], "id": torch.arange(25)},
             {"image": x[25:], "label": y[25:], "id": torch.arange(25, 40)}]
    val = [{"image": x[:8] + 0.5, "label": y[:8]}]
    torch.manual_seed(3)
    plain = compute_influence(model, train, val, make_solver(solver, **args))
    torch.manual_seed(3)
    both = compute_influence(model, train, val, make_solver(solver, **args), self_influence=True)
    assert plain.self_influence is None
    assert torch.equal(both.scores, plain.scores)
    expected = self_influence_scores(model, x.numpy(), y.numpy(), damping=both.damping)
    np.testing.assert_allclose(both.self_influence.numpy(), expected, rtol=1e-10)
    assert (both.self_influence < 0).all()
