"""A DICOM Basic Text SR holding a series-level classification, readable by any PACS viewer.

The document belongs to the source study (of the Patient and General Study modules, only the
attributes the IOD requires are copied, :data:`PATIENT_MODULE` and :data:`STUDY_MODULE`; the referring
physician's name is written empty, nothing free-text is copied), is a new series and instance, references every source image
(evidence sequence and IMAGE content items), and says plainly that it is an unverified
research result: VerificationFlag UNVERIFIED, SeriesDescription "... NOT FOR CLINICAL USE", and a Comment that
states the intended use (:data:`DISCLAIMER`).
A multi-frame image is referenced once: one evidence entry, and one IMAGE item whose
ReferencedFrameNumber lists the frames used.

**UIDs.** The SR's StudyInstanceUID is the source study's. Its SeriesInstanceUID and SOPInstanceUID
are derived (:func:`sr_uids`) from what identifies the answer: the source StudyInstanceUID, the
model's integrity digest, the series rule's digest and, for a series-level answer, the source
SeriesInstanceUID, as UUID-derived UIDs (``2.25.``, from a name-based UUID of those values: valid,
and the same inputs always give the same UID). A rerun on the
same study with the same model and rule therefore writes the same instance, which a PACS stores
as a replacement instead of a second result; another model or rule gives another instance.
"""

from __future__ import annotations

import datetime
import os
import uuid

from robustmri import INTENDED_USE, __version__
from robustmri.outputs import write_atomic

BASIC_TEXT_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.11"
SERIES_DESCRIPTION = "AI tumour type RESEARCH - NOT FOR CLINICAL USE"
#: The Patient and General Study attributes the Basic Text SR IOD requires (Type 1 and 2), and no
#: others: no free text (PatientComments, StudyDescription) and nothing optional (PatientAge, other IDs).
PATIENT_MODULE = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")
STUDY_MODULE = ("StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")
TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
         "ReferringPhysicianName", "StudyID", "AccessionNumber")
#: Type 2 attributes written empty even when the source has them: a name the report does not need.
WRITTEN_EMPTY = ("ReferringPhysicianName",)
#: Version tag of what :func:`sr_uids` hashes (changing the inputs' order or kind must change the tag).
UID_SCHEME = "robustmri-sr-uid-1"
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_OID, UID_SCHEME)
#: The SR's Comment: what the result is not, then the intended use (:data:`robustmri.INTENDED_USE`), word for word.
DISCLAIMER = ("Research software, NOT FOR CLINICAL USE. Unverified output of an automatic classifier trained on 2D "
              f"T1 contrast-enhanced slices that contain a tumour. Intended use: {INTENDED_USE}")


def code(value: str, scheme: str, meaning: str):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


REPORT_TITLE = ("18748-4", "LN", "Diagnostic imaging report")
FINDING = ("121071", "DCM", "Finding")
PROCEDURE = ("121065", "DCM", "Procedure Description")
COMMENT = ("121106", "DCM", "Comment")


def _text(concept, text: str, children=None):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    item = Dataset()
    item.RelationshipType, item.ValueType = "CONTAINS", "TEXT"
    item.ConceptNameCodeSequence = Sequence([code(*concept)])
    item.TextValue = text[:10240]  # UT would allow more; viewers show a paragraph
    if children:
        item.ContentSequence = Sequence(children)
    return item


def _sop_reference(sop_class_uid: str, sop_instance_uid: str):
    """A Referenced SOP Class / Instance UID pair, as the evidence sequence and image items hold them."""
    from pydicom.dataset import Dataset

    reference = Dataset()
    reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = sop_class_uid, sop_instance_uid
    return reference


def _image_reference(sop_class_uid: str, sop_instance_uid: str, frames: list[int] | None = None):
    """An INFERRED FROM IMAGE item; ``frames``: the 1-based frames used of a multi-frame image."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    item = Dataset()
    item.RelationshipType, item.ValueType = "INFERRED FROM", "IMAGE"
    reference = _sop_reference(sop_class_uid, sop_instance_uid)
    if frames:
        reference.ReferencedFrameNumber = frames if len(frames) > 1 else frames[0]
    item.ReferencedSOPSequence = Sequence([reference])
    return item


def _instances(references) -> list[tuple[str, str, list[int]]]:
    """(SOPClassUID, SOPInstanceUID, frames) per referenced instance, in order of first reference.

    ``references``: (SOPClassUID, SOPInstanceUID) pairs or (SOPClassUID, SOPInstanceUID, frame)
    triples, frame None for a single-frame image."""
    instances: dict[str, tuple[str, str, list[int]]] = {}
    for reference in references:
        sop_class_uid, sop_instance_uid = reference[0], reference[1]
        frame = reference[2] if len(reference) > 2 else None
        entry = instances.setdefault(sop_instance_uid, (sop_class_uid, sop_instance_uid, []))
        if frame is not None and int(frame) not in entry[2]:
            entry[2].append(int(frame))
    return list(instances.values())


def sr_uids(study_instance_uid: str, model_digest: str, rule_digest: str,
            series_instance_uid: str | None = None) -> tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID) of the SR answering a study (or, given ``series_instance_uid``, a
    series) with a model (its integrity digest) and a series rule (its digest): the same inputs, the same UIDs."""
    for name, value in (("study_instance_uid", study_instance_uid), ("model_digest", model_digest),
                        ("rule_digest", rule_digest)):
        if not value:
            raise ValueError(f"sr_uids needs a {name}: without it a rerun could not be told from another answer")
    level = ["series", str(series_instance_uid)] if series_instance_uid else ["study"]
    sources = [str(study_instance_uid), str(model_digest), str(rule_digest), *level]
    return _derived_uid(sources + ["SeriesInstanceUID"]), _derived_uid(sources + ["SOPInstanceUID"])


def _derived_uid(sources: list[str]) -> str:
    """A UUID-derived UID (``2.25.<integer of the UUID>``, DICOM PS3.5 B.2) of a name-based UUID (RFC 4122
    version 5) of ``sources``: valid and deterministic. pydicom's ``generate_uid(prefix=None, entropy_srcs=...)``
    ignores its sources and returns a random UUID, and with a prefix joins them without a separator."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, chr(10).join(sources)).int}"


def new_instance(sop_class_uid: str, sop_uid: str | None = None):
    """A dataset of ``sop_class_uid`` with ``sop_uid`` (None: a new random SOPInstanceUID) and the file meta
    information of a DICOM Part 10 file (Explicit VR Little Endian), ready for ``save_as(..., enforce_file_format=True)``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    sop_uid = sop_uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class_uid, sop_uid
    meta.TransferSyntaxUID, meta.ImplementationClassUID = ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class_uid, sop_uid
    return ds


def build_sr(source, series_instance_uid: str, references: list[tuple], finding: str,
             details: list[str], now: datetime.datetime | None = None, uids: tuple[str, str] | None = None):
    """The SR dataset. ``source``: a dataset of the classified series (patient and study modules);
    ``references``: (SOPClassUID, SOPInstanceUID) or (SOPClassUID, SOPInstanceUID, frame number) of
    every source image (frame) used; ``finding``: the result sentence; ``details``: method and model lines;
    ``uids``: the SR's (SeriesInstanceUID, SOPInstanceUID), as :func:`sr_uids` derives them (None: new random ones)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import generate_uid

    now = now or datetime.datetime.now()
    sr_series_uid, sop_uid = uids or (generate_uid(), generate_uid())
    ds = new_instance(BASIC_TEXT_SR_STORAGE, sop_uid)  # SOP Common's UIDs, and the file meta information
    ds.SpecificCharacterSet = source.get("SpecificCharacterSet", "ISO_IR 192")
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    # Patient and General Study: copied (DICOM requires them; nothing else here repeats them)
    for keyword in PATIENT_MODULE + STUDY_MODULE:
        if keyword in source and keyword not in WRITTEN_EMPTY:
            ds[keyword] = source[keyword]
        elif keyword in TYPE2:
            setattr(ds, keyword, "")
    # SR Document Series (new series) and General Equipment
    ds.Modality = "SR"
    ds.SeriesInstanceUID = sr_series_uid
    ds.SeriesNumber = 9000 + int(source.get("SeriesNumber", 0) or 0) % 1000
    ds.SeriesDescription = SERIES_DESCRIPTION
    ds.SeriesDate, ds.SeriesTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = "robustmri", "robustmri classifier", __version__
    # SR Document General
    ds.InstanceNumber = 1
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.ContentDate, ds.ContentTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.PerformedProcedureCodeSequence = Sequence()
    evidence_series = Dataset()
    evidence_series.SeriesInstanceUID = series_instance_uid
    instances = _instances(references)
    evidence_series.ReferencedSOPSequence = Sequence([_sop_reference(c, i) for c, i, _ in instances])
    evidence = Dataset()
    evidence.StudyInstanceUID = source.get("StudyInstanceUID", "")
    evidence.ReferencedSeriesSequence = Sequence([evidence_series])
    ds.CurrentRequestedProcedureEvidenceSequence = Sequence([evidence])
    # SR Document Content: the root container and its text items
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Sequence([code(*REPORT_TITLE)])
    ds.ContinuityOfContent = "SEPARATE"
    images = [_image_reference(*instance) for instance in instances]
    ds.ContentSequence = Sequence([
        _text(FINDING, finding, images),
        _text(PROCEDURE, "\n".join(details)),
        _text(COMMENT, DISCLAIMER),
    ])
    return ds


def write_sr(output_file: str | os.PathLike, source, series_instance_uid: str, references, finding: str,
             details: list[str], uids: tuple[str, str] | None = None) -> str:
    """Build the SR (see :func:`build_sr`) and write it as a DICOM Part 10 file, atomically
    (:func:`robustmri.outputs.write_atomic`: never a torn SR under its final name)."""
    ds = build_sr(source, series_instance_uid, references, finding, details, uids=uids)
    return write_atomic(output_file, lambda handle: ds.save_as(handle, enforce_file_format=True))
