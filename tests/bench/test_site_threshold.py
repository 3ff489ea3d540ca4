"""How much of the abstention site calibration refits, measured: the share a calibrated threshold accepts."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from robustmri import CLASS_NAMES
from robustmri.abstention.fit import fit_state
from robustmri.abstention.mahalanobis import network_outputs
from robustmri.bench.site_threshold import site_threshold_checks, split_by_group, summary
from robustmri.data.synthetic import generate_slices
from robustmri.deploy.calibration import calibrate_network

from deploy_helpers import TINY_SIZE, tiny_network


def items(seed: int, n: int = 40, gamma: float = 1.0) -> list[dict]:
    data = generate_slices(n_patients=n, size=TINY_SIZE, seed=seed, slices_per_patient=(1, 1))
    images = (0.8 * data["images"] ** gamma)[:, None].astype(np.float32)
    return [{"id": i, "image": image, "label": int(label), "group": i // 4}  # four slices per patient
            for i, (image, label) in enumerate(zip(images, data["labels"]))]


def test_halves_split_patients_never_slices():
    rows = items(0)
    first, second = split_by_group(rows, seed=3)
    groups = [{item["group"] for item in half} for half in (first, second)]
    assert not groups[0] & groups[1] and len(groups[0]) == 5 == len(groups[1])
    assert sorted(item["id"] for item in first + second) == list(range(40))
    assert split_by_group(rows, seed=3) == (first, second) and split_by_group(rows, seed=4) != (first, second)
    with pytest.raises(ValueError, match="at least 2 patient groups"):
        split_by_group([{**item, "group": 0} for item in rows], seed=0)


@pytest.fixture()
def model(tmp_path):
    network = tiny_network()
    path = tmp_path / "model.pt"
    torch.save(network.state_dict(), path)
    train = np.stack([item["image"] for item in items(9, 60)])
    home = fit_state(network, train, np.arange(60) % 3, train[:30], str(path))
    return network, str(path), home


def test_each_refit_is_checked_on_patients_it_never_saw_and_the_weights_are_put_back(model):
    network, checkpoint, home = model
    saved = copy.deepcopy(network.state_dict())
    validation, test = {"dark": items(1, gamma=2.0)}, {"dark": items(2, gamma=2.0)}
    other = np.stack([item["image"] for item in items(3, 10, gamma=0.3)])
    result = site_threshold_checks(network, checkpoint, home, validation, test, other, len(CLASS_NAMES),
                                   min_class_images=2, progress=False)
    assert result["refused"] == {} and set(result["shifts"]["dark"]) == {"half_a", "half_b", "test"}
    for key, value in network.state_dict().items():
        assert torch.equal(value, saved[key]), f"{key} was left changed"
    # by hand, the test check of the threshold refit: a copy calibrated on the validation images, the model's own
    # detector scoring the test images under the site's threshold
    reference = copy.deepcopy(network)
    images = torch.from_numpy(np.stack([item["image"] for item in validation["dark"]]))
    fit = calibrate_network(reference, images, len(CLASS_NAMES), refit="threshold", home=home, min_class_images=2)
    features, logits = network_outputs(reference, np.stack([item["image"] for item in test["dark"]]))
    labels = np.array([item["label"] for item in test["dark"]])
    accepted = fit["detector"].score(features) <= fit["threshold"]
    right = logits.argmax(1) == labels
    row = result["shifts"]["dark"]["test"]["threshold"]
    assert row["accepted"] == pytest.approx(accepted.mean())
    assert row["right_and_accepted"] == pytest.approx((accepted & right).mean())
    assert row["calibration_images"] == 40 and row["n"] == 40
    other_features, _ = network_outputs(reference, other)
    assert row["other_contrast_accepted"] == pytest.approx((fit["detector"].score(other_features) <= fit["threshold"]).mean())
    # a half is calibrated on the other half only
    assert result["shifts"]["dark"]["half_a"]["full"]["calibration_images"] + \
        result["shifts"]["dark"]["half_a"]["full"]["n"] == 40
    runs = [result]
    assert summary(runs, ["dark"], "accepted", ("test",), "threshold") == pytest.approx(accepted.mean())


def test_only_the_mahalanobis_score_is_measured(model):
    network, checkpoint, home = model
    with pytest.raises(ValueError, match="applies the Mahalanobis score"):
        site_threshold_checks(network, checkpoint, dataclasses.replace(home, score="energy"), {}, {}, np.zeros((1, 1, 2, 2)),
                              3)


@pytest.mark.slow  # trains nothing, but rebuilds a checkpoint's protocol and renders every shift
def test_script_writes_every_refit_for_each_check(tmp_path):
    import json
    import subprocess
    import sys

    from conftest import ROOT
    from deploy_helpers import write_trained
    from robustmri.networks import PaperCNN

    torch.manual_seed(0)
    from robustmri.engine.model_metadata import TRAINING_DATA_FILE
    from robustmri.outputs import write_json

    checkpoint = write_trained(tmp_path / "models", PaperCNN(spatial_size=32, padding=2).eval(), 32, preprocess="head")
    write_json(tmp_path / "models" / TRAINING_DATA_FILE, {"dataset_dir": None})  # the embedded synthetic set
    command = [sys.executable, str(ROOT / "scripts" / "bench_site_threshold.py"), "--checkpoints", str(checkpoint),
               "--out", str(tmp_path / "out"), "--selection_seeds", "0", "--confirmation_seeds", "0",
               "--shifts", "gamma_2,motion"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "site_threshold.json").read_text())
    run = report["runs"][0]
    assert list(report["refits"]) == ["full", "means", "threshold"] and run["other_contrast_slices"] > 0
    checked = [row for shift in run["shifts"].values() for check in shift.values() for row in check.values()]
    assert checked and all(0.0 <= row["accepted"] <= 1.0 for row in checked)
    table = (tmp_path / "out" / "site_threshold.md").read_text()
    assert set(run["shifts"]) == {"none", "gamma_2", "motion"}
    assert table.count("| `threshold` | all shifted (2) |") == 2  # selection and confirmation
    wrong = subprocess.run(command[:4] + ["--out", str(tmp_path / "x"), "--refits", "all"], capture_output=True,
                           text=True, timeout=120)
    assert wrong.returncode != 0 and "unknown refit(s) ['all']" in wrong.stderr
