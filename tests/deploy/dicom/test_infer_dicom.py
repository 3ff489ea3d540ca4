"""DICOM series inference end to end: real slices as MR series among bad files, reports, SR, privacy."""

import csv
import json
import logging
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from robustmri.bench.dicom_fixtures import FictitiousPatient, write_mr_series
from robustmri.data.preprocessing import preprocess_minmax
from robustmri.data.readers import read_image
from robustmri.deploy.dicom.classify import AGGREGATION_RULE
from robustmri.deploy.dicom.study import infer_dicom

from conftest import BUNDLE, FIGSHARE
from deploy_helpers import (
    TINY_SIZE,
    copy_pydicom_files,
    export_tiny,
    gradient_detector_data,
    gradient_series,
    run_infer_dicom,
    signed_classifier,
    signing_keys,
)

pytestmark = pytest.mark.slow  # every test classifies with an exported ONNX model (module fixture) or runs the bundle


PATIENT = FictitiousPatient(name="Testpatient^Alice", patient_id="RMRI-000123", birth_date="19610704")
IDENTIFIERS = ("Testpatient", "Alice", "RMRI-000123", "19610704")
BAD_FILES = {"badVR.dcm": "invalid NumberOfFrames",
             "no_meta.dcm": "not a DICOM Part 10 file", "rtplan.dcm": "no pixel data",
             "reportsi.dcm": "no pixel data: Basic Text SR Storage", "notes.txt": "not a DICOM Part 10 file"}


def first_rows(figshare: Path) -> list[dict]:
    """The figshare slices of the first test: 4 glioma, then 3 meningioma."""
    rows = list(csv.DictReader(open(figshare / "labels.csv")))
    by_class = {name: [r for r in rows if r["label_name"] == name] for name in ("glioma", "meningioma")}
    return by_class["glioma"][:4] + by_class["meningioma"][:3]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny model whose detector accepts every slice these tests classify (their subject is the series logic)."""
    figshare = FIGSHARE if (FIGSHARE / "labels.csv").is_file() else None
    extra = [read_image(figshare / r["file"]) for r in first_rows(figshare)] if figshare else []
    network, _, onnx_file, _ = export_tiny(tmp_path_factory.mktemp("model"), ood=gradient_detector_data(extra=extra),
                                           target_acceptance=1.0, signed=True)
    return network, signed_classifier(onnx_file)


def reference_probabilities(network, images) -> np.ndarray:
    """PyTorch on the original arrays, prepared by the training preprocessing."""
    prepared = [preprocess_minmax(np.asarray(i, np.float32), TINY_SIZE) for i in images]
    batch = torch.from_numpy(np.stack(prepared)[:, None])
    with torch.no_grad():
        return torch.softmax(network(batch), 1).numpy()


def assert_no_identifiers(text: str):
    for value in IDENTIFIERS:
        assert value.lower() not in text.lower(), f"{value!r} leaked"


def test_real_series_among_bad_files(tmp_path, figshare_dir, model, caplog):
    network, classifier = model
    rows = first_rows(figshare_dir)
    series_images = {"glioma": [read_image(figshare_dir / r["file"]) for r in rows[:4]],
                     "meningioma": [read_image(figshare_dir / r["file"]) for r in rows[4:]]}
    patient_folder = tmp_path / "in" / "TESTPATIENT_ALICE"  # as some PACS exports name folders
    written = {}
    for k, (name, images) in enumerate(series_images.items()):
        names = [f"{(k * 7919 + i * 104729) % 1000003:07d}" for i in range(len(images))]  # shuffled, no order
        written[name] = write_mr_series(patient_folder, images, patient=PATIENT, series_number=k + 3, file_names=names)
    copy_pydicom_files(tmp_path / "in" / "misc", *[n for n in BAD_FILES if n.endswith(".dcm")], "CT_small.dcm",
                       "MR_truncated.dcm")
    (tmp_path / "in" / "misc" / "notes.txt").write_text("scanner log")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        summary = infer_dicom([tmp_path / "in"], classifier, out, progress=False, include_paths=True)

    assert summary["n_series_classified"] == 2 and summary["provider"] == "CPUExecutionProvider"
    assert summary["status"] == "ok" and summary["n_studies"] == 4
    skipped = {os.path.basename(f): s["reason"] for s in summary["skipped_files"] for f in s["files"]}
    for name, reason in BAD_FILES.items():
        assert reason in skipped[name], (name, skipped.get(name))
    assert summary["n_files_skipped"] == sum(s["count"] for s in summary["skipped_files"]) == len(BAD_FILES)
    series_reasons = [s["reason"] for s in summary["skipped_series"]]
    assert any("Modality 'CT'" in r for r in series_reasons)
    # pydicom's MR_truncated.dcm is a derived image: ruled out by the series rule before its pixels are read
    assert any("not T1-weighted post-contrast MR: ImageType is DERIVED" in r for r in series_reasons)

    for entry in summary["series"]:
        report = json.loads((out / entry["report_file"]).read_text())
        assert entry["report_file"] == f"{report['study_instance_uid']}.json"  # one report per study
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
        sr = pydicom.dcmread(out / entry["sr_file"])
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
    summary = infer_dicom(tmp_path / "in", classifier, tmp_path / "out", on_slice_error=policy, progress=False,
                          include_paths=True)
    assert [os.path.basename(f) for s in summary["skipped_files"] for f in s["files"]] == [os.path.basename(paths[1])]
    if policy == "fail":
        assert summary["n_series_classified"] == 0
        assert "1 of 4 slice(s) could not be read" in summary["skipped_series"][0]["reason"]
    else:
        (entry,) = summary["series"]
        report = json.loads((tmp_path / "out" / entry["report_file"]).read_text())
        assert report["result"]["n_classified"] == 3 and report["result"]["n_failed"] == 1
        assert [s["status"] for s in report["slices"]] == ["classified", "error", "classified", "classified"]
        sr = pydicom.dcmread(tmp_path / "out" / entry["sr_file"])
        refs = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
        assert len(refs) == 3 and "1 unreadable" in sr.ContentSequence[1].TextValue


def test_constant_slice_is_excluded_not_classified(tmp_path, model):
    network, classifier = model
    images = gradient_series(3)
    images.insert(1, np.full_like(images[0], 100.0))
    write_mr_series(tmp_path / "in", images)
    (entry,) = infer_dicom(tmp_path / "in", classifier, tmp_path / "out", progress=False)["series"]
    report = json.loads((tmp_path / "out" / entry["report_file"]).read_text())
    assert [s["status"] for s in report["slices"]] == ["classified", "excluded", "classified", "classified"]
    expected = reference_probabilities(network, [images[0]] + images[2:]).mean(0)
    np.testing.assert_allclose(list(report["result"]["probabilities"].values()), expected, atol=1e-4)


OTHER = FictitiousPatient(name="Otherpatient^Bruno", patient_id="RMRI-000456", birth_date="19700101", sex="M")
OTHER_IDENTIFIERS = ("Otherpatient", "Bruno", "RMRI-000456", "19700101")


def test_two_patients_sharing_a_series_uid_are_refused(tmp_path, model):
    _, classifier = model
    shared = pydicom.uid.generate_uid()
    alice = write_mr_series(tmp_path / "in" / "a", gradient_series(3), patient=PATIENT, series_uid=shared)
    bruno = write_mr_series(tmp_path / "in" / "b", gradient_series(2, seed=1), patient=OTHER, series_uid=shared)
    ordinary = write_mr_series(tmp_path / "in" / "c", gradient_series(3), patient=PATIENT)
    out = tmp_path / "out"
    summary = infer_dicom(tmp_path / "in", classifier, out, progress=False, include_paths=True)

    (entry,) = summary["series"]  # the ordinary series is still classified
    assert entry["series_instance_uid"] != shared and entry["complete"] is True
    report = json.loads((out / entry["report_file"]).read_text())
    assert sorted(row["file"] for row in report["slices"]) == sorted(ordinary)  # no image of the shared UID
    assert not (out / f"{shared}.json").exists() and not (out / f"{shared}.sr.dcm").exists()
    (refused,) = [s for s in summary["skipped_series"] if s["series_instance_uid"] == shared]
    reason = refused["reason"]
    assert refused["n_files"] == 5 and reason == (
        "refused: files sharing one SeriesInstanceUID disagree on PatientID (2 values: 3 + 2 files), "
        "StudyInstanceUID (2 values: 3 + 2 files); files of different patients, studies or modalities are never "
        "merged, none of the 5 files is used")
    not_used = {f: item["reason"] for item in summary["skipped_files"] for f in item["files"]}
    assert sorted(not_used) == sorted(alice + bruno) and set(not_used.values()) == {f"not used: {reason}"}
    for value in IDENTIFIERS + OTHER_IDENTIFIERS:
        assert value.lower() not in json.dumps(summary).lower(), f"{value!r} leaked"
    assert summary["grouping_policy"].startswith("A series is the files that agree on PatientID")


@pytest.mark.parametrize("allow_incomplete", [False, True])
def test_missing_slice_gives_no_result_unless_allowed(tmp_path, model, allow_incomplete):
    _, classifier = model
    paths = write_mr_series(tmp_path / "in" / "gap", gradient_series(5))
    os.remove(paths[2])  # positions -40, -34, [-28 missing], -22, -16 mm
    gap_uid = pydicom.dcmread(paths[0]).SeriesInstanceUID
    write_mr_series(tmp_path / "in" / "ordinary", gradient_series(3))
    summary = infer_dicom(tmp_path / "in", classifier, tmp_path / "out", allow_incomplete=allow_incomplete,
                          progress=False)
    gap = ("missing slice(s) between positions -34.00 mm and -22.00 mm, gap 12.00 mm against median 6.00 mm "
           "(limit 1.5 x median)")
    entries = {e["series_instance_uid"]: e for e in summary["series"]}
    (ordinary,) = [e for uid, e in entries.items() if uid != gap_uid]
    assert ordinary["complete"] is True and ordinary["incomplete_reason"] is None and ordinary["n_slices"] == 3
    if not allow_incomplete:
        assert gap_uid not in entries and [p.name for p in (tmp_path / "out").glob("*.json")] == [
            ordinary["report_file"], "summary.json"] or sorted(p.name for p in (tmp_path / "out").glob("*.json")) == \
            sorted([ordinary["report_file"], "summary.json"])
        (skipped,) = summary["skipped_series"]
        assert skipped["series_instance_uid"] == gap_uid and skipped["reason"] == (
            f"incomplete series: {gap}; no result from an incomplete series "
            "(allow_incomplete classifies it, marked incomplete)")
    else:
        entry = entries[gap_uid]
        assert entry["complete"] is False and entry["incomplete_reason"] == gap and entry["n_slices"] == 4
        report = json.loads((tmp_path / "out" / entry["report_file"]).read_text())
        assert report["complete"] is False and report["incomplete_reason"] == gap
        sr = pydicom.dcmread(tmp_path / "out" / entry["sr_file"])
        assert f"INCOMPLETE SERIES, classified only because incomplete series were allowed: {gap}." in \
            sr.ContentSequence[1].TextValue
        assert not summary["skipped_series"]


run_script = run_infer_dicom  # signed models: the script checks their signature with the test key


def test_script_prints_a_summary_without_identifiers(tmp_path, model):
    _, classifier = model
    write_mr_series(tmp_path / "in", gradient_series(3), patient=PATIENT)
    result = run_script(tmp_path / "in", "--model", classifier.model_file, "--output_dir", tmp_path / "out",
                        "--series_description", "T1", "--device", "cpu", "--json_summary")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert summary["n_series_classified"] == 1 and summary["provider"] == "CPUExecutionProvider"
    assert_no_identifiers(result.stdout + result.stderr)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["allow_incomplete"] is False
    result = run_script(tmp_path / "in", "--model", classifier.model_file, "--output_dir", tmp_path / "out3",
                        "--allow_incomplete", "--device", "cpu", "--quiet")
    assert result.returncode == 0 and json.loads((tmp_path / "out3" / "summary.json").read_text())["allow_incomplete"]
    assert "{" not in result.stdout and "study 1: " in result.stdout  # a short text summary, no bulk JSON
    assert_no_identifiers(result.stdout + result.stderr)
    copy_pydicom_files(tmp_path / "ct", "CT_small.dcm")
    result = run_script(tmp_path / "ct", "--model", classifier.model_file, "--output_dir", tmp_path / "out2",
                        "--json_summary")
    assert result.returncode == 1 and "no study was answered (no_result)" in result.stderr
    assert "Modality 'CT'" in json.loads(result.stdout)["skipped_series"][0]["reason"]


def test_bundle_exports_and_classifies_dicom(tmp_path):
    from robustmri.data.synthetic import generate_slices
    from robustmri.networks import PaperCNN

    from helpers import TINY, bundle

    network_args = ["--spatial_size", "32", "--network_padding", "2"]  # the network TINY configures
    torch.manual_seed(0)
    torch.save(PaperCNN(spatial_size=32, padding=2).state_dict(), tmp_path / "model.pt")
    dirs = ["--ckpt_dir", str(tmp_path), "--output_dir", str(tmp_path / "eval")]
    bundle("run", "exporting", "--config_file", "['configs/train.json','configs/export.json']", *TINY, *dirs,
           "--signing_key", signing_keys()[0])
    assert (tmp_path / "model.onnx").is_file()
    heads = generate_slices(n_patients=1, size=96, seed=11, slices_per_patient=(4, 4))["images"]  # unseen patient
    write_mr_series(tmp_path / "dicom" / "heads", list(np.rint(heads * 400)), series_number=1)
    write_mr_series(tmp_path / "dicom" / "gradients", gradient_series(3), series_number=2)
    infer = ["run", "dicom_inference", "--config_file", "['configs/train.json','configs/infer_dicom.json']",
             *network_args, *dirs, "--dicom_inputs", str(tmp_path / "dicom")]
    refused = bundle(*infer, check=False)  # signed by default: no public key given, the model is refused
    assert refused.returncode != 0 and "allow_unsigned" in refused.stdout + refused.stderr
    assert not (tmp_path / "eval" / "dicom" / "summary.json").exists()
    bundle(*infer, "--model_public_key", signing_keys()[1])
    summary = json.loads((tmp_path / "eval" / "dicom" / "summary.json").read_text())
    assert summary["model"]["version"] == json.loads((BUNDLE / "configs" / "metadata.json").read_text())["version"]
    assert summary["model"]["signature"] == "verified"
    detector = summary["model"]["ood_detector"]  # fitted on the synthetic training split, calibrated on its validation
    assert detector["target_acceptance"] == 0.95 and detector["n_train"] > 0
    by_slices = {entry["n_slices"] + entry["n_not_assessable"]: entry for entry in summary["series"]}
    assert summary["n_series_classified"] == 1 and by_slices[4]["status"] == "classified"
    assert summary["n_series_abstained"] == 1 and by_slices[3]["status"] == "abstained"
    assert "not assessable" in by_slices[3]["abstention_reason"]
