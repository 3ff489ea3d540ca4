import json

import numpy as np
import pytest
import torch
from torch import nn

from robustmri.methods.alr import (
    VoGTracker,
    forget_rate,
    label_row_gradients,
    make_oracle,
    relabel,
    select_clean,
    select_for_relabelling,
)

from helpers import run_noisy


def plain_coteaching_selection(losses, rate):
    """Han et al. 2018, as in their release: sort by loss, remember int((1 - rate) * n)."""
    order = np.argsort(losses, kind="stable")
    return order[:int((1 - rate) * len(losses))]


@pytest.mark.parametrize("seed", range(5))
def test_mix_ratio_zero_is_plain_coteaching(seed):
    rng = np.random.default_rng(seed)
    losses, vog = rng.exponential(size=32), rng.random(32)
    for rate in (0.0, 0.1, 0.25, 0.4):
        np.testing.assert_array_equal(select_clean(losses, vog, rate, mix_ratio=0.0),
                                      plain_coteaching_selection(losses, rate))
    # without VoG history (all zero) the VoG share falls back to small loss: plain co-teaching again
    assert set(select_clean(losses, np.zeros(32), 0.25, 0.5)) == set(plain_coteaching_selection(losses, 0.25))


def test_vog_share_takes_the_highest_vog_outside_the_small_loss_picks():
    losses = np.arange(10, dtype=float)  # sample i has loss i
    vog = np.array([9, 9, 9, 9, 0, 0, 0, 0.5, 3, 1], dtype=float)
    chosen = select_clean(losses, vog, rate=0.2, mix_ratio=0.25)  # keep 8: 6 by small loss, 2 by VoG
    assert chosen[:6].tolist() == [0, 1, 2, 3, 4, 5] and chosen[6:].tolist() == [8, 9]


def test_forget_rate_ramps_to_the_noise_estimate():
    assert [forget_rate(e, 0.4, 4) for e in range(6)] == pytest.approx([0, 0.1, 0.2, 0.3, 0.4, 0.4])


def test_label_row_gradient_matches_autograd():
    torch.manual_seed(0)
    layer = nn.Linear(5, 3)
    features, labels = torch.randn(4, 5), torch.tensor([0, 2, 1, 2])
    rows = label_row_gradients(features, torch.softmax(layer(features), 1), labels)
    for i in range(4):
        layer.zero_grad()
        nn.functional.cross_entropy(layer(features[i:i + 1]), labels[i:i + 1]).backward()
        torch.testing.assert_close(rows[i], layer.weight.grad[labels[i]])


def test_vog_is_the_std_over_the_last_window_epochs():
    rng = np.random.default_rng(0)
    ids = [10, 11, 12]
    tracker = VoGTracker(ids, dim=4, window=3)
    history = []
    for epoch in range(1, 6):
        tracker.start_epoch(epoch)
        grads = rng.normal(size=(3, 4)).astype(np.float32)
        history.append(grads)
        tracker.record([12, 10, 11], torch.tensor(grads[[2, 0, 1]]))
    expected = np.stack(history[-3:]).std(axis=0).mean(axis=1)  # population std over epochs 3..5
    np.testing.assert_allclose(tracker.scores(ids), expected, rtol=1e-5)
    fresh = VoGTracker(ids, 4, 3)
    fresh.start_epoch(1)
    fresh.record(ids, torch.ones(3, 4))
    assert (fresh.scores(ids) == 0).all()  # one epoch is no variance evidence


def test_each_relabelling_round_adds_exactly_the_budget_of_new_samples():
    rng = np.random.default_rng(1)
    n, budget = 100, 7
    kept = rng.random(n) < 0.5
    relabelled = np.zeros(n, dtype=bool)
    for _ in range(4):
        before = relabelled.copy()
        entropies = rng.random(n)  # the model changes between rounds
        selected = select_for_relabelling(entropies, ~(kept | relabelled), budget)
        assert len(selected) == len(set(selected.tolist())) == budget
        assert not (kept[selected] | before[selected]).any()  # new: neither kept nor relabelled before
        relabelled[selected] = True
        assert relabelled.sum() == before.sum() + budget
        candidates = np.flatnonzero(~(kept | before))
        assert entropies[selected].min() >= np.sort(entropies[candidates])[-budget]  # the most uncertain ones


def test_an_oracle_repeating_the_noisy_labels_gives_no_gain():
    rng = np.random.default_rng(2)
    truth = rng.integers(0, 3, 50)
    given = truth.copy()
    wrong = rng.random(50) < 0.3
    given[wrong] = (truth[wrong] + 1) % 3
    items = [{"label": int(g), "true_label": int(t)} for g, t in zip(given, truth)]
    selected = np.arange(0, 50, 2)
    noisy_labels, changed = relabel(given, selected, make_oracle("noisy")([items[p] for p in selected]))
    assert changed == 0 and (noisy_labels == given).all()
    fixed, changed = relabel(given, selected, make_oracle("true")([items[p] for p in selected]))
    assert changed == wrong[selected].sum() > 0
    assert (fixed != truth).sum() == (given != truth).sum() - changed


@pytest.mark.slow
@pytest.mark.parametrize("oracle", ["true", "noisy"])
def test_alr_json_runs_rounds_of_exactly_the_budget(tmp_path, oracle):
    out = run_noisy(tmp_path, "alr", "--epochs", "5", "--alr_budget", "3", "--alr_oracle", oracle)
    summary = json.loads((out / "alr_summary.json").read_text())
    assert summary["phase1_epochs"] == 3 and summary["round_epochs"] == 1 and len(summary["rounds"]) == 2
    assert summary["kept"]["n_kept"] > 0 and set(summary["kept"]["clean_recall_by_class"]) == {"0", "1", "2"}
    for k, record in enumerate(summary["rounds"], start=1):
        assert record["relabelled"] == 3 and record["total_relabelled"] == 3 * k
        if oracle == "noisy":  # repeating the given labels corrects nothing
            assert record["labels_changed"] == 0 and record["wrong_labels_after"] == record["wrong_labels_before"]
        else:
            assert record["wrong_labels_after"] == record["wrong_labels_before"] - record["labels_changed"]
    assert all("val_balanced_accuracy" in e and "val_macro_f1" in e for e in summary["epochs"])
