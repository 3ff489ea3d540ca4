"""The Basic Text SR read back with pydicom: what it copies, what is new, what it references and says;
and checked by dciodvfy (dicom3tools) when it is installed."""

import json
import shutil
import subprocess

import pydicom
import pytest

from robustmri import INTENDED_USE
from robustmri.bench.dicom_fixtures import write_enhanced_mr, write_mr_series
from robustmri.deploy.dicom.sr import BASIC_TEXT_SR_STORAGE, write_sr
from robustmri.deploy.dicom.study import DicomInputError, infer_dicom

from deploy_helpers import export_tiny, gradient_series, pydicom_file, signed_classifier

SOURCE = pydicom_file("MR_small.dcm")


def make_sr(tmp_path, source=None):
    source = source or pydicom.dcmread(SOURCE)
    references = [(str(source.SOPClassUID), str(source.SOPInstanceUID)), ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.4")]
    path = write_sr(tmp_path / "out" / "r.sr.dcm", source, str(source.SeriesInstanceUID), references,
                    "Predicted tumour type: glioma.", ["Model: test", "Aggregation: mean"])
    return source, references, pydicom.dcmread(path)


def test_sr_copies_patient_and_study_with_new_series_and_instance(tmp_path):
    source, _, sr = make_sr(tmp_path)
    assert sr.file_meta.MediaStorageSOPClassUID == sr.SOPClassUID == BASIC_TEXT_SR_STORAGE
    assert sr.file_meta.MediaStorageSOPInstanceUID == sr.SOPInstanceUID
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                    "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName"):
        assert sr.get(keyword) == source.get(keyword), keyword
    assert sr.Modality == "SR"
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID and sr.SOPInstanceUID != source.SOPInstanceUID
    assert pydicom.uid.UID(sr.SeriesInstanceUID).is_valid and pydicom.uid.UID(sr.SOPInstanceUID).is_valid


def test_sr_is_unverified_and_says_not_for_clinical_use(tmp_path):
    _, _, sr = make_sr(tmp_path)
    assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
    assert "NOT FOR CLINICAL USE" in sr.SeriesDescription and len(sr.SeriesDescription) <= 64
    texts = {item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue for item in sr.ContentSequence}
    assert texts["Finding"] == "Predicted tumour type: glioma."
    assert texts["Procedure Description"] == "Model: test\nAggregation: mean"
    assert "NOT FOR CLINICAL USE" in texts["Comment"]
    assert sr.ValueType == "CONTAINER" and sr.ConceptNameCodeSequence[0].CodeValue == "18748-4"


def comment_of(sr) -> str:
    """The TextValue of the SR's one Comment item (its content tree read back with pydicom)."""
    (comment,) = [item for item in sr.ContentSequence if item.ValueType == "TEXT"
                  and item.ConceptNameCodeSequence[0].CodeMeaning == "Comment"]
    return comment.TextValue


def test_sr_states_the_intended_use_word_for_word(tmp_path):
    _, _, sr = make_sr(tmp_path)
    assert "does not detect tumours" in INTENDED_USE and "known to contain" in INTENDED_USE
    assert INTENDED_USE in comment_of(sr)


def test_sr_references_the_source_series_and_images(tmp_path):
    source, references, sr = make_sr(tmp_path)
    (evidence,) = sr.CurrentRequestedProcedureEvidenceSequence
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    (series,) = evidence.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert [(r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID) for r in series.ReferencedSOPSequence] == references
    images = sr.ContentSequence[0].ContentSequence
    assert all(i.ValueType == "IMAGE" and i.RelationshipType == "INFERRED FROM" for i in images)
    assert [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in images] == [r[1] for r in references]


def test_missing_type2_patient_attributes_are_written_empty(tmp_path):
    source = pydicom.dcmread(SOURCE)
    del source.PatientBirthDate
    _, _, sr = make_sr(tmp_path, source)
    assert "PatientBirthDate" in sr and sr.PatientBirthDate == ""


def test_multi_frame_instance_referenced_once_with_its_frames(tmp_path):
    source = pydicom.dcmread(SOURCE)
    enhanced = "1.2.840.10008.5.1.4.1.1.4.1"
    references = [(enhanced, "1.2.3.9", 4), (str(source.SOPClassUID), str(source.SOPInstanceUID), None),
                  (enhanced, "1.2.3.9", 2), (enhanced, "1.2.3.8", 1)]
    path = write_sr(tmp_path / "r.sr.dcm", source, str(source.SeriesInstanceUID), references, "finding", ["method"])
    sr = pydicom.dcmread(path)
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert [r.ReferencedSOPInstanceUID for r in evidence] == ["1.2.3.9", str(source.SOPInstanceUID), "1.2.3.8"]
    assert not any("ReferencedFrameNumber" in r for r in evidence)
    images = [i.ReferencedSOPSequence[0] for i in sr.ContentSequence[0].ContentSequence]
    assert [(i.ReferencedSOPInstanceUID, i.get("ReferencedFrameNumber")) for i in images] == [
        ("1.2.3.9", [4, 2]), (str(source.SOPInstanceUID), None), ("1.2.3.8", 1)]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    from robustmri.deploy.onnx.runtime import OnnxClassifier

    _, _, onnx_file, _ = export_tiny(tmp_path_factory.mktemp("model"), signed=True)
    return signed_classifier(onnx_file)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian package dicom3tools) is not installed")
@pytest.mark.parametrize("form", ["single-frame", "enhanced", "legacy-converted"])
def test_sr_passes_dciodvfy_without_error_or_warning(tmp_path, classifier, form):
    images = gradient_series(5)
    if form == "single-frame":
        write_mr_series(tmp_path / "in", images)
    else:
        write_enhanced_mr(tmp_path / "in" / "mf.dcm", images, frame_order=[3, 0, 4, 2, 1],
                          legacy=form == "legacy-converted")
    summary = infer_dicom(tmp_path / "in", classifier, tmp_path / "out", progress=False)
    (series,) = summary["series"]
    result = subprocess.run(["dciodvfy", str(tmp_path / "out" / series["sr_file"])], capture_output=True, text=True,
                            timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    assert lines and lines[0].strip() == "BasicTextSR", lines  # the IOD dciodvfy checked it against
    problems = [line for line in lines if line.startswith(("Error", "Warning"))]
    assert not problems, "\n".join(problems)


@pytest.mark.slow  # classifies with an exported ONNX model
def test_every_dicom_output_states_the_intended_use(tmp_path, classifier):
    """The SR, the per-study JSON and summary.json of a run, and summary.json of a run without input."""
    write_mr_series(tmp_path / "in", gradient_series(5))
    summary = infer_dicom(tmp_path / "in", classifier, tmp_path / "out", progress=False)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["intended_use"] == INTENDED_USE
    (series,) = summary["series"]
    assert json.loads((tmp_path / "out" / series["report_file"]).read_text())["intended_use"] == INTENDED_USE
    assert INTENDED_USE in comment_of(pydicom.dcmread(tmp_path / "out" / series["sr_file"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DicomInputError):
        infer_dicom(tmp_path / "empty", classifier, tmp_path / "none", progress=False)
    assert json.loads((tmp_path / "none" / "summary.json").read_text())["intended_use"] == INTENDED_USE
