"""Write 2-D images as an MR Image Storage series, or as one Enhanced MR (multi-frame) file,
with the tags a scanner writes.

For tests, benchmarks and demonstrations of DICOM inference: real slices (e.g. figshare
JPEGs) become a series with patient, study, series, frame-of-reference, image-plane and
pixel modules, stored with a RescaleSlope/Intercept so that readers must apply them. The
patient identifiers are fictitious values chosen by the caller.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np

from robustmri.deploy.dicom.sr import new_instance

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
LEGACY_CONVERTED_ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.4"


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
    from pydicom.uid import generate_uid

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
        ds = new_instance(MR_IMAGE_STORAGE)
        sop_uid = ds.SOPInstanceUID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
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


def write_enhanced_mr(path: str | os.PathLike, images, patient: FictitiousPatient | None = None,
                      legacy: bool = False, frame_order: list[int] | None = None,
                      series_description: str = "AX T1 POST GD", study_uid: str | None = None,
                      series_uid: str | None = None, frame_of_reference_uid: str | None = None,
                      series_number: int = 5, spacing_mm: float = 6.0, pixel_spacing_mm: float = 0.49,
                      orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), rescale=(0.25, -10.0),
                      frame_overrides: dict[int, dict[str, dict[str, object]]] | None = None) -> str:
    """Write ``images`` (2-D arrays, modality values, in spatial order) as one multi-frame file; return its path.

    Enhanced MR Image Storage (``legacy=False``): plane orientation, pixel measures and pixel value
    transformation in the shared functional groups; plane position and frame content (StackID "1",
    InStackPositionNumber, TemporalPositionIndex 1, dimension index values) per frame. Legacy
    Converted Enhanced MR (``legacy=True``): plane position, plane orientation and pixel value
    transformation per frame, pixel measures shared, no stack or temporal information.

    ``frame_order``: the spatial indices of ``images`` in frame (storage) order, e.g. shuffled, or
    with one left out (a missing slice); default all, in order. ``rescale``: one (slope, intercept),
    or one per image (then written per frame, also for Enhanced MR). ``frame_overrides`` maps a frame
    index (0-based, storage order) to ``{functional group sequence keyword: {attribute: value}}`` set
    in that frame's own item (created if needed, so it overrides the shared one).

    Enough of the IOD for readers (patient, study, series, frame of reference, multi-frame,
    functional groups, pixels); not a complete one: ``dciodvfy`` lists the MR macros (timing,
    echo, coils, frame anatomy) it leaves out.
    """
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import generate_uid

    patient = patient or FictitiousPatient()
    images = [np.asarray(image, dtype=np.float64) for image in images]
    order = list(range(len(images))) if frame_order is None else [int(i) for i in frame_order]
    if not order or not set(order) <= set(range(len(images))):
        raise ValueError(f"frame_order {order} must name some of the {len(images)} image(s)")
    if len({image.shape for image in images}) != 1:
        raise ValueError("images of one multi-frame file must share one shape")
    per_image_rescale = np.ndim(rescale) == 2
    rescales = ([tuple(map(float, r)) for r in rescale] if per_image_rescale
                else [tuple(map(float, rescale))] * len(images))
    sop_class = LEGACY_CONVERTED_ENHANCED_MR_IMAGE_STORAGE if legacy else ENHANCED_MR_IMAGE_STORAGE
    row, col = np.array(orientation[:3], float), np.array(orientation[3:], float)
    normal = np.cross(row, col)

    def item(**attributes) -> Dataset:
        result = Dataset()
        for keyword, value in attributes.items():
            setattr(result, keyword, value)
        return result

    def transformation(index: int) -> Sequence:
        slope, intercept = rescales[index]
        return Sequence([item(RescaleIntercept=f"{intercept:g}", RescaleSlope=f"{slope:g}", RescaleType="US")])

    orientation_text = [f"{v:.6f}" for v in orientation]
    stored_frames, per_frame = [], []
    for frame, index in enumerate(order):
        slope, intercept = rescales[index]
        stored = np.rint((images[index] - intercept) / slope)
        if stored.min() < 0 or stored.max() > 65535:
            raise ValueError(f"image {index}: values do not fit uint16 with slope {slope} and intercept {intercept}")
        stored_frames.append(stored.astype("<u2"))
        origin = np.array([-125.0, -125.0, -40.0]) + normal * spacing_mm * index
        groups = item(PlanePositionSequence=Sequence([item(ImagePositionPatient=[f"{v:.4f}" for v in origin])]))
        if legacy:
            groups.PlaneOrientationSequence = Sequence([item(ImageOrientationPatient=orientation_text)])
            groups.PixelValueTransformationSequence = transformation(index)
        else:
            groups.FrameContentSequence = Sequence([item(
                StackID="1", InStackPositionNumber=index + 1, TemporalPositionIndex=1,
                DimensionIndexValues=[1, index + 1])])
            groups.MRImageFrameTypeSequence = Sequence([item(
                FrameType=["ORIGINAL", "PRIMARY", "M", "NONE"], PixelPresentation="MONOCHROME",
                VolumetricProperties="VOLUME", VolumeBasedCalculationTechnique="NONE",
                ComplexImageComponent="MAGNITUDE", AcquisitionContrast="T1")])
            if per_image_rescale:
                groups.PixelValueTransformationSequence = transformation(index)
        for keyword, attributes in (frame_overrides or {}).get(frame, {}).items():
            if keyword not in groups:
                setattr(groups, keyword, Sequence([Dataset()]))
            for name, value in attributes.items():
                setattr(groups[keyword].value[0], name, value)
        per_frame.append(groups)
    shared = item(PixelMeasuresSequence=Sequence([item(
        PixelSpacing=[f"{pixel_spacing_mm:g}"] * 2, SliceThickness=f"{spacing_mm:g}",
        SpacingBetweenSlices=f"{spacing_mm:g}")]))
    if not legacy:
        shared.PlaneOrientationSequence = Sequence([item(ImageOrientationPatient=orientation_text)])
        if not per_image_rescale:
            shared.PixelValueTransformationSequence = transformation(0)

    ds = new_instance(sop_class)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]  # a legacy conversion keeps its sources' value 1
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDateTime = "20261120"
    ds.StudyTime, ds.SeriesTime, ds.ContentTime = "101500", "102233", "102240"
    ds.AccessionNumber, ds.Modality = "ACC20261120", "MR"
    ds.Manufacturer, ds.ManufacturerModelName = "ExampleVendor", "ExampleScanner 3T"
    ds.ReferringPhysicianName = "REFERRER^BOB"
    ds.StudyDescription, ds.SeriesDescription = "MRI BRAIN W/WO CONTRAST", series_description
    ds.PatientName, ds.PatientID = patient.name, patient.patient_id
    ds.PatientBirthDate, ds.PatientSex = patient.birth_date, patient.sex
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), series_uid or generate_uid()
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_of_reference_uid or generate_uid(), ""
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", series_number, 1
    ds.ContentQualification, ds.ResonantNucleus, ds.MagneticFieldStrength = "RESEARCH", "1H", "3"
    ds.ImagedNucleus, ds.ImagingFrequency = "1H", "127.7"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.NumberOfFrames = len(order)
    ds.Rows, ds.Columns = images[0].shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if not legacy:
        dimension = generate_uid()
        ds.DimensionOrganizationSequence = Sequence([item(DimensionOrganizationUID=dimension)])
        ds.DimensionIndexSequence = Sequence([
            item(DimensionOrganizationUID=dimension, DimensionIndexPointer=0x00209056,
                 FunctionalGroupPointer=0x00209111),  # StackID in Frame Content
            item(DimensionOrganizationUID=dimension, DimensionIndexPointer=0x00209057,
                 FunctionalGroupPointer=0x00209111)])  # InStackPositionNumber in Frame Content
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = np.stack(stored_frames).tobytes()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def series_images(n: int, size: int, dataset_dir: str | os.PathLike = "") -> tuple[list[np.ndarray], str]:
    """``n`` slices of ``size`` x ``size`` for a benchmark series, and where they came from: the first ``n`` figshare
    glioma slices when ``dataset_dir`` holds the data set's ``labels.csv``, else the embedded synthetic phantom."""
    labels = os.path.join(dataset_dir, "labels.csv") if dataset_dir else ""
    if labels and os.path.isfile(labels):
        from PIL import Image

        from robustmri.data.readers import read_image

        with open(labels) as handle:
            rows = [row for row in csv.DictReader(handle) if row["label_name"] == "glioma"][:n]
        images = [read_image(os.path.join(dataset_dir, row["file"])) for row in rows]
        images = [np.asarray(Image.fromarray(i).resize((size, size))) if i.shape != (size, size) else i
                  for i in images]
        return [np.rint(i) for i in images], f"figshare glioma slices ({os.path.basename(os.fspath(dataset_dir))})"
    from robustmri.data.synthetic import generate_slices

    data = generate_slices(n_patients=n, size=size, seed=0)
    return [np.rint(i * 1000) for i in data["images"][:n]], "embedded synthetic phantom"
