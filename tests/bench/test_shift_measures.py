"""The honest shift bench's site calibration and abstention per shift, and their tables."""

import copy

import numpy as np
import pytest
import torch

from robustmri import CLASS_NAMES
from robustmri.abstention.scores import SCORES
from robustmri.bench.shift_measures import (
    abstention_by_shift,
    abstention_tables,
    calibrated_by_shift,
    calibration_tables,
)
from robustmri.data.shift_families import family_shifts
from robustmri.data.synthetic import generate_slices
from robustmri.abstention.state import load_state
from robustmri.deploy.calibration import calibrate_network

from deploy_helpers import TINY_SIZE, tiny_network


def items(seed: int, n: int = 30, gamma: float = 1.0, labels=None) -> list[dict]:
    data = generate_slices(n_patients=n, size=TINY_SIZE, seed=seed, slices_per_patient=(1, 1))
    images = (0.8 * data["images"] ** gamma)[:, None].astype(np.float32)
    labels = data["labels"] if labels is None else labels
    return [{"id": i, "image": image, "label": int(label)} for i, (image, label) in enumerate(zip(images, labels))]


@pytest.fixture()
def model(tmp_path):
    """A tiny model with its abstention state beside it, as training leaves it."""
    from robustmri.abstention import save_state
    from robustmri.abstention.fit import fit_state

    network = tiny_network()
    path = tmp_path / "model.pt"
    torch.save(network.state_dict(), path)
    train = items(12, n=60)
    images = np.stack([item["image"] for item in train])
    save_state(fit_state(network, images, np.array([item["label"] for item in train]), images[:20], str(path)), path)
    return network, str(path)


def test_calibration_uses_the_shift_validation_images_only_and_leaves_the_checkpoint_weights(model):
    network, checkpoint = model
    saved = copy.deepcopy(network.state_dict())
    validation = {"none": items(1), "dark": items(2, gamma=2.0), "lonely": items(3, n=1)}
    test = {"none": items(4), "dark": items(5, gamma=2.0), "lonely": items(6)}
    result, skipped = calibrated_by_shift(network, checkpoint, validation, test, CLASS_NAMES)
    assert set(result) == {"none", "dark"}
    assert list(skipped) == ["lonely"] and "need 2 images" in skipped["lonely"]  # no variance in one image
    for key, value in network.state_dict().items():
        assert torch.equal(value, saved[key]), f"{key} was left changed"
    # by hand: a copy calibrated on the dark validation images, predicting the dark test images
    reference = copy.deepcopy(network)
    val_images = torch.from_numpy(np.stack([item["image"] for item in validation["dark"]]))
    fit = calibrate_network(reference, val_images, len(CLASS_NAMES), home=load_state(checkpoint))
    test_images = torch.from_numpy(np.stack([item["image"] for item in test["dark"]]))
    labels = np.array([item["label"] for item in test["dark"]])
    with torch.no_grad():
        predicted = reference(test_images).argmax(1).numpy()
    assert result["dark"]["accuracy"] == pytest.approx(float((predicted == labels).mean()))
    assert result["dark"]["n"] == len(labels) and result["dark"]["calibration_images"] == len(val_images)
    assert 0.0 <= result["dark"]["accepted"] <= 1.0
    assert fit["threshold"] > 0
    # the site's labels are never read: other validation labels, the same result
    relabelled = {shift: [{**item, "label": (item["label"] + 1) % 3} for item in entries]
                  for shift, entries in validation.items()}
    assert calibrated_by_shift(network, checkpoint, relabelled, test, CLASS_NAMES)[0] == result


def test_a_shift_the_calibration_refuses_is_skipped_with_its_reason_and_the_others_go_on(model, monkeypatch):
    network, checkpoint = model
    from robustmri.bench import shift_measures

    real = shift_measures.calibrate_network

    def refuse_dark(network, images, *args, **kwargs):
        if float(images.mean()) < 0.2:  # the gamma-2 renderings are the dark ones
            raise ValueError("no class was predicted for 10 or more site images")
        return real(network, images, *args, **kwargs)

    monkeypatch.setattr(shift_measures, "calibrate_network", refuse_dark)
    validation = {"none": items(1), "dark": items(2, gamma=2.0)}
    result, skipped = calibrated_by_shift(network, checkpoint, validation, {"none": items(4), "dark": items(5, gamma=2.0)},
                                          CLASS_NAMES)
    assert list(result) == ["none"] and skipped == {"dark": "no class was predicted for 10 or more site images"}


def test_every_score_is_judged_on_every_set_and_the_choice_follows_the_shifted_validation(model):
    network, checkpoint = model
    shifted = {"validation": {"none": items(1), "dark": items(2, gamma=2.0), "bright": items(7, gamma=0.5)},
               "test": {"none": items(4), "dark": items(5, gamma=2.0), "bright": items(8, gamma=0.5)}}
    result = abstention_by_shift(network, checkpoint, items(9, n=60), {"validation": items(10), "test": items(11)},
                                 shifted)
    sets = result["sets"]
    assert set(sets) == {"validation", "test", *(f"{split} / {shift}" for split in shifted for shift in shifted[split])}
    assert all(set(row["scores"]) == set(SCORES) for row in sets.values())
    # the rule by hand: the lowest mean AURC over the shifted validation renderings, `none` excluded
    means = {score: np.mean([sets[f"validation / {shift}"]["scores"][score]["aurc"] for shift in ("dark", "bright")])
             for score in SCORES}
    assert result["choice"] == min(means, key=means.get)
    with torch.no_grad():
        images = torch.from_numpy(np.stack([item["image"] for item in shifted["test"]["dark"]]))
        correct = network(images).argmax(1).numpy() == np.array([item["label"] for item in shifted["test"]["dark"]])
    assert sets["test / dark"]["accuracy"] == pytest.approx(correct.mean())


SHIFTS = family_shifts(48)
IN_RANGE = "gamma_0.7"


def run(method: str, seed: int, plain: dict, calibrated: dict, abstention=None) -> dict:
    record = {"method": method, "noise": "gaussian", "seed": seed,
              "test_by_shift": {s: {"accuracy": a} for s, a in plain.items()},
              "calibrated_by_shift": {s: {"accuracy": a, "accepted": 0.9, "accepted_accuracy": a}
                                      for s, a in calibrated.items()}}
    if abstention is not None:
        record["abstention_by_shift"] = abstention
    return record


def test_the_calibration_table_pairs_calibrated_and_plain_accuracy_by_seed():
    runs = [run("naive_head_aug", seed, {"none": 0.9, IN_RANGE: 0.70}, {"none": 0.9, IN_RANGE: 0.70 + gain})
            for seed, gain in enumerate([0.02, 0.04, 0.06])]
    table = calibration_tables(runs, SHIFTS)
    # differences +2, +4, +6 points: mean +4.0, t(0.975, 2) = 4.303, sd 2: half-width 4.97
    assert "| `naive_head_aug` | gaussian | in-range (mean of 1) | 70.0 | 74.0 | +4.0 [−1.0, +9.0] 3/3 |" in table
    assert "| `naive_head_aug` | gaussian | `none` (home) | 90.0 | 90.0 | 0.0 [0.0, 0.0] 0/3 |" in table
    assert "| 90.0 | 74.0 |" in table  # accepted share and the accuracy on the accepted slices


def test_the_abstention_table_pairs_each_score_against_mahalanobis_and_counts_choices():
    def sets(mahalanobis: float, energy: float) -> dict:
        def row(split, shift, m, e):
            return {"split": split, "shift": shift, "scores": {"mahalanobis": {"aurc": m}, "energy": {"aurc": e}}}
        return {"test": row("test", None, 0.05, 0.04), "test / none": row("test", "none", 0.5, 0.5),
                "test / dark": row("test", "dark", mahalanobis, energy)}
    runs = [run("naive_head_aug", seed, {}, {}, {"sets": sets(0.10, 0.10 - gain), "choice": choice})
            for seed, (gain, choice) in enumerate([(0.01, "energy"), (0.02, "energy"), (0.03, "mahalanobis")])]
    table = abstention_tables(runs)
    assert "| `naive_head_aug` | gaussian | `energy` | 4.00 | 8.00 | +2.0 [−0.5, +4.5] 3/3 |" in table
    assert table.rstrip().endswith("| 2/3 |")
    assert "| `naive_head_aug` | gaussian | `mahalanobis` | 5.00 | 10.00 |  |  | 1/3 |" in table
