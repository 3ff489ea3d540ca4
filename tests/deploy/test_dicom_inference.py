"""DICOM series inference end to end: real slices as MR series among bad files, reports, SR, privacy."""

import csv
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pydicom
import pytest
import torch

from robustmri.data.preprocessing import preprocess
from robustmri.data.readers import read_image
from robustmri.deploy.dicom_fixtures import FictitiousPatient, write_mr_series
from robustmri.deploy.dicom_inference import AGGREGATION_RULE, infer_dicom
from robustmri.deploy.onnx_runtime import OnnxClassifier

from conftest import BUNDLE, ROOT
from deploy_helpers import TINY_SIZE, copy_pydicom_files, export_tiny, gradient_series

PATIENT = FictitiousPatient(name="Testpatient^Alice", patient_id="RMRI-000123", birth_date="19610704")
IDENTIFIERS = ("Testpatient", "Alice", "RMRI-000123", "19610704")
BAD_FILES = {"MR_truncated.dcm": "cannot decode pixel data", "badVR.dcm": "invalid NumberOfFrames",
             "no_meta.dcm": "not a DICOM Part 10 file", "rtplan.dcm": "no pixel data",
             "reportsi.dcm": "no pixel data: Basic Text SR Storage", "notes.txt": "not a DICOM Part 10 file"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    network, _, onnx_file, _ = export_tiny(tmp_path_factory.mktemp("model"))
    return network, OnnxClassifier(onnx_file, device="cpu")


def reference_probabilities(network, images) -> np.ndarray:
    """PyTorch on the original arrays, prepared by the training preprocessing."""
    batch = torch.from_numpy(np.stack([preprocess(np.asarray(i, np.float32), TINY_SIZE) for i in images])[:, None])
    with torch.no_grad():
        return torch.softmax(network(batch), 1).numpy()


def assert_no_identifiers(text: str):
    for value in IDENTIFIERS:
        assert value.lower() not in text.lower(), f"{value!r} leaked"


def test_real_series_among_bad_files(tmp_path, figshare_dir, model, caplog):
    network, classifier = model
    rows = list(csv.DictReader(open(figshare_dir / "labels.csv")))
    series_images = {
        "glioma": [read_image(figshare_dir / r["file"]) for r in [r for r in rows if r["label_name"] == "glioma"][:4]],
        "meningioma": [read_image(figshare_dir / r["file"]) for r in [r for r in rows if r["label_name"] == "meningioma"][:3]],
    }
    patient_folder = tmp_path / "in" / "TESTPATIENT_ALICE"  # as some PACS exports name folders
    written = {}
    for k, (name, images) in enumerate(series_images.items()):
        names = [f"{(k * 7919 + i * 104729) % 1000003:07d}" for i in range(len(images))]  # shuffled, no order
        written[name] = write_mr_series(patient_folder, images, patient=PATIENT, series_number=k + 3, file_names=names)
    copy_pydicom_files(tmp_path / "in" / "misc", *[n for n in BAD_FILES if n.endswith(".dcm")], "CT_small.dcm")
    (tmp_path / "in" / "misc" / "notes.txt").write_text("scanner log")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        summary = infer_dicom([tmp_path / "in"], classifier, out, progress=False)

    assert summary["n_series_classified"] == 2 and summary["provider"] == "CPUExecutionProvider"
    skipped = {os.path.basename(s["file"]): s["reason"] for s in summary["skipped_files"]}
    for name, reason in BAD_FILES.items():
        assert reason in skipped[name], (name, skipped.get(name))
    series_reasons = [s["reason"] for s in summary["skipped_series"]]
    assert any("Modality 'CT'" in r for r in series_reasons)
    assert any("could not be read" in r for r in series_reasons)  # the truncated file's own series

    for entry in summary["series"]:
        report = json.loads((out / f"{entry['series_instance_uid']}.json").read_text())
        name = "glioma" if report["result"]["n_slices"] == 4 else "meningioma"
        expected = reference_probabilities(network, series_images[name])
        assert [s["file"].rsplit("/", 1)[-1] for s in report["slices"]] == [p.rsplit("/", 1)[-1] for p in written[name]]
        got = np.array([[s["probabilities"][c] for c in classifier.class_names] for s in report["slices"]])
        np.testing.assert_allclose(got, expected, atol=1e-4)
        mean = expected.mean(0)
        np.testing.assert_allclose([report["result"]["probabilities"][c] for c in classifier.class_names], mean,
                                   atol=1e-4)
        assert report["result"]["class"] == classifier.class_names[int(mean.argmax())] == entry["class"]
        assert report["result"]["aggregation"] == AGGREGATION_RULE and report["not_for_clinical_use"]
        assert report["model"]["version"] == "9.9.9" and report["model"]["provider"] == "CPUExecutionProvider"
        sr = pydicom.dcmread(out / f"{entry['series_instance_uid']}.sr.dcm")
        assert sr.PatientName == PATIENT.name and sr.PatientID == PATIENT.patient_id  # DICOM requires them
        assert sr.VerificationFlag == "UNVERIFIED" and "NOT FOR CLINICAL USE" in sr.SeriesDescription
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert evidence.SeriesInstanceUID == entry["series_instance_uid"]
        assert [r.ReferencedSOPInstanceUID for r in evidence.ReferencedSOPSequence] == \
            [s["sop_instance_uid"] for s in report["slices"]]
        assert report["result"]["class"] in sr.ContentSequence[0].TextValue
        assert "/[redacted]_[redacted]/" in report["slices"][0]["file"]  # the folder named after the patient
        assert_no_identifiers(json.dumps(report))
    assert_no_identifiers((out / "summary.json").read_text())
    assert_no_identifiers(caplog.text)


def truncate(path, keep_bytes=2000):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) - keep_bytes])


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_one_unreadable_slice(tmp_path, model, policy):
    _, classifier = model
    paths = write_mr_series(tmp_path / "in", gradient_series(4))
    truncate(paths[1])
    summary = infer_dicom(tmp_path / "in", classifier, tmp_path / "out", on_slice_error=policy, progress=False)
    assert [os.path.basename(s["file"]) for s in summary["skipped_files"]] == [os.path.basename(paths[1])]
    if policy == "fail":
        assert summary["n_series_classified"] == 0
        assert "1 of 4 slice(s) could not be read" in summary["skipped_series"][0]["reason"]
    else:
        (entry,) = summary["series"]
        report = json.loads((tmp_path / "out" / f"{entry['series_instance_uid']}.json").read_text())
        assert report["result"]["n_classified"] == 3 and report["result"]["n_failed"] == 1
        assert [s["status"] for s in report["slices"]] == ["classified", "error", "classified", "classified"]
        sr = pydicom.dcmread(entry["sr_file"])
        refs = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
        assert len(refs) == 3 and "1 unreadable" in sr.ContentSequence[1].TextValue


def test_constant_slice_is_excluded_not_classified(tmp_path, model):
    network, classifier = model
    images = gradient_series(3)
    images.insert(1, np.full_like(images[0], 100.0))
    write_mr_series(tmp_path / "in", images)
    (entry,) = infer_dicom(tmp_path / "in", classifier, tmp_path / "out", progress=False)["series"]
    report = json.loads((tmp_path / "out" / f"{entry['series_instance_uid']}.json").read_text())
    assert [s["status"] for s in report["slices"]] == ["classified", "excluded", "classified", "classified"]
    expected = reference_probabilities(network, [images[0]] + images[2:]).mean(0)
    np.testing.assert_allclose(list(report["result"]["probabilities"].values()), expected, atol=1e-4)


def run_script(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "infer_dicom.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_script_prints_a_summary_without_identifiers(tmp_path, model):
    _, classifier = model
    write_mr_series(tmp_path / "in", gradient_series(3), patient=PATIENT)
    result = run_script(tmp_path / "in", "--model", classifier.model_file, "--output_dir", tmp_path / "out",
                        "--series_description", "T1", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert summary["n_series_classified"] == 1 and summary["provider"] == "CPUExecutionProvider"
    assert_no_identifiers(result.stdout + result.stderr)
    copy_pydicom_files(tmp_path / "ct", "CT_small.dcm")
    result = run_script(tmp_path / "ct", "--model", classifier.model_file, "--output_dir", tmp_path / "out2")
    assert result.returncode == 1 and "no series classified" in result.stderr
    assert "Modality 'CT'" in json.loads(result.stdout)["skipped_series"][0]["reason"]


@pytest.mark.slow
def test_bundle_exports_and_classifies_dicom(tmp_path):
    from robustmri.networks import PaperCNN

    from helpers import TINY, bundle

    network_args = ["--spatial_size", "32", "--network_padding", "2"]  # the network TINY configures
    torch.save(PaperCNN(spatial_size=32, padding=2).state_dict(), tmp_path / "model.pt")
    dirs = ["--ckpt_dir", str(tmp_path), "--output_dir", str(tmp_path / "eval")]
    bundle("run", "exporting", "--config_file", "['configs/train.json','configs/export.json']", *TINY, *dirs)
    assert (tmp_path / "model.onnx").is_file()
    write_mr_series(tmp_path / "dicom", gradient_series(3))
    bundle("run", "dicom_inference", "--config_file", "['configs/train.json','configs/infer_dicom.json']",
           *network_args, *dirs, "--dicom_inputs", str(tmp_path / "dicom"))
    summary = json.loads((tmp_path / "eval" / "dicom" / "summary.json").read_text())
    assert summary["n_series_classified"] == 1 and summary["series"][0]["n_slices"] == 3
    assert summary["model"]["version"] == json.loads((BUNDLE / "configs" / "metadata.json").read_text())["version"]
