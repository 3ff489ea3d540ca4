"""fit_state, scores_of and ensure_state: the checkpoint's abstention state, fitted, applied, made sure of."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from deploy_helpers import TINY_SIZE, synthetic_detector_data, tiny_network
from helpers import train_tiny_bundle
from robustmri.abstention import fit as fit_module
from robustmri.abstention.fit import ensure_state, fit_state, inputs_sha256, scores_of
from robustmri.abstention.mahalanobis import RIDGE, MahalanobisDetector, calibrate_threshold, extract_features
from robustmri.abstention.state import abstention_path, load_state, save_state
from robustmri.engine.model_metadata import file_sha256

from conftest import BUNDLE


def _independent_score(train_features, labels, features, num_classes=3, ridge=RIDGE):
    """The squared Mahalanobis distance to the nearest class mean, written out with an explicit inverse."""
    means = np.stack([train_features[labels == c].mean(0) for c in range(num_classes)])
    centred = train_features - means[labels]
    covariance = centred.T @ centred / len(train_features)
    precision = np.linalg.inv(covariance + ridge * np.trace(covariance) / len(covariance) * np.eye(len(covariance)))
    return np.min([np.einsum("nd,de,ne->n", features - m, precision, features - m) for m in means], axis=0)


def test_fit_state_is_the_detector_fitted_on_the_training_features_and_calibrated_on_validation(tmp_path):
    network = tiny_network()
    checkpoint = tmp_path / "model.pt"
    torch.save(network.state_dict(), checkpoint)
    (train_images, train_labels), validation = synthetic_detector_data()
    state = fit_state(network, train_images, train_labels, validation, checkpoint, target_acceptance=0.9)

    train_features = extract_features(network, train_images)
    detector = MahalanobisDetector.fit(train_features, train_labels, 3)
    np.testing.assert_array_equal(state.arrays["means"], detector.means)
    np.testing.assert_array_equal(state.arrays["precision_factor"], detector.precision_factor)
    expected = calibrate_threshold(detector.score(extract_features(network, validation)), 0.9)
    assert (state.threshold, state.acceptance, state.target_acceptance) == (*expected, 0.9)
    assert state.checkpoint_sha256 == file_sha256(checkpoint) and state.settings == {"ridge": RIDGE}
    assert state.fitted_on["n"] == len(train_images) and state.calibrated_on["n"] == len(validation)
    assert state.fitted_on["sha256"] == inputs_sha256(train_images, train_labels) != inputs_sha256(train_images)
    assert len(state.fitted_on["date"]) == 10 and state.calibrated_on["kind"] == "validation split"

    # scores_of: the state's score, equal to the distance computed with an explicit inverse
    images = np.concatenate([validation, np.random.default_rng(0).random((3, 1, TINY_SIZE, TINY_SIZE),
                                                                         dtype=np.float32)])
    scores = scores_of(state, network, images)
    independent = _independent_score(train_features, train_labels, extract_features(network, images))
    np.testing.assert_allclose(scores, independent, rtol=1e-6)
    assert (state.accepts(scores[:len(validation)]).mean()) == state.acceptance
    assert scores_of(state, network, torch.from_numpy(images)).tolist() == scores.tolist()  # tensors too


def _independent_by_name(name, network, train_images, train_labels, validation, images):
    """Each score written out from the network's own forward pass: softmax and logsumexp by hand, the CDF as a
    count of reference scores at or below."""
    from robustmri.abstention.mahalanobis import network_outputs

    def one(kind, features, logits, train_f, val_f, val_l):
        if kind == "mahalanobis":
            return _independent_score(train_f, train_labels, features)
        if kind == "max_softmax":
            e = np.exp(logits - logits.max(1, keepdims=True))
            return 1.0 - (e / e.sum(1, keepdims=True)).max(1)
        if kind == "energy":
            m = logits.max(1)
            return -(m + np.log(np.exp(logits - m[:, None]).sum(1)))
        raise AssertionError(kind)

    train_f, _ = network_outputs(network, train_images)
    val_f, val_l = network_outputs(network, validation)
    f, l = network_outputs(network, images)
    if "+" not in name:
        return one(name, f, l, train_f, val_f, val_l)
    cdfs, gate = [], None
    for kind in name.split("+"):
        reference = one(kind.removesuffix("_gate"), val_f, val_l, train_f, val_f, val_l)
        values = one(kind.removesuffix("_gate"), f, l, train_f, val_f, val_l)
        cdfs.append((reference[None, :] <= values[:, None]).mean(1))
        if kind.endswith("_gate"):  # refused above the midpoint of the reference scores around 99 % of them
            ordered, m = np.sort(reference), int(0.99 * len(reference))
            gate = values > (ordered[m - 1] + ordered[m]) / 2
    if gate is not None:
        return np.where(gate, 1.0 + cdfs[0], cdfs[1])
    return np.mean(cdfs, axis=0)


@pytest.mark.parametrize("name", ["mahalanobis", "max_softmax", "energy", "mahalanobis+max_softmax",
                                  "mahalanobis_gate+max_softmax"])
def test_fit_state_by_name_scores_as_written_out_and_accepts_its_share(tmp_path, name):
    network = tiny_network()
    checkpoint = tmp_path / "model.pt"
    torch.save(network.state_dict(), checkpoint)
    (train_images, train_labels), validation = synthetic_detector_data()
    state = fit_state(network, train_images, train_labels, validation, checkpoint, target_acceptance=0.9, score=name)
    assert state.score == name
    # slices outside the CDF's reference (a reference slice ties with itself, and the tie may break either way
    # between two float computations of the same score)
    images = np.concatenate([train_images[:8], np.random.default_rng(1).random((3, 1, TINY_SIZE, TINY_SIZE),
                                                                               dtype=np.float32)])
    scores = scores_of(state, network, images)
    expected = _independent_by_name(name, network, train_images, train_labels, validation, images)
    np.testing.assert_allclose(scores, expected, rtol=1e-6, atol=1e-12)
    assert state.accepts(scores_of(state, network, validation)).mean() == state.acceptance >= 0.9
    # the state survives its file and scores the same from it
    save_state(state, checkpoint)
    np.testing.assert_array_equal(scores_of(load_state(checkpoint), network, images), scores)


def test_fit_state_refuses_an_unknown_score(tmp_path):
    (train_images, train_labels), validation = synthetic_detector_data()
    with pytest.raises(ValueError, match="unknown abstention score 'entropy'; valid names: mahalanobis"):
        fit_state(tiny_network(), train_images, train_labels, validation, None, score="entropy")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_tiny_bundle(tmp_path_factory.mktemp("run"))


def _copy_run(trained, folder):
    """The trained run's models folder copied to ``folder`` (what a user moves to another place)."""
    shutil.copytree(trained.parent, folder / "models")
    return folder / "models" / "model.pt"


@pytest.mark.slow
def test_ensure_state_loads_the_saved_state_without_fitting(trained, monkeypatch):
    monkeypatch.setattr(fit_module, "fit_state", lambda *a, **k: pytest.fail("fitted again"))
    state = ensure_state(trained, bundle_dir=BUNDLE)
    assert state.threshold == load_state(trained).threshold


@pytest.mark.slow
def test_ensure_state_fits_and_saves_a_missing_state_from_the_recorded_training_data(trained, tmp_path):
    checkpoint = _copy_run(trained, tmp_path)
    saved = load_state(checkpoint)
    os.remove(abstention_path(checkpoint))
    metadata = json.loads((checkpoint.parent / "model_metadata.json").read_text())
    del metadata["abstention"]  # as a checkpoint trained before states were written
    (checkpoint.parent / "model_metadata.json").write_text(json.dumps(metadata))

    state = ensure_state(checkpoint, bundle_dir=BUNDLE)
    assert load_state(checkpoint, checkpoint_sha256=file_sha256(checkpoint)).threshold == state.threshold
    # the same splits training used, rebuilt from what it recorded (seed, noise, synthetic_patients, folder)
    assert state.fitted_on["sha256"] == saved.fitted_on["sha256"]
    assert state.calibrated_on["sha256"] == saved.calibrated_on["sha256"]
    assert state.threshold == pytest.approx(saved.threshold, rel=1e-4)
    entry = json.loads((checkpoint.parent / "model_metadata.json").read_text())["abstention"]
    assert entry["sha256"] == file_sha256(abstention_path(checkpoint)) and entry["threshold"] == state.threshold


@pytest.mark.slow
def test_ensure_state_refits_a_state_left_beside_other_weights(trained, tmp_path):
    checkpoint = _copy_run(trained, tmp_path)
    other = {k: v + 0.01 if v.is_floating_point() else v for k, v in torch.load(checkpoint).items()}
    torch.save(other, checkpoint)
    with pytest.raises(ValueError, match="other weights"):
        load_state(checkpoint, checkpoint_sha256=file_sha256(checkpoint))
    state = ensure_state(checkpoint, bundle_dir=BUNDLE)
    assert state.checkpoint_sha256 == file_sha256(checkpoint) != load_state(trained).checkpoint_sha256


def test_ensure_state_refuses_in_one_line_when_the_training_data_are_not_here(tmp_path):
    network = tiny_network()
    checkpoint = tmp_path / "models" / "model.pt"
    checkpoint.parent.mkdir()
    torch.save(network.state_dict(), checkpoint)
    with pytest.raises(FileNotFoundError, match=r"^model.pt has no abstention state \(model_abstention.pt\) and no "
                                                r"record of the data it was trained on") as no_record:
        ensure_state(checkpoint, bundle_dir=BUNDLE)
    (checkpoint.parent / "training_data.json").write_text(json.dumps({"dataset_dir": str(tmp_path / "gone")}))
    with pytest.raises(FileNotFoundError, match=r"its training data \(gone\) are not on this machine: copy its "
                                                r"state from where it was trained") as gone:
        ensure_state(checkpoint, bundle_dir=BUNDLE)
    assert "\n" not in str(no_record.value) + str(gone.value) and load_state(checkpoint) is None
    # a state copied from where it was trained is all it needs
    (train_images, train_labels), validation = synthetic_detector_data()
    save_state(fit_state(network, train_images, train_labels, validation, checkpoint), checkpoint)
    assert ensure_state(checkpoint, bundle_dir=BUNDLE).fitted_on["n"] == len(train_images)


def test_detector_of_reads_the_mahalanobis_state_or_the_mahalanobis_part_of_a_combination():
    from robustmri.abstention.fit import detector_of
    from robustmri.abstention.state import AbstentionState

    means, factor = np.arange(6.0).reshape(2, 3), np.eye(3) * 2.0
    common = dict(threshold=1.0, target_acceptance=0.95, acceptance=0.95, checkpoint_sha256="",
                  fitted_on={"n": 40}, settings={"ridge": 0.01})
    plain = detector_of(AbstentionState(score="mahalanobis", arrays={"means": means, "precision_factor": factor},
                                        **common))
    part = detector_of(AbstentionState(score="mahalanobis+max_softmax", arrays={
        "mahalanobis.means": means, "mahalanobis.precision_factor": factor,
        "mahalanobis.cdf_reference": np.zeros(3), "max_softmax.cdf_reference": np.zeros(3)}, **common))
    for detector in (plain, part):
        np.testing.assert_array_equal(detector.means, means)
        np.testing.assert_array_equal(detector.precision_factor, factor)
        assert detector.ridge == 0.01 and detector.n_train == 40
    with pytest.raises(ValueError, match="'energy' has no Mahalanobis part"):
        detector_of(AbstentionState(score="energy", arrays={}, **common))
