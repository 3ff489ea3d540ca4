"""The Basic Text SR read back with pydicom: what it copies, what is new, what it references and says."""

import pydicom

from robustmri.deploy.dicom_sr import BASIC_TEXT_SR_STORAGE, write_sr

from deploy_helpers import pydicom_file

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
