"""DICOM inference by study: the series rule picks one series, the others are reported with their reason;
outputs carry no patient identifiers; a missing or empty input is one line and exit status 2."""

import hashlib
import json
import os
import re
import uuid

import pydicom
import pytest

from robustmri.bench.dicom_fixtures import FictitiousPatient, write_mr_series
from robustmri.deploy.dicom.series_rule import SeriesRule
from robustmri.deploy.dicom.sr import PATIENT_MODULE, STUDY_MODULE
from robustmri.deploy.dicom.study import LOCK_FILE, DicomInputError, infer_dicom
from robustmri.deploy.onnx.runtime import OnnxClassifier

from deploy_helpers import export_tiny, gradient_detector_data, gradient_series, run_infer_dicom, signed_classifier

pytestmark = pytest.mark.slow  # every test classifies with an exported ONNX model (module fixture) or runs the script


T2 = {"EchoTime": "95", "RepetitionTime": "4000"}
DWI = {"EchoTime": "80", "RepetitionTime": "5000", "ScanningSequence": "EP"}
LOCALISER = {"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A tiny model whose detector accepts the gradient series these tests write (their subject is the study rule)."""
    _, _, onnx_file, _ = export_tiny(tmp_path_factory.mktemp("model"), ood=gradient_detector_data(),
                                     target_acceptance=1.0, signed=True)
    return signed_classifier(onnx_file)


def write_study(folder, study_uid=None, patient=None, **series):
    """Series of one study by name -> (description, attributes, number of slices, series number); their UIDs."""
    study_uid = study_uid or pydicom.uid.generate_uid()
    uids = {}
    for k, (name, (description, attributes, n, number)) in enumerate(series.items()):
        paths = write_mr_series(folder / name, gradient_series(n, seed=k), series_description=description,
                                attributes=attributes, series_number=number, study_uid=study_uid,
                                patient=patient)
        uids[name] = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    return study_uid, uids


def test_one_answer_per_study_from_the_t1_post_contrast_series(tmp_path, classifier):
    study, uids = write_study(tmp_path / "in", localiser=("3-plane loc", LOCALISER, 3, 1),
                              t1_pre=("AX T1 PRE", {}, 4, 2), t2=("AX T2 FSE", T2, 4, 3), dwi=("DWI", DWI, 3, 4),
                              t1_post=("AX T1 POST GD", {}, 4, 5))
    out = tmp_path / "out"
    summary = infer_dicom(tmp_path / "in", classifier, out, progress=False)
    assert summary["status"] == "ok" and summary["n_studies"] == 1 and summary["n_series_classified"] == 1
    (entry,) = summary["series"]
    assert entry["series_instance_uid"] == uids["t1_post"] and entry["report_file"] == f"{study}.json"
    # the run's files, its summary and the output folder's lock file (kept: removing it would race another run)
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{study}.json", f"{study}.sr.dcm", "summary.json",
                                                            LOCK_FILE])
    # the manifest: every file the run wrote, with its sha256 (recomputed here from the files)
    assert {f["file"]: f["sha256"] for f in summary["files"]} == {
        name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in (f"{study}.json", f"{study}.sr.dcm")}
    assert json.loads((out / "summary.json").read_text())["run"] == summary["run"]
    assert uuid.UUID(summary["run"]["run_id"]).version == 4 and summary["run"]["finished"] >= summary["run"]["started"]
    (study_entry,) = summary["studies"]
    assert study_entry["status"] == "classified" and study_entry["series_used"] == [uids["t1_post"]]
    reasons = {s["series_instance_uid"]: s["reason"] for s in study_entry["series"]}
    assert [s["ordinal"] for s in study_entry["series"]] == [1, 2, 3, 4, 5]
    assert reasons[uids["t1_post"]] is None
    assert "ImageType is LOCALIZER" in reasons[uids["localiser"]]
    assert "rule term 'pre'" in reasons[uids["t1_pre"]] and "rule term 't2'" in reasons[uids["t2"]]
    assert "ScanningSequence is EP" in reasons[uids["dwi"]]
    assert {s["series_instance_uid"] for s in summary["skipped_series"]} == set(uids.values()) - {uids["t1_post"]}
    sr = pydicom.dcmread(out / f"{study}.sr.dcm")
    method = sr.ContentSequence[1].TextValue
    assert f"Series used: series 5 of the study, SeriesInstanceUID {uids['t1_post']}, SeriesNumber 5" in method
    for name in ("localiser", "t1_pre", "t2", "dwi"):
        assert f"SeriesInstanceUID {uids[name]}: not T1-weighted post-contrast MR: " in method
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert [s.SeriesInstanceUID for s in evidence] == [uids["t1_post"]]


def test_the_best_matching_series_is_chosen_and_a_failing_one_falls_back(tmp_path, classifier):
    study, uids = write_study(tmp_path / "in", axial=("AX T1 POST", {}, 5, 6),
                              coronal=("COR T1 +C", {"ContrastBolusAgent": "GADOBUTROL"}, 6, 7))
    summary = infer_dicom(tmp_path / "in", classifier, tmp_path / "out", progress=False)
    (entry,) = summary["series"]
    assert entry["series_instance_uid"] == uids["coronal"]  # more evidence: the contrast agent attribute
    reasons = {s["series_instance_uid"]: s["reason"] for s in summary["studies"][0]["series"]}
    assert reasons[uids["axial"]] == "not used: series 2 of the study was chosen (ranked first by the series rule)"
    # the chosen series incomplete: the next matching series answers, and the reason is kept
    (middle,) = [p for p in (tmp_path / "in" / "coronal").iterdir() if pydicom.dcmread(p).InstanceNumber == 3]
    os.remove(middle)
    summary = infer_dicom(tmp_path / "in", classifier, tmp_path / "out2", progress=False)
    (entry,) = summary["series"]
    assert entry["series_instance_uid"] == uids["axial"]
    reasons = {s["series_instance_uid"]: s["reason"] for s in summary["studies"][0]["series"]}
    assert reasons[uids["coronal"]].startswith("incomplete series: missing slice(s)")


def test_per_series_output_classifies_every_matching_series(tmp_path, classifier):
    _, uids = write_study(tmp_path / "in", axial=("AX T1 POST", {}, 3, 6), coronal=("COR T1 POST", {}, 3, 7),
                          t2=("AX T2", T2, 3, 3))
    summary = infer_dicom(tmp_path / "in", classifier, tmp_path / "out", progress=False, output="series")
    assert {e["series_instance_uid"] for e in summary["series"]} == {uids["axial"], uids["coronal"]}
    assert {e["report_file"] for e in summary["series"]} == {f"{uids['axial']}.json", f"{uids['coronal']}.json"}
    with pytest.raises(ValueError, match="output must be one of"):
        infer_dicom(tmp_path / "in", classifier, tmp_path / "out", progress=False, output="everything")


def test_a_study_without_a_matching_series_gets_no_class(tmp_path, classifier):
    study, _ = write_study(tmp_path / "in", t2=("AX T2", T2, 3, 3), pre=("AX T1", {}, 3, 4))
    summary = infer_dicom(tmp_path / "in", classifier, tmp_path / "out", progress=False)
    assert summary["status"] == "no_result" and not summary["series"]
    (entry,) = summary["studies"]
    assert entry["status"] == "no_result" and entry["reason"] == (
        "no series of the study matches the series rule (T1-weighted post-contrast MR)")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [LOCK_FILE, "summary.json"]


def test_series_of_one_study_from_two_patients_are_refused(tmp_path, classifier):
    study = pydicom.uid.generate_uid()
    write_study(tmp_path / "in" / "a", study, FictitiousPatient(patient_id="P1"), t1=("AX T1 POST", {}, 3, 5))
    write_study(tmp_path / "in" / "b", study, FictitiousPatient(patient_id="P2"), t1=("COR T1 POST", {}, 3, 6))
    summary = infer_dicom(tmp_path / "in", classifier, tmp_path / "out", progress=False)
    assert summary["status"] == "no_result" and not summary["series"]
    (entry,) = summary["studies"]
    assert entry["reason"].startswith("refused: the series of this StudyInstanceUID disagree on PatientID "
                                      "(2 values: 1 + 1 series)")
    assert all(s["reason"] == entry["reason"] for s in entry["series"])


def test_the_models_rule_applies_and_an_operators_rule_is_named(tmp_path):
    from robustmri.deploy.dicom.series_rule import DEFAULT_RULE

    network_dir = tmp_path / "model"
    network_dir.mkdir()
    strict = {"max_repetition_time_ms": 400}
    import torch

    from robustmri import CLASS_NAMES
    from robustmri.deploy.onnx.export import export_onnx

    from deploy_helpers import tiny_network

    network = tiny_network()
    torch.save(network.state_dict(), network_dir / "model.pt")
    ood_train, ood_validation = gradient_detector_data()
    export_onnx(network, network_dir / "model.onnx", CLASS_NAMES, 32, checkpoint=network_dir / "model.pt",
                preprocess="minmax", series_rule=strict, ood_train=ood_train, ood_validation=ood_validation, target_acceptance=1.0)
    model = OnnxClassifier(network_dir / "model.onnx", device="cpu")
    assert SeriesRule.from_json(model.metadata["series_rule"]).max_repetition_time_ms == 400
    write_study(tmp_path / "in", t1=("AX T1 POST", {}, 3, 5))  # TR 550 ms
    summary = infer_dicom(tmp_path / "in", model, tmp_path / "out", progress=False,
                          allow_unsigned=True)
    assert summary["status"] == "no_result" and summary["series_rule"]["source"] == "the model's metadata"
    assert "TR above 400 ms" in summary["studies"][0]["series"][0]["reason"]
    summary = infer_dicom(tmp_path / "in", model, tmp_path / "out2", progress=False, series_rule=DEFAULT_RULE.to_json(),
                          allow_unsigned=True)
    assert summary["status"] == "ok"
    assert summary["series_rule"]["source"] == "the operator's configuration, which DIFFERS from the model's metadata"
    sr = pydicom.dcmread(tmp_path / "out2" / summary["series"][0]["sr_file"])
    assert "which DIFFERS from the model's metadata" in sr.ContentSequence[1].TextValue


# Identifiers planted everywhere: header fields, folder and file names; non-ASCII, short and hyphenated parts.
NAME = "Müller-Lüdenscheidt^Zoë Xu"
PLANTED = {"PatientName": NAME, "PatientID": "MRN-7734921", "PatientBirthDate": "19580229",
           "OtherPatientIDs": "ALT-5550123", "PatientComments": "Zoë Müller-Lüdenscheidt prefers mornings",
           "PatientAddress": "Lindenstraße 5 Ödorf", "PatientMotherBirthName": "Kowalczyk",
           "StudyDescription": "MRI HEAD Müller-Lüdenscheidt", "ReferringPhysicianName": "Okonkwo^Chidi",
           "InstitutionName": "St Hildegard Klinik", "OperatorsName": "Vasquez^Ana", "StudyID": "S7734",
           "AccessionNumber": "ACC9912", "RequestingPhysician": "Brandauer^Felix",
           "PerformingPhysicianName": "Nakamura^Haru", "ImageComments": "Lüdenscheidt check",
           "ProtocolName": "T1 POST Lüdenscheidt"}
SECRETS = ("Müller", "Lüdenscheidt", "Zoë", "Xu", "MRN-7734921", "19580229", "ALT-5550123", "mornings",
           "Lindenstraße", "Kowalczyk", "Okonkwo", "Chidi", "Hildegard", "Vasquez", "Brandauer", "Nakamura",
           "Zoe", "Mueller", "Luedenscheidt")
#: The only places an identifier may appear: the SR's required Patient and General Study attributes.
SR_ALLOWED = set(PATIENT_MODULE + STUDY_MODULE)


def leaks(text: str) -> list[str]:
    return [s for s in SECRETS if re.search(rf"(?<![A-Za-z]){re.escape(s)}(?![A-Za-z])", text, re.IGNORECASE)]


def test_no_identifier_reaches_any_output_except_the_srs_required_attributes(tmp_path, classifier):
    folder = tmp_path / "in" / "Müller-Lüdenscheidt_Zoë_Xu" / "MRN-7734921"
    study = pydicom.uid.generate_uid()
    attributes = {**PLANTED, "SpecificCharacterSet": "ISO_IR 192", "SeriesDescription": "AX T1 POST GD Zoë Xu"}
    write_mr_series(folder / "t1", gradient_series(3), study_uid=study, attributes=attributes,
                    file_names=["Müller_1.dcm", "Xu-2.dcm", "Zoë 3.dcm"])
    write_mr_series(folder / "t2", gradient_series(3), study_uid=study, series_description="T2 Müller",
                    attributes={**PLANTED, **T2, "SpecificCharacterSet": "ISO_IR 192"}, series_number=3)
    (folder / "Kowalczyk notes.txt").write_text("not dicom")
    out = tmp_path / "out"
    result = run_infer_dicom(tmp_path / "in", "--model", classifier.model_file, "--output_dir", out, "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    assert leaks(result.stdout + result.stderr) == []
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_series_classified"] == 1 and summary["n_files_skipped"] == 1
    for path in out.iterdir():
        if path.suffix == ".json":
            assert leaks(path.read_text()) == [], path.name
    (sr_file,) = out.glob("*.sr.dcm")
    sr = pydicom.dcmread(sr_file)
    assert str(sr.PatientName) == NAME and sr.PatientID == "MRN-7734921" and sr.PatientBirthDate == "19580229"
    assert sr.ReferringPhysicianName == "" and "PatientComments" not in sr and "StudyDescription" not in sr
    outside = []

    def visit(dataset):
        for element in dataset:
            if element.VR == "SQ":
                for item in element.value:
                    visit(item)
            elif element.keyword not in SR_ALLOWED:
                outside.append(f"{element.keyword}={element.value}")
    visit(sr)
    assert leaks("\n".join(outside)) == []
    # with include_paths, file paths are given for local debugging, and only then
    summary = infer_dicom(tmp_path / "in", classifier, tmp_path / "debug", progress=False, include_paths=True)
    assert "Kowalczyk notes.txt" in json.dumps(summary["skipped_files"], ensure_ascii=False)


run_script = run_infer_dicom  # signed models: the script checks their signature with the test key


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_missing_or_empty_input_is_one_line_exit_2_and_a_summary(tmp_path, classifier, case):
    source = tmp_path / "nothing_here"
    if case == "empty":
        source.mkdir()
    result = run_script(source, "--model", classifier.model_file, "--output_dir", tmp_path / "out", "--device", "cpu")
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["status"] == "no_input"
    assert summary["reason"] == ("1 input path(s) not found" if case == "missing" else "no files under the input folder(s)")
    with pytest.raises(DicomInputError):
        infer_dicom(source, classifier, tmp_path / "out2", progress=False)


def test_a_folder_of_many_non_dicom_files_is_summarised(tmp_path, classifier):
    for i in range(60):
        (tmp_path / "in" / "misc").mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / "misc" / f"note{i}.txt").write_text("x")
    write_mr_series(tmp_path / "in" / "t1", gradient_series(3))
    result = run_script(tmp_path / "in", "--model", classifier.model_file, "--output_dir", tmp_path / "out",
                        "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(result.stdout.splitlines()) == 2  # one line per study, one summary line
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert warnings == ["WARNING robustmri.deploy.dicom.study: skipped 60 file(s): not a DICOM Part 10 file: "
                        "no 'DICM' prefix or file meta information"]  # a fixed phrase: no exception text
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["skipped_files"] == [{"reason": warnings[0].split("file(s): ", 1)[1], "count": 60}]


def test_explicit_cuda_without_a_usable_provider_is_an_error(tmp_path, classifier):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime offers CUDA")
    write_mr_series(tmp_path / "in", gradient_series(3))
    result = run_script(tmp_path / "in", "--model", classifier.model_file, "--output_dir", tmp_path / "out",
                        "--device", "cuda")
    assert result.returncode == 2 and "device 'cuda' asked for" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
