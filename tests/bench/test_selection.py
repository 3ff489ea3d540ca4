"""Checkpoint-selection rules judged on held-out validation halves (robustmri.bench.selection)."""

import numpy as np
import pytest
import torch
from ignite.engine import Engine

from robustmri.bench.selection import (EpochSnapshots, cross_selection, decide, mean_step, patient_halves,
                                       per_epoch_outcomes, selection_table)


def test_halves_keep_each_patient_whole_and_split_groups_evenly():
    groups = np.array([5, 5, 7, 9, 9, 9, 11, 13, 13])
    first, second = patient_halves(groups, seed=3)
    assert (first ^ second).all()
    for g in np.unique(groups):
        in_first = first[groups == g]
        assert in_first.all() or not in_first.any()
    assert len(np.unique(groups[first])) == 3 and len(np.unique(groups[second])) == 2
    with pytest.raises(ValueError, match="2 patient groups"):
        patient_halves([4, 4, 4])


def test_cross_selection_matches_a_hand_computation():
    # 3 epochs, 4 slices of 4 patients; halves found from the same seed
    correct = np.array([[1, 1, 0, 0],
                        [1, 0, 1, 1],
                        [0, 1, 1, 0]], dtype=float)
    loss = np.array([[0.2, 0.4, 2.0, 2.0],
                     [0.5, 0.9, 0.1, 0.3],
                     [1.0, 0.2, 0.3, 1.5]])
    groups = np.array([10, 20, 30, 40])
    a, b = patient_halves(groups, seed=1)
    result = cross_selection(correct, loss, groups, seed=1)
    for select, score, k in ((a, b, 0), (b, a, 1)):
        acc, mean_loss = correct[:, select].mean(1), loss[:, select].mean(1)
        best = int(np.flatnonzero(acc == acc.max())[0])
        assert result["best_accuracy"]["epochs"][k] == best
        assert result["best_accuracy"]["held_out"][k] == correct[best, score].mean()
        assert result["lowest_loss"]["epochs"][k] == int(np.argmin(mean_loss))
        late = 1 + int(np.flatnonzero(acc[1:] == acc[1:].max())[0])
        assert result["best_accuracy_late"]["epochs"][k] == late
        assert result["last"]["epochs"][k] == 2
    assert result["last"]["score"] == pytest.approx((correct[2, a].mean() + correct[2, b].mean()) / 2)


def test_snapshots_keep_every_epochs_weights_and_give_per_epoch_outcomes(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    path = tmp_path / "models" / "epochs.pt"

    def step(engine, batch):
        with torch.no_grad():
            net[1].weight.add_(1.0)

    engine = Engine(step)
    EpochSnapshots(net, str(path)).attach(engine)
    engine.run([0, 1], max_epochs=3)
    saved = torch.load(path, weights_only=True)
    assert saved["epochs"] == [1, 2, 3]
    first = saved["states"][0]["1.weight"]
    assert torch.allclose(saved["states"][2]["1.weight"], first + 4.0)  # two steps per epoch
    items = [{"image": np.random.default_rng(i).normal(size=(1, 2, 2)).astype(np.float32), "label": i % 3, "id": i}
             for i in range(5)]
    correct, loss = per_epoch_outcomes(net, saved, items)
    assert correct.shape == loss.shape == (3, 5)
    net.load_state_dict(saved["states"][1])
    logits = net(torch.stack([torch.as_tensor(it["image"]) for it in items]))
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([it["label"] for it in items]), reduction="none")
    assert np.allclose(loss[1], expected.detach().numpy(), atol=1e-6)


def _records(gain):
    rows = []
    for seed, g in zip((100, 101, 102, 103), gain):
        rows.append({"method": "naive", "noise": "gaussian", "seed": seed,
                     "rules": {"last": {"score": 0.80, "epochs": [19, 19]},
                               "best_accuracy": {"score": 0.80 + g, "epochs": [6, 9]}}})
    return rows


def test_a_rule_replaces_the_last_epoch_only_with_an_interval_above_zero():
    chosen, comparison = decide(_records([0.03, 0.05, 0.04, 0.06]))
    assert chosen == "best_accuracy" and comparison["best_accuracy"]["positive"] == 4
    chosen, comparison = decide(_records([0.05, -0.04, 0.02, -0.01]))
    assert chosen == "last" and comparison["best_accuracy"]["ci"][0] < 0
    table = selection_table(_records([0.05, -0.04, 0.02, -0.01]))
    assert "Decision: `last`" in table and "| `best_accuracy` | 80.5 ± 3.9 |" in table


def test_ema_follows_its_recurrence_over_iterations_weights_and_batchnorm_statistics(tmp_path):
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    seen = []

    def step(engine, batch):
        with torch.no_grad():
            net[0].weight.add_(float(batch))
            net[1].running_mean.add_(2.0 * float(batch))
        seen.append({k: v.clone().float() for k, v in net.state_dict().items()})

    engine = Engine(step)
    snapshots = EpochSnapshots(net, str(tmp_path / "e.pt"), ema_decay=0.9)
    snapshots.attach(engine)
    engine.run([1, 3, 5], max_epochs=2)
    expected = seen[0]
    for state in seen[1:]:
        expected = {k: 0.9 * expected[k] + 0.1 * state[k] if state[k].is_floating_point() else state[k]
                    for k in state}
    saved = torch.load(tmp_path / "e.pt", weights_only=True)
    assert len(saved["ema_states"]) == 2
    for key in ("0.weight", "0.bias", "1.running_mean", "1.running_var"):
        assert torch.allclose(saved["ema_states"][-1][key], expected[key]), key
    assert saved["ema_states"][-1]["1.num_batches_tracked"] == net[1].num_batches_tracked
    after_first_epoch = seen[0]
    for state in seen[1:3]:
        after_first_epoch = {k: 0.9 * after_first_epoch[k] + 0.1 * state[k] for k in ("0.weight",)}
    assert torch.allclose(saved["ema_states"][0]["0.weight"], after_first_epoch["0.weight"])
    with pytest.raises(ValueError, match="ema_decay"):
        EpochSnapshots(net, "x", ema_decay=1.0)


def test_a_fixed_candidate_is_scored_on_the_same_halves():
    correct = np.array([[1, 0, 1, 0], [0, 1, 1, 1]], dtype=float)
    groups = np.array([1, 2, 3, 4])
    ema = np.array([1, 1, 0, 1], dtype=float)
    a, b = patient_halves(groups, seed=5)
    result = cross_selection(correct, np.zeros_like(correct), groups, seed=5, fixed={"ema": ema})
    assert result["ema"]["held_out"] == [ema[b].mean(), ema[a].mean()] and result["ema"]["epochs"] is None


def test_mean_step_is_the_benchmarks_second_half_measure():
    # 6 epochs: the second half is indices 3..5, its steps start from index 2: |0.8-0.6|, |0.7-0.8|, |0.7-0.7|
    assert mean_step([0.1, 0.5, 0.6, 0.8, 0.7, 0.7]) == pytest.approx((0.2 + 0.1 + 0.0) / 3)
