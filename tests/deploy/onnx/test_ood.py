"""Out-of-distribution abstention: the Mahalanobis score, its ONNX output, the validation threshold, abstention."""

import json
import math
import re
import shutil
import subprocess
import sys

import numpy as np
import pydicom
import pytest
import torch

from robustmri import CLASS_NAMES
from robustmri.abstention.mahalanobis import fit_detector
from robustmri.bench.dicom_fixtures import write_mr_series
from robustmri.data.protocol import build_protocol
from robustmri.data.synthetic import generate_slices
from robustmri.deploy.dicom.classify import classify_series
from robustmri.deploy.dicom.headers import scan_folders
from robustmri.deploy.dicom.study import infer_dicom
from robustmri.deploy.onnx.export import OOD_METADATA_KEYS, export_onnx, split_arrays
from robustmri.deploy.onnx.ood import ScoredClassifier
from robustmri.deploy.onnx.runtime import DETECTOR_KEYS, ModelMetadataError, OnnxClassifier

from conftest import ROOT
from helpers import independent_mahalanobis as independent_score
from deploy_helpers import (
    TINY_SIZE,
    export_tiny,
    gradient_series,
    rewrite_metadata,
    signed_classifier,
    signing_keys,
    tiny_network,
)


@pytest.fixture(scope="module")
def data():
    return build_protocol(None, spatial_size=TINY_SIZE, synthetic_patients=80, seed=1, preprocess="minmax")


@pytest.fixture(scope="module")
def exported(data, tmp_path_factory):
    network, _, onnx_file, result = export_tiny(tmp_path_factory.mktemp("ood"),
                                                parity_images=split_arrays(data, "test")[0],
                                                ood=(split_arrays(data, "train"), split_arrays(data, "val")[0]))
    return network, onnx_file, result


def penultimate(network, images) -> np.ndarray:
    """The input of the final layer, through a hook of this test's own (not FinalLayer)."""
    captured = []
    handle = network.classifier.register_forward_hook(lambda m, args, out: captured.append(args[0]))
    with torch.no_grad():
        network(torch.from_numpy(images))
    handle.remove()
    return captured[0].double().numpy()


@pytest.mark.slow
def test_onnx_ood_score_equals_pytorch_and_the_independent_score(data, exported):
    network, onnx_file, result = exported
    train_images, train_labels = split_arrays(data, "train")
    images = np.concatenate([split_arrays(data, "test")[0],
                             np.random.default_rng(0).random((6, 1, TINY_SIZE, TINY_SIZE), dtype=np.float32)])
    probabilities, scores = OnnxClassifier(onnx_file, device="cpu").predict_with_scores(images)
    expected = independent_score(penultimate(network, train_images), train_labels, penultimate(network, images))
    np.testing.assert_allclose(scores, expected, rtol=1e-3, atol=1e-3)
    detector = fit_detector(network, train_images, train_labels, len(CLASS_NAMES))
    with torch.no_grad():
        torch_probabilities, torch_scores = ScoredClassifier(network, detector)(torch.from_numpy(images))
    np.testing.assert_allclose(scores, torch_scores.double().numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(probabilities, torch_probabilities.numpy(), atol=1e-5)
    assert scores.shape == (len(images),) and (scores >= 0).all()
    assert result["parity"]["ood_score_max_rel_diff"] <= 1e-3


@pytest.mark.slow
def test_threshold_is_the_validation_quantile(data, exported):
    network, onnx_file, result = exported
    classifier = OnnxClassifier(onnx_file, device="cpu")
    train_images, train_labels = split_arrays(data, "train")
    validation = split_arrays(data, "val")[0]
    # the threshold is the abstention state's: the quantile of the float64 scores of the validation slices
    reference = independent_score(penultimate(network, train_images), train_labels, penultimate(network, validation))
    n = len(reference)
    assert n == int(result["metadata"]["ood_n_validation"]) >= 5
    quantile = np.sort(reference)[math.ceil(0.95 * n) - 1]
    assert classifier.ood_threshold == pytest.approx(quantile, rel=1e-6)
    accepted = float(result["metadata"]["ood_validation_acceptance"])
    assert 0.95 <= accepted < 0.95 + 1 / n and accepted == np.mean(reference <= quantile)
    # the exported float32 graph scores those slices within the parity limit of the state's float64 scores
    _, scores = classifier.predict_with_scores(validation)
    np.testing.assert_allclose(scores, reference, rtol=1e-3)
    assert result["parity"]["ood_state_max_rel_diff"] <= 1e-3
    test_scores = classifier.predict_with_scores(split_arrays(data, "test")[0])[1]  # never used for the threshold
    assert not np.isin(classifier.ood_threshold, test_scores)
    assert set(OOD_METADATA_KEYS) <= set(result["metadata"]) and set(DETECTOR_KEYS) <= set(OOD_METADATA_KEYS)


def trained_tiny_network(data, epochs: int = 6) -> torch.nn.Module:
    """A tiny PaperCNN trained a few epochs on the synthetic heads: features that know what a head is."""
    torch.manual_seed(0)
    network = tiny_network(seed=0).train()
    images, labels = (torch.from_numpy(a) for a in split_arrays(data, "train"))
    optimiser = torch.optim.Adam(network.parameters(), lr=3e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(images)).split(16):
            optimiser.zero_grad()
            torch.nn.functional.cross_entropy(network(images[batch]), labels[batch]).backward()
            optimiser.step()
    return network.eval()


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> OnnxClassifier:
    """The trained tiny network exported with its detector (training split) and threshold (validation split)."""
    onnx_file = tmp_path_factory.mktemp("trained") / "model.onnx"
    export_onnx(trained_tiny_network(data), onnx_file, CLASS_NAMES, TINY_SIZE, preprocess=data.settings["preprocess"],
                ood_train=split_arrays(data, "train"), ood_validation=split_arrays(data, "val")[0],
                signing_key=signing_keys()[0])
    return signed_classifier(onnx_file)


@pytest.mark.slow
def test_obviously_ood_series_abstain_with_the_reason_in_report_and_sr(trained, tmp_path):
    classifier = trained
    rng = np.random.default_rng(0)
    heads = generate_slices(n_patients=2, size=96, seed=21, slices_per_patient=(4, 4))["images"][:4]  # unseen patient
    yy, xx = np.mgrid[:96, :96]
    series = {
        "heads": [np.rint(h * 400) for h in heads],
        "noise": [rng.integers(0, 400, (96, 96)).astype(float) for _ in range(4)],
        "checkerboard": [400.0 * (((yy // (4 + k)) + (xx // (4 + k))) % 2) for k in range(4)],
        "mask": [400.0 * (((yy - 40 - 3 * k) / 14) ** 2 + ((xx - 50) / 9) ** 2 < 1) for k in range(4)],
    }
    uids = {}
    for number, (name, images) in enumerate(series.items()):
        paths = write_mr_series(tmp_path / "in" / name, images, series_number=number + 1, rescale=(1.0, 0.0))
        uids[pydicom.dcmread(paths[0]).SeriesInstanceUID] = name
    out = tmp_path / "out"
    summary = infer_dicom(tmp_path / "in", classifier, out, progress=False)
    status = {uids[e["series_instance_uid"]]: e for e in summary["series"]}
    assert status["heads"]["status"] == "classified" and status["heads"]["class"] in CLASS_NAMES
    assert summary["n_series_classified"] == 1 and summary["n_series_abstained"] == 3
    for name in ("noise", "checkerboard", "mask"):
        entry = status[name]
        assert entry["status"] == "abstained" and entry["class"] is None and entry["probability"] is None
        report = json.loads((out / entry["report_file"]).read_text())
        assert report["status"] == "abstained" and report["result"]["class"] is None
        assert report["result"]["n_not_assessable"] > 2 and report["result"]["n_classified"] < 2
        assert all(row["ood_score"] > classifier.ood_threshold for row in report["slices"] if not row["assessable"])
        assert all("class" not in row for row in report["slices"] if not row["assessable"])
        reason = report["result"]["abstention_reason"]
        assert "not assessable" in reason and "the rule allows at most 50% per series" in reason
        sr = pydicom.dcmread(out / entry["sr_file"])
        finding = sr.ContentSequence[0].TextValue
        assert finding.startswith("No tumour type is issued for this series: ") and reason in finding
        assert not any(c in finding for c in CLASS_NAMES)
        refs = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
        assert len(refs) == 4  # the slices examined are cited, though none gave a class
        if shutil.which("dciodvfy"):  # the abstaining SR is as valid as any other
            check = subprocess.run(["dciodvfy", str(out / entry["sr_file"])], capture_output=True, text=True,
                                   timeout=60)
            assert not re.search(r"^(Error|Warning)", check.stdout + check.stderr, re.MULTILINE), check.stderr
    heads = json.loads((out / status["heads"]["report_file"]).read_text())
    studies = {s["series_used"][0]: s for s in summary["studies"]}  # one study per series here
    assert studies[status["heads"]["series_instance_uid"]]["status"] == "classified"
    for name in ("noise", "checkerboard", "mask"):  # the study's answer is the abstention, with its reason
        study = studies[status[name]["series_instance_uid"]]
        assert study["status"] == "abstained" and "cannot vouch" in study["reason"]
    voting = [row for row in heads["slices"] if row["assessable"]]
    mean = np.mean([[row["probabilities"][c] for c in CLASS_NAMES] for row in voting], axis=0)
    np.testing.assert_allclose([heads["result"]["probabilities"][c] for c in CLASS_NAMES], mean, atol=1e-6)
    assert heads["result"]["n_classified"] == len(voting) >= 2  # at most half not assessable: the rule lets it vote


@pytest.mark.slow
def test_an_abstaining_series_is_its_studys_answer(trained, tmp_path):
    """Two series of one study match the series rule; the one ranked first (more slices) is noise: the study
    abstains, and the head series ranked second is not used instead."""
    study = pydicom.uid.generate_uid()
    heads = generate_slices(n_patients=2, size=96, seed=21, slices_per_patient=(4, 4))["images"][:4]
    noise = [np.random.default_rng(k).integers(0, 400, (96, 96)).astype(float) for k in range(5)]
    write_mr_series(tmp_path / "in" / "heads", [np.rint(h * 400) for h in heads], study_uid=study, series_number=1,
                    rescale=(1.0, 0.0))
    write_mr_series(tmp_path / "in" / "noise", noise, study_uid=study, series_number=2, rescale=(1.0, 0.0))
    summary = infer_dicom(tmp_path / "in", trained, tmp_path / "out", progress=False)
    (entry,) = summary["studies"]
    assert entry["status"] == "abstained" and "cannot vouch for series 2" in entry["reason"]
    assert summary["n_series_classified"] == 0 and summary["n_series_abstained"] == 1
    heads_entry, noise_entry = entry["series"]
    assert noise_entry["used"] and noise_entry["abstained"]
    assert not heads_entry["used"] and heads_entry["reason"].startswith("not used: series 2 of the study was chosen")
    sr = pydicom.dcmread(tmp_path / "out" / summary["series"][0]["sr_file"])
    assert re.match(r"No tumour type is issued for this series: [345] of 5 slice\(s\)", sr.ContentSequence[0].TextValue)


@pytest.mark.slow
def test_a_model_without_detector_is_refused_by_dicom_inference(tmp_path, caplog):
    _, _, onnx_file, result = export_tiny(tmp_path, ood=False)
    assert not result["ood_detector"] and not set(OOD_METADATA_KEYS) & set(result["metadata"])
    classifier = OnnxClassifier(onnx_file, device="cpu")  # file inference may still use it, and is told ...
    assert "has no out-of-distribution detector" in caplog.text
    images = np.random.default_rng(0).random((2, 1, TINY_SIZE, TINY_SIZE), dtype=np.float32)
    probabilities, scores = classifier.predict_with_scores(images)
    assert scores is None and not classifier.has_detector and probabilities.shape == (2, 3)
    assert classifier.describe()["ood_detector"] is None
    write_mr_series(tmp_path / "in", gradient_series(3))
    with pytest.raises(ModelMetadataError, match="no out-of-distribution detector .* re-export it"):
        infer_dicom(tmp_path / "in", classifier, tmp_path / "out", progress=False,
                    allow_unsigned=True)  # ... DICOM inference refuses it
    assert not (tmp_path / "out").exists()
    (series,) = scan_folders([tmp_path / "in"], progress=False).series
    with pytest.raises(ModelMetadataError, match="cannot vouch for its inputs"):
        classify_series(series, classifier)
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "infer_dicom.py"), str(tmp_path / "in"), "--model",
                          str(onnx_file), "--output_dir", str(tmp_path / "out"), "--device", "cpu"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stdout == ""
    (line,) = [line for line in run.stderr.splitlines() if line.startswith("infer_dicom: ")]  # besides the log
    assert "no out-of-distribution detector" in line and "scripts/export_onnx.py" in line
    assert "Traceback" not in run.stderr


@pytest.mark.slow
def test_detector_output_and_metadata_come_together(exported, tmp_path):
    _, onnx_file, _ = exported
    tampered = rewrite_metadata(onnx_file, tmp_path / "tampered.onnx", ood_threshold="1e30")  # after export
    with pytest.raises(ModelMetadataError, match="integrity check failed"):
        OnnxClassifier(tampered, device="cpu")
    # resealed as an exporter would, but without its threshold: the detector is incomplete
    resealed = rewrite_metadata(onnx_file, tmp_path / "no_threshold.onnx", reseal=True, ood_threshold=None)
    with pytest.raises(ModelMetadataError, match=r"inconsistent OOD detector .*lacks \['ood_threshold'\]"):
        OnnxClassifier(resealed, device="cpu")


def test_export_needs_both_detector_splits(tmp_path, data):
    with pytest.raises(ValueError, match="give both ood_train"):
        export_onnx(tiny_network(), tmp_path / "m.onnx", CLASS_NAMES, TINY_SIZE, ood_train=split_arrays(data, "train"))


@pytest.mark.parametrize("name", ["max_softmax", "energy", "mahalanobis+max_softmax", "mahalanobis_gate+max_softmax"])
def test_the_exported_graph_computes_the_states_score_by_name(data, tmp_path, name):
    from robustmri.abstention.fit import fit_state, scores_of
    from robustmri.abstention.mahalanobis import DETECTOR_NAME

    network = tiny_network(0)
    checkpoint = tmp_path / "model.pt"
    torch.save(network.state_dict(), checkpoint)
    (train_images, train_labels), validation = split_arrays(data, "train"), split_arrays(data, "val")[0]
    state = fit_state(network, train_images, train_labels, validation, checkpoint, score=name)
    test_images = split_arrays(data, "test")[0]
    result = export_onnx(network, tmp_path / "model.onnx", CLASS_NAMES, TINY_SIZE, checkpoint=checkpoint,
                         preprocess="minmax", parity_images=np.concatenate([validation, test_images]),
                         abstention=state)
    classifier = OnnxClassifier(tmp_path / "model.onnx", device="cpu")
    assert classifier.detector["name"] == name != DETECTOR_NAME
    assert "higher = less assessable" in classifier.detector["description"]
    assert ("scores 1 plus that score's CDF" in classifier.detector["description"]) == ("_gate" in name)
    assert classifier.ood_threshold == pytest.approx(state.threshold, rel=1e-12)
    # the float32 graph scores unseen slices as the float64 state does (a CDF may move one reference step on a tie)
    expected = scores_of(state, network, test_images)
    _, scores = classifier.predict_with_scores(test_images)
    step = 1.0 / len(validation) if "+" in name else 0.0
    assert np.abs(scores - expected).max() <= 1e-4 * np.maximum(1.0, np.abs(expected)).max() + step
    differ = classifier.is_assessable(scores) != state.accepts(expected)
    assert np.all(np.abs(expected[differ] - state.threshold) <= step + 1e-4)  # only a slice at the threshold may
    assert result["parity"]["passed"] and result["metadata"]["ood_detector"] == name
