"""The tumour-free measurement: its counts by hand, a checkpoint with and without an abstention state, an ONNX model,
and the public slices it finds in installed packages."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from robustmri import CLASS_NAMES, INTENDED_USE
from robustmri.abstention import AbstentionState, save_state
from robustmri.abstention.mahalanobis import RIDGE, extract_features, fit_detector
from robustmri.bench.tumour_free import (
    NIBABEL_VOLUMES,
    CheckpointModel,
    ImageSet,
    OnnxModel,
    markdown,
    measure_tumour_free,
    refusal_by_score,
    refusal_markdown,
    synthetic_tumour_free_heads,
    tumour_free_sets,
)
from robustmri.data.preprocessing import preprocess_head
from robustmri.engine.model_metadata import file_sha256
from robustmri.networks import PaperCNN

from conftest import BUNDLE, ROOT
from deploy_helpers import export_tiny, write_trained


class RefusesOdd:
    """A stand-in model: every slice is glioma at 0.9, every second one (in batch order) refused."""

    class_names = list(CLASS_NAMES)
    abstention = "every second slice"
    description = {"kind": "stand-in"}

    def prepare(self, image):
        if np.ptp(image) == 0:
            raise ValueError("constant image")
        return np.zeros((1, 4, 4), np.float32)

    def classify(self, images):
        probabilities = np.tile([0.05, 0.9, 0.05], (len(images), 1))
        return probabilities, np.arange(len(images)) % 2 == 0


def test_counts_add_up_by_hand():
    images = [np.arange(16.0).reshape(4, 4)] * 5 + [np.ones((4, 4))] * 2  # 5 preparable, 2 constant
    report = measure_tumour_free(RefusesOdd(), [ImageSet("hand", images, "by hand", "none")], batch_size=64)
    (row,) = report["rows"]
    # prepared slices 0..4: 0, 2, 4 given a type, 1 and 3 refused; the 2 constant ones unpreparable
    assert (row["n"], row["n_given_tumour_type"], row["n_not_assessable"], row["unpreparable"]) == (7, 3, 2, 2)
    assert row["given_tumour_type_share"] == pytest.approx(3 / 7) and row["not_assessable_share"] == pytest.approx(2 / 7)
    assert row["types_given"] == {"meningioma": 0, "glioma": 3, "pituitary": 0}
    assert row["median_top_probability"] == pytest.approx(0.9)
    assert report["intended_use"] == INTENDED_USE and report["has_abstention"]
    assert "| hand | 7 | 3 (42.9 %) | 2 (28.6 %) | 2 |" in markdown({**report, "model": {
        "kind": "stand-in", "file": "x", "spatial_size": 4, "preprocess": "none", "abstention": None}})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    network = PaperCNN(spatial_size=32, padding=2).eval()
    return write_trained(tmp_path_factory.mktemp("model") / "models", network, 32, preprocess="head"), network


def prepared_heads(n=12):
    heads = synthetic_tumour_free_heads(n, seed=7)
    return heads, np.stack([preprocess_head(image, 32) for image in heads.images])[:, None]


def test_a_checkpoint_without_abstention_gives_every_preparable_slice_the_networks_type(checkpoint):
    path, network = checkpoint
    heads, prepared = prepared_heads()
    with torch.no_grad():
        expected = torch.softmax(network(torch.from_numpy(prepared)), 1).numpy()
    report = measure_tumour_free(CheckpointModel(path, BUNDLE), [heads])
    (row,) = report["rows"]
    assert not report["has_abstention"] and row["n_given_tumour_type"] == row["n"] == 12
    assert row["types_given"] == {name: int((expected.argmax(1) == k).sum()) for k, name in enumerate(CLASS_NAMES)}
    assert row["median_top_probability"] == pytest.approx(float(np.median(expected.max(1))), rel=1e-5)


def test_a_checkpoints_mahalanobis_state_refuses_the_slices_scoring_above_its_threshold(checkpoint, tmp_path):
    path, network = checkpoint
    heads, prepared = prepared_heads()
    rng = np.random.default_rng(0)
    train = np.clip(prepared + rng.normal(0, 0.1, prepared.shape), 0, 1).astype(np.float32)
    detector = fit_detector(network, np.concatenate([train] * 3), np.arange(3 * len(train)) % 3, 3)
    # the squared Mahalanobis distance to the nearest class mean, by hand with the precision P = W W^T
    features = extract_features(network, prepared)
    precision = detector.precision_factor @ detector.precision_factor.T
    by_hand = np.array([min((f - m) @ precision @ (f - m) for m in detector.means) for f in features])
    ranked = np.sort(by_hand)
    assert ranked[5] > ranked[4]
    threshold = float(ranked[4] + ranked[5]) / 2  # 5 of the 12 below it, away from rounding
    copy = tmp_path / "model.pt"
    copy.write_bytes(path.read_bytes())
    (tmp_path / "model_metadata.json").write_bytes((path.parent / "model_metadata.json").read_bytes())
    save_state(AbstentionState(score="mahalanobis", arrays={"means": detector.means,
                                                            "precision_factor": detector.precision_factor},
                               threshold=threshold, target_acceptance=0.95, acceptance=0.95,
                               checkpoint_sha256=file_sha256(copy), fitted_on={"kind": "training split", "n": 36},
                               settings={"ridge": RIDGE}), copy)
    report = measure_tumour_free(CheckpointModel(copy, BUNDLE), [heads])
    (row,) = report["rows"]
    assert report["has_abstention"] and (row["n_given_tumour_type"], row["n_not_assessable"]) == (5, 7)


def test_each_score_refuses_at_the_products_rule_as_computed_by_hand(checkpoint):
    from scipy.special import logsumexp

    from robustmri.abstention.fit import protocol_arrays
    from robustmri.engine.trained_model import trained_model

    path, network = checkpoint
    heads, prepared = prepared_heads()
    report = refusal_by_score(path, BUNDLE, [heads], scores=["energy", "max_softmax"], dataset_dir="",
                              synthetic_patients=30)
    assert list(report["scores"]) == ["energy", "max_softmax"] and report["target_acceptance"] == 0.95
    # energy by hand: -logsumexp of the logits; the threshold is the k-th smallest validation score, k = ceil(0.95 n)
    _, _, data = trained_model(BUNDLE, str(path), dataset_dir="", synthetic_patients=30)
    with torch.no_grad():
        energy = lambda images: -logsumexp(network(torch.from_numpy(images)).double().numpy(), axis=1)  # noqa: E731
        validation = np.sort(energy(protocol_arrays(data, "val")[0]))
        threshold = validation[int(np.ceil(0.95 * len(validation))) - 1]
        given = (energy(prepared.astype(np.float32)) <= threshold).mean()
        test = (energy(protocol_arrays(data, "test")[0]) <= threshold).mean()
    row = report["scores"]["energy"]
    assert row["threshold"] == pytest.approx(threshold, rel=1e-9)
    assert row["given_tumour_type_share"][heads.name] == pytest.approx(given)
    assert row["test_acceptance"] == pytest.approx(test)
    table = refusal_markdown(report)
    assert f"| energy | {100 * given:.1f} % | {100 * test:.1f} % |" in table


@pytest.mark.slow  # exports an ONNX model with its detector
def test_an_onnx_model_is_measured_with_its_detector(tmp_path):
    _, _, onnx_file, _ = export_tiny(tmp_path)
    model = OnnxModel(onnx_file)
    report = measure_tumour_free(model, [synthetic_tumour_free_heads(10, seed=3)])
    (row,) = report["rows"]
    assert report["has_abstention"] and row["n"] == 10
    assert row["n_given_tumour_type"] + row["n_not_assessable"] + row["unpreparable"] == 10
    heads = synthetic_tumour_free_heads(10, seed=3)
    prepared = np.stack([model.prepare(image) for image in heads.images])
    _, scores = model.classifier.predict_with_scores(prepared)
    assert row["n_not_assessable"] == int((scores > model.classifier.detector["threshold"]).sum())


def test_public_slices_come_from_nibabels_test_data_with_its_licence():
    pytest.importorskip("nibabel")
    sets = {s.name: s for s in tumour_free_sets(n_synthetic=3)}
    assert len(sets["synthetic_tumour_free_heads"].images) == 3
    for name in NIBABEL_VOLUMES:
        if name not in sets:
            pytest.skip("the installed nibabel ships no test data")
    assert len(sets["nibabel_example4d"].images) == 24 and sets["nibabel_example4d"].images[0].shape == (96, 128)
    assert len(sets["nibabel_anatomical"].images) == 25
    assert all("MIT" in sets[name].licence for name in NIBABEL_VOLUMES)
    assert [s.name for s in tumour_free_sets(n_synthetic=3, public=False)] == ["synthetic_tumour_free_heads"]


@pytest.mark.slow  # runs the script on a checkpoint, all sets
def test_script_writes_the_table_and_json(checkpoint, tmp_path):
    path, _ = checkpoint
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_tumour_free.py"), "--checkpoint", str(path),
                             "--out", str(tmp_path / "out"), "--n_synthetic", "8"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "tumour_free.json").read_text())
    assert report["rows"][0]["set"] == "synthetic_tumour_free_heads" and report["rows"][0]["n"] == 8
    assert "| synthetic_tumour_free_heads | 8 |" in (tmp_path / "out" / "tumour_free.md").read_text()
    neither = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_tumour_free.py")], capture_output=True,
                             text=True, timeout=120)
    assert neither.returncode != 0 and "give exactly one of --checkpoint" in neither.stderr
    onnx_scores = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_tumour_free.py"), "--model", "m.onnx",
                                  "--scores", "true"], capture_output=True, text=True, timeout=120)
    assert onnx_scores.returncode != 0 and "--scores needs --checkpoint" in onnx_scores.stderr
