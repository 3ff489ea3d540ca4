"""PIE: pruning, the hard set, and pie.json end to end."""

import csv
import json

import numpy as np
import pytest
import torch

from robustmri.methods.pie import find_hard_samples, finetune, pruned_copy, weight_sparsity

from helpers import run_noisy, tiny_network


def _items(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return [{"image": rng.random((1, 4, 4)).astype(np.float32), "label": int(i % 3), "id": 100 + i} for i in range(n)]


def test_sparsity_zero_gives_an_empty_hard_set():
    torch.manual_seed(0)
    model, items = tiny_network(), _items()
    finetune(model, items, steps=150, lr=0.01, batch_size=8)
    # a fine-tune this strong would change predictions: at sparsity 0 there is nothing to repair, so none runs
    result = find_hard_samples(model, items, sparsity=0.0, finetune_steps=50, lr=0.1)
    assert len(result["hard"]) == 0 and result["sparsity"] == 0.0
    assert len(result["ids"]) == 40


def test_pruning_reaches_the_requested_sparsity_and_makes_predictions_disagree():
    torch.manual_seed(0)
    model, items = tiny_network(), _items()
    finetune(model, items, steps=150, lr=0.01, batch_size=8)  # fit the (random) labels: a trained dense network
    assert weight_sparsity(pruned_copy(model, 0.6)) == pytest.approx(0.6, abs=0.01)
    assert weight_sparsity(model) == 0.0  # the trained network itself is not pruned
    result = find_hard_samples(model, items, sparsity=0.9, finetune_steps=0)
    assert len(result["hard"]) > 0
    np.testing.assert_array_equal(result["hard"], np.flatnonzero(result["dense_prediction"] != result["pruned_prediction"]))


@pytest.mark.slow
def test_pie_runs_and_writes_the_hard_set(tmp_path):
    out = run_noisy(tmp_path, "pie", "--epochs", "2", "--pie_epoch", "1", "--pie_sparsity", "0.5", "--pie_finetune_steps", "3")
    summary = json.loads((out / "pie_summary.json").read_text())
    rows = list(csv.DictReader(open(out / "pie_hard_samples.csv")))
    assert summary["n_hard"] == len(rows) and abs(summary["achieved_sparsity"] - 0.5) < 0.01
