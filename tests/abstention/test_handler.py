"""FitAbstention: the abstention state written beside model.pt when training completes, and recorded."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events

from helpers import train_tiny_bundle
from robustmri.abstention.fit import inputs_sha256, protocol_arrays
from robustmri.abstention.handler import FitAbstention
from robustmri.abstention.mahalanobis import MahalanobisDetector, calibrate_threshold, extract_features
from robustmri.abstention.state import abstention_path, load_state
from robustmri.data.protocol import build_protocol
from robustmri.engine.checkpoint import load_weights
from robustmri.engine.model_metadata import file_sha256
from robustmri.networks import PaperCNN


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_tiny_bundle(tmp_path_factory.mktemp("run"))


@pytest.mark.slow
def test_training_writes_the_state_beside_the_model_and_records_it(trained):
    state = load_state(trained, checkpoint_sha256=file_sha256(trained))  # tied to these very weights
    assert state is not None and state.score == "mahalanobis"
    metadata = json.loads((trained.parent / "model_metadata.json").read_text())
    entry = metadata["abstention"]
    assert entry["file"] == "model_abstention.pt" and entry["sha256"] == file_sha256(abstention_path(trained))
    assert entry["threshold"] == state.threshold and entry["target_acceptance"] == 0.95
    assert entry["fitted_on"]["n"] == metadata["provenance"]["data"]["n"]["train"]
    assert entry["calibrated_on"]["n"] == metadata["provenance"]["data"]["n"]["val"]
    assert entry["calibrated_on"]["kind"] == "validation split" and entry["fitted_on"]["kind"] == "training split"


@pytest.mark.slow
def test_the_state_equals_a_direct_fit_on_the_features_of_the_saved_weights(trained):
    state = load_state(trained)
    data = build_protocol(None, spatial_size=32, synthetic_patients=30, preprocess="head")
    (train_images, train_labels), validation = protocol_arrays(data, "train"), protocol_arrays(data, "val")[0]
    # the very images training fitted on (the digest the state records)
    assert state.fitted_on["sha256"] == inputs_sha256(train_images, train_labels)
    assert state.calibrated_on["sha256"] == inputs_sha256(validation)
    network = load_weights(PaperCNN(spatial_size=32, padding=2), str(trained)).eval()
    detector = MahalanobisDetector.fit(extract_features(network, train_images), train_labels, 3)
    np.testing.assert_allclose(state.arrays["means"], detector.means, rtol=1e-5, atol=1e-6)
    threshold, acceptance = calibrate_threshold(detector.score(extract_features(network, validation)), 0.95)
    assert state.threshold == pytest.approx(threshold, rel=1e-4) and state.acceptance == acceptance
    # the score the state gives equals the direct detector's (the precision factor itself is ill-conditioned
    # for 44 slices in more dimensions, so it is compared through what it computes)
    images = np.concatenate([validation, np.random.default_rng(0).random((4, 1, 32, 32), dtype=np.float32)])
    features = extract_features(network, images)
    mine = np.square((features @ state.arrays["precision_factor"])[:, None] - (
        state.arrays["means"] @ state.arrays["precision_factor"])[None]).sum(-1).min(1)
    np.testing.assert_allclose(mine, detector.score(features), rtol=1e-4)


def test_no_state_when_training_stopped_early_and_none_on_other_ranks(tmp_path, monkeypatch):
    network = PaperCNN(spatial_size=32, padding=2)
    checkpoint = tmp_path / "model.pt"
    torch.save(network.state_dict(), checkpoint)
    data = build_protocol(None, spatial_size=32, synthetic_patients=12, preprocess="minmax")
    handler = FitAbstention(network, data, str(checkpoint))
    engine = Engine(lambda engine, batch: None)
    handler.attach(engine)
    engine.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda e: e.terminate())
    engine.run([0], max_epochs=2)  # stopped after epoch 1 of 2
    assert load_state(checkpoint) is None
    monkeypatch.setattr("robustmri.abstention.handler.is_main_process", lambda: False)
    rank1 = Engine(lambda engine, batch: None)
    handler.attach(rank1)
    rank1.run([0], max_epochs=1)
    assert load_state(checkpoint) is None
    monkeypatch.setattr("robustmri.abstention.handler.is_main_process", lambda: True)
    rank0 = Engine(lambda engine, batch: None)
    handler.attach(rank0)
    rank0.run([0], max_epochs=1)
    assert load_state(checkpoint, checkpoint_sha256=file_sha256(checkpoint)).fitted_on["n"] == len(data.train)


@pytest.mark.parametrize("drop, reason", [
    ("val", "the protocol's 'val' split is empty"),
    ("pituitary", "every class needs training slices for the detector"),  # few labels, as in the label app
])
def test_data_the_state_cannot_be_fitted_on_keep_the_model_and_write_no_state(tmp_path, caplog, drop, reason):
    network = PaperCNN(spatial_size=32, padding=2)
    checkpoint = tmp_path / "model.pt"
    torch.save(network.state_dict(), checkpoint)
    data = build_protocol(None, spatial_size=32, synthetic_patients=12, preprocess="minmax")
    data = (dataclasses.replace(data, val=[]) if drop == "val" else
            dataclasses.replace(data, train=[item for item in data.train if item["label"] != 2]))
    engine = Engine(lambda engine, batch: None)
    FitAbstention(network, data, str(checkpoint)).attach(engine)
    engine.run([0], max_epochs=1)
    assert load_state(checkpoint) is None and checkpoint.is_file()
    assert f"no abstention state for model.pt: {reason}" in caplog.text


def test_the_handler_fits_the_score_it_is_given_and_refuses_an_unknown_one_at_once(tmp_path):
    from robustmri.abstention.fit import scores_of

    network = PaperCNN(spatial_size=32, padding=2)
    checkpoint = tmp_path / "model.pt"
    torch.save(network.state_dict(), checkpoint)
    data = build_protocol(None, spatial_size=32, synthetic_patients=12, preprocess="minmax")
    engine = Engine(lambda engine, batch: None)
    FitAbstention(network, data, str(checkpoint), score="energy").attach(engine)
    engine.run([0], max_epochs=1)
    state = load_state(checkpoint, checkpoint_sha256=file_sha256(checkpoint))
    validation, _ = protocol_arrays(data, "val")
    assert state.score == "energy" and state.arrays == {}
    assert state.threshold == calibrate_threshold(scores_of(state, network, validation), 0.95)[0]
    with pytest.raises(ValueError, match="unknown abstention score 'softmax'"):
        FitAbstention(network, data, str(checkpoint), score="softmax")
