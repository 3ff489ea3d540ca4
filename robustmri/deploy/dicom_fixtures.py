"""Write 2-D images as an MR Image Storage series with the tags a scanner writes.

For tests, benchmarks and demonstrations of DICOM inference: real slices (e.g. figshare
JPEGs) become a series with patient, study, series, frame-of-reference, image-plane and
pixel modules, stored with a RescaleSlope/Intercept so that readers must apply them. The
patient identifiers are fictitious values chosen by the caller.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


@dataclass
class FictitiousPatient:
    name: str = "TESTPATIENT^ALICE"
    patient_id: str = "RMRI-000123"
    birth_date: str = "19610704"
    sex: str = "F"


def write_mr_series(folder: str | os.PathLike, images, patient: FictitiousPatient | None = None,
                    series_description: str = "AX T1 POST GD", study_uid: str | None = None,
                    series_number: int = 5, spacing_mm: float = 6.0, pixel_spacing_mm: float = 0.49,
                    orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), rescale=(0.25, -10.0),
                    file_names: list[str] | None = None, transfer_syntax: str | None = None,
                    series_uid: str | None = None, frame_of_reference_uid: str | None = None,
                    overrides: dict[int, dict[str, object]] | None = None,
                    attributes: dict[str, object] | None = None) -> list[str]:
    """Write ``images`` (2-D arrays, modality values) as one series in spatial order; return the paths.

    Stored values are ``(value - intercept) / slope`` (uint16), so reading them back and applying
    ``rescale = (slope, intercept)`` gives ``images`` exactly when the values are multiples of the slope.
    ``series_uid`` and ``frame_of_reference_uid`` (new UIDs by default) let several calls write files
    that share them. ``overrides`` maps a slice index to attributes set on that slice's dataset last,
    by keyword (e.g. ``{2: {"Modality": "CT", "PixelSpacing": ["0.5", "0.5"]}}``); None deletes one.
    ``attributes`` are set the same way on every slice, before ``overrides`` (e.g. a T2 series:
    ``{"EchoTime": "95", "RepetitionTime": "4000"}`` with ``series_description="AX T2"``).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    patient = patient or FictitiousPatient()
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid, frame_uid = series_uid or generate_uid(), frame_of_reference_uid or generate_uid()
    images, overrides = list(images), overrides or {}
    if not set(overrides) <= set(range(len(images))):
        raise ValueError(f"overrides for slices {sorted(set(overrides) - set(range(len(images))))}: "
                         f"there are {len(images)} slice(s)")
    slope, intercept = map(float, rescale)
    row, col = np.array(orientation[:3], float), np.array(orientation[3:], float)
    normal = np.cross(row, col)
    paths = []
    for index, image in enumerate(images):
        image = np.asarray(image, dtype=np.float64)
        stored = np.rint((image - intercept) / slope)
        if stored.min() < 0 or stored.max() > 65535:
            raise ValueError(f"slice {index}: values do not fit uint16 with slope {slope} and intercept {intercept}")
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.SOPClassUID, ds.SOPInstanceUID = MR_IMAGE_STORAGE, sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20261120"
        ds.StudyTime, ds.SeriesTime, ds.ContentTime = "101500", "102233", f"1022{index % 60:02d}"
        ds.AccessionNumber = "ACC20261120"
        ds.Modality = "MR"
        ds.Manufacturer, ds.ManufacturerModelName = "ExampleVendor", "ExampleScanner 3T"
        ds.ReferringPhysicianName = "REFERRER^BOB"
        ds.StudyDescription, ds.SeriesDescription = "MRI BRAIN W/WO CONTRAST", series_description
        ds.PatientName, ds.PatientID = patient.name, patient.patient_id
        ds.PatientBirthDate, ds.PatientSex = patient.birth_date, patient.sex
        ds.ScanningSequence, ds.SequenceVariant, ds.MRAcquisitionType = "SE", "SK", "2D"
        ds.SliceThickness, ds.SpacingBetweenSlices = f"{spacing_mm:g}", f"{spacing_mm:g}"
        ds.RepetitionTime, ds.EchoTime, ds.MagneticFieldStrength = "550", "9.5", "3"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", series_number, index + 1
        origin = np.array([-125.0, -125.0, -40.0]) + normal * spacing_mm * index
        ds.ImagePositionPatient = [f"{v:.4f}" for v in origin]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
        ds.PositionReferenceIndicator = ""
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = image.shape
        ds.PixelSpacing = [f"{pixel_spacing_mm:g}", f"{pixel_spacing_mm:g}"]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{slope:g}", f"{intercept:g}", "US"
        ds.PixelData = stored.astype("<u2").tobytes()
        for keyword, value in {**(attributes or {}), **overrides.get(index, {})}.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        if transfer_syntax is not None:
            ds.compress(transfer_syntax)
        name = file_names[index] if file_names else f"IM{sop_uid.rsplit('.', 1)[-1]}"
        path = os.path.join(folder, name)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
