"""DICOM series as they come from a scanner or PACS: scan folders, group, select, order, read pixels.

Every file that cannot be used is kept with its reason (:class:`SkippedFile`), every series
that is not used with its reason, so a caller reports skips instead of failing a whole run
or, worse, classifying something it should not. Datasets are read with their pixel data
deferred: scanning a folder reads headers only, pixels are decoded for selected series.

Nothing here logs or returns patient identifiers; :attr:`ScanResult.identifiers` collects
them only so that a report writer can redact them from file paths.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from robustmri.data.readers import ImageReadError, as_path_list, check_finite_2d, dicom_pixels, first_line

logger = logging.getLogger(__name__)

#: Values deferred past this size are read from the file only when used (the pixel data).
DEFER_SIZE = "16 KB"
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
#: Orientation cosines that differ by more than this make "position along one normal" meaningless.
ORIENTATION_TOLERANCE = 1e-3


@dataclass
class SkippedFile:
    path: str
    reason: str


@dataclass
class DicomSlice:
    """One single-frame greyscale image file; ``dataset`` has its pixel data deferred."""

    path: str
    dataset: object
    sop_instance_uid: str
    sop_class_uid: str
    rows: int
    columns: int
    instance_number: int | None
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    position_mm: float | None = None  # along the slice normal, set by order_slices


@dataclass
class DicomSeries:
    series_instance_uid: str
    study_instance_uid: str
    modality: str
    series_description: str
    image_type: tuple[str, ...]
    slices: list[DicomSlice] = field(default_factory=list)
    ordering: str = ""

    @property
    def header(self):
        """A dataset of the series (patient, study and series modules are shared by its slices)."""
        return self.slices[0].dataset

    @property
    def files(self) -> list[str]:
        return [s.path for s in self.slices]


@dataclass
class SeriesSelection:
    """Which series to classify, like MONAI Deploy's series selector rules.

    ``modalities``: accepted Modality values (empty or None: any). ``series_description``: a
    regular expression searched (case-insensitive) in SeriesDescription. ``image_type``: values
    that must all appear in ImageType (e.g. ``["ORIGINAL", "PRIMARY"]``).
    """

    modalities: Sequence[str] | None = ("MR",)
    series_description: str | None = None
    image_type: Sequence[str] | None = None

    def __post_init__(self):
        self.modalities = _as_strings(self.modalities)
        self.image_type = _as_strings(self.image_type)
        if self.series_description:
            try:
                self._pattern = re.compile(self.series_description, re.IGNORECASE)
            except re.error as err:
                raise ValueError(f"series_description is not a valid regular expression: "
                                 f"{self.series_description!r} ({err})") from err
        else:
            self._pattern = None

    def reason_to_skip(self, series: DicomSeries) -> str | None:
        """None when ``series`` matches every rule, else which rule it fails."""
        if self.modalities and series.modality.upper() not in {m.upper() for m in self.modalities}:
            return f"Modality {series.modality or '(none)'!r} is not one of the selected {list(self.modalities)}"
        if self._pattern is not None and not self._pattern.search(series.series_description):
            return f"SeriesDescription does not match {self.series_description!r}"
        if self.image_type:
            present = {value.upper() for value in series.image_type}
            missing = [value for value in self.image_type if value.upper() not in present]
            if missing:
                return f"ImageType {list(series.image_type)} lacks {missing}"
        return None


@dataclass
class ScanResult:
    series: list[DicomSeries]
    skipped_files: list[SkippedFile]
    n_files: int
    identifiers: set[str] = field(default_factory=set, repr=False)


def _as_strings(values) -> tuple[str, ...]:
    if values is None:
        return ()
    if isinstance(values, str):
        values = [part for part in re.split(r"[,\\]", values) if part.strip()]
    return tuple(str(v).strip() for v in values)


def list_files(folders) -> tuple[list[str], list[SkippedFile]]:
    """Every regular file under the folders (DICOM files often have no suffix); empty folders as skips."""
    files, skipped = [], []
    for folder in as_path_list(folders):
        if os.path.isfile(folder):
            files.append(folder)
            continue
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder}: input folder not found")
        found = sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names)
        if not found:
            skipped.append(SkippedFile(folder, "empty folder: no files"))
        files += found
    return files, skipped


def read_header(path: str):
    """Read a DICOM file with its pixel data deferred; raise ImageReadError saying why it is unusable."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, defer_size=DEFER_SIZE)
    except InvalidDicomError as err:
        raise ImageReadError(path, "not a DICOM Part 10 file: no 'DICM' prefix or file meta information "
                                   f"({first_line(err)})") from err
    except Exception as err:  # pydicom raises many types for corrupt files
        raise ImageReadError(path, f"unreadable DICOM file ({type(err).__name__}: {first_line(err)})") from err
    return ds


def identifiers_of(ds) -> set[str]:
    """Patient identifiers of a dataset (name and its components, id, birth date), for redaction only."""
    values = set()
    for keyword in ("PatientName", "PatientID", "PatientBirthDate"):
        value = str(ds.get(keyword, "") or "").strip()
        if value:
            values.add(value)
            if keyword == "PatientName":
                values.update(part.strip() for part in re.split(r"[\^= ]", value) if part.strip())
    return {v for v in values if len(v) >= 3}


def make_slice(path: str, ds) -> DicomSlice:
    """Check that ``ds`` is one single-frame greyscale image and describe it; ImageReadError otherwise."""
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        raise ImageReadError(path, "file meta information lacks TransferSyntaxUID")
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if sop_class == DICOMDIR_SOP_CLASS or str(meta.get("MediaStorageSOPClassUID", "")) == DICOMDIR_SOP_CLASS:
        raise ImageReadError(path, "a DICOMDIR (media directory), not an image")
    for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID"):
        if not str(ds.get(keyword, "") or "").strip():
            raise ImageReadError(path, f"no {keyword}")
    if not any(keyword in ds for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        name = UID(sop_class).name if UID(sop_class).is_valid else sop_class
        raise ImageReadError(path, f"no pixel data: {name} is not an image")
    if "PixelData" not in ds:
        raise ImageReadError(path, "float pixel data (parametric map) is not supported")
    samples = _integer(ds, "SamplesPerPixel", path, default=1)
    photometric = str(ds.get("PhotometricInterpretation", "") or "")
    if samples != 1 or photometric not in MONOCHROME:
        raise ImageReadError(path, f"{samples} sample(s) per pixel, {photometric or 'no'} photometric "
                                   "interpretation: only single-channel MONOCHROME1/2 images are classified")
    frames = _integer(ds, "NumberOfFrames", path, default=1)
    if frames != 1:
        raise ImageReadError(path, f"multi-frame image ({frames} frames): expected one slice per file")
    rows, columns = _integer(ds, "Rows", path), _integer(ds, "Columns", path)
    if rows < 2 or columns < 2:
        raise ImageReadError(path, f"image too small: {rows} x {columns}")
    return DicomSlice(path=path, dataset=ds, sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=sop_class,
                      rows=rows, columns=columns, instance_number=_optional_integer(ds, "InstanceNumber"),
                      position=_floats(ds, "ImagePositionPatient", 3), orientation=_floats(ds, "ImageOrientationPatient", 6))


def scan_folders(folders, progress: bool = True) -> ScanResult:
    """Read every file's header under ``folders``, keep usable image files grouped by SeriesInstanceUID."""
    from tqdm.auto import tqdm

    files, skipped = list_files(folders)
    if not files:
        raise FileNotFoundError(f"no files in {as_path_list(folders)}")
    series: dict[str, DicomSeries] = {}
    seen: dict[tuple[str, str], str] = {}
    identifiers: set[str] = set()
    for path in tqdm(files, desc="DICOM headers", unit="file", disable=not progress or len(files) < 50):
        try:
            ds = read_header(path)
            identifiers |= identifiers_of(ds)
            image = make_slice(path, ds)
        except ImageReadError as err:
            skipped.append(SkippedFile(path, err.reason))
            continue
        uid = str(ds.SeriesInstanceUID)
        key = (uid, image.sop_instance_uid)
        if key in seen:
            skipped.append(SkippedFile(path, f"duplicate SOPInstanceUID: the same instance as {seen[key]}"))
            continue
        seen[key] = path
        if uid not in series:
            series[uid] = DicomSeries(series_instance_uid=uid,
                                      study_instance_uid=str(ds.get("StudyInstanceUID", "") or ""),
                                      modality=str(ds.get("Modality", "") or ""),
                                      series_description=str(ds.get("SeriesDescription", "") or ""),
                                      image_type=_as_strings(ds.get("ImageType")))
        series[uid].slices.append(image)
    logger.info("scanned %d file(s): %d series, %d file(s) skipped", len(files), len(series), len(skipped))
    return ScanResult(list(series.values()), skipped, len(files), identifiers)


def select_series(series: list[DicomSeries], selection: SeriesSelection | None = None):
    """Split into (selected, [(series, reason)]): the selection rules, then one image size per series."""
    selection = selection or SeriesSelection()
    selected, rejected = [], []
    for item in series:
        reason = selection.reason_to_skip(item) or size_problem(item)
        if reason:
            rejected.append((item, reason))
        else:
            selected.append(item)
    return selected, rejected


def size_problem(series: DicomSeries) -> str | None:
    """Slices of different sizes in one series suggest mixed acquisitions (a localiser, a reformat)."""
    sizes = Counter((s.rows, s.columns) for s in series.slices)
    if len(sizes) == 1:
        return None
    listed = ", ".join(f"{r} x {c} ({n} slice{'s' if n > 1 else ''})" for (r, c), n in sizes.most_common())
    return f"slices of different sizes in one series: {listed}"


def order_slices(series: DicomSeries) -> DicomSeries:
    """Sort slices by position along the slice normal; fall back to InstanceNumber, then to file name.

    The normal is row x column of ImageOrientationPatient; it is only used when every slice has a
    position and all share one orientation. ``series.ordering`` says which rule was applied.
    """
    slices = series.slices
    orientations = [s.orientation for s in slices]
    positions = [s.position for s in slices]
    problem = None
    if any(p is None for p in positions) or any(o is None for o in orientations):
        problem = "ImagePositionPatient/ImageOrientationPatient missing or unreadable"
    elif np.ptp(np.array(orientations), axis=0).max() > ORIENTATION_TOLERANCE:
        problem = "slices have different ImageOrientationPatient"
    if problem is None:
        orientation = np.array(orientations[0], dtype=np.float64)
        normal = np.cross(orientation[:3], orientation[3:])
        if np.linalg.norm(normal) < 0.5:
            problem = "ImageOrientationPatient is degenerate"
    if problem is None:
        for s in slices:
            s.position_mm = float(np.dot(np.array(s.position, dtype=np.float64), normal))
        # InstanceNumber breaks ties (e.g. two echoes at one position) so the order is deterministic.
        slices.sort(key=lambda s: (s.position_mm, s.instance_number if s.instance_number is not None else 0, s.path))
        distinct = len({round(s.position_mm, 3) for s in slices})
        series.ordering = "ImagePositionPatient along the slice normal"
        if distinct < len(slices):
            series.ordering += f" ({len(slices) - distinct} slice(s) share a position with another)"
    elif all(s.instance_number is not None for s in slices):
        slices.sort(key=lambda s: (s.instance_number, s.path))
        series.ordering = f"InstanceNumber ({problem})"
    else:
        slices.sort(key=lambda s: s.path)
        series.ordering = f"file name ({problem}; InstanceNumber missing)"
    return series


def slice_pixels(image: DicomSlice) -> np.ndarray:
    """Decode one slice to float32 modality values (:func:`robustmri.data.readers.dicom_pixels`), checked against its header."""
    values = check_finite_2d(dicom_pixels(image.dataset, image.path), image.path)
    if values.shape != (image.rows, image.columns):
        raise ImageReadError(image.path, f"decoded {values.shape}, header says {image.rows} x {image.columns}")
    return values


def _integer(ds, keyword: str, path: str, default: int | None = None) -> int:
    value = ds.get(keyword, None)
    if value is None or value == "":
        if default is None:
            raise ImageReadError(path, f"no {keyword}")
        return default
    try:
        return int(str(value).strip())
    except ValueError:
        raise ImageReadError(path, f"invalid {keyword} {str(value)!r}: not an integer") from None


def _optional_integer(ds, keyword: str) -> int | None:
    try:
        value = ds.get(keyword, None)
        return None if value in (None, "") else int(str(value).strip())
    except ValueError:
        return None


def _floats(ds, keyword: str, count: int) -> tuple[float, ...] | None:
    value = ds.get(keyword, None)
    try:
        numbers = tuple(float(v) for v in value) if value is not None else ()
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count and all(np.isfinite(numbers)) else None
