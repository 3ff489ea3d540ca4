"""DICOM series as they come from a scanner or PACS: scan folders, group, select, order, read pixels.

Every file that cannot be used is kept with its reason (:class:`SkippedFile`), every series
that is not used with its reason, so a caller reports skips instead of failing a whole run
or, worse, classifying something it should not. Datasets are read with their pixel data
deferred: scanning a folder reads headers only, pixels are decoded for selected series.

Nothing here logs or returns patient identifiers; :attr:`ScanResult.identifiers` collects
them only so that a report writer can redact them from file paths.

Series integrity (:data:`GROUPING_POLICY`): a series is the files that agree on PatientID,
StudyInstanceUID, SeriesInstanceUID, Modality, FrameOfReferenceUID, ImageOrientationPatient
(within :data:`ORIENTATION_TOLERANCE`) and PixelSpacing (within the relative
:data:`PIXEL_SPACING_TOLERANCE`). Files that share a SeriesInstanceUID but disagree on patient,
study or modality are never merged and never split: the whole SeriesInstanceUID is refused
(``DicomSeries.refusal``), none of its files is used. Disagreement on geometry (frame of
reference, orientation, pixel spacing) refuses the series too ("mixed geometry"). Reasons name
the attributes and count the values, never the values themselves.

Series completeness (:func:`completeness_problem`, after :func:`order_slices`): along the slice
normal, two slices within :data:`DUPLICATE_POSITION_TOLERANCE_MM` of each other, or a step
larger than :data:`GAP_FACTOR` times the median step (a missing slice), make a series
incomplete; when positions are unusable, repeated or skipped InstanceNumbers do. A one-slice
series is complete.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from robustmri.data.readers import ImageReadError, as_path_list, check_finite_2d, dicom_pixels, first_line

logger = logging.getLogger(__name__)

#: Values deferred past this size are read from the file only when used (the pixel data).
DEFER_SIZE = "16 KB"
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
#: Orientation cosines that differ by more than this make "position along one normal" meaningless.
ORIENTATION_TOLERANCE = 1e-3
#: PixelSpacing values whose relative difference exceeds this are different geometries.
PIXEL_SPACING_TOLERANCE = 1e-3
#: Slices whose positions along the normal differ by at most this (mm) are at one position.
DUPLICATE_POSITION_TOLERANCE_MM = 1e-3
#: A step between consecutive positions above this many times the median step means missing slice(s).
GAP_FACTOR = 1.5
#: Attributes on which files sharing a SeriesInstanceUID must agree, or the SeriesInstanceUID is refused.
IDENTITY_ATTRIBUTES = ("PatientID", "StudyInstanceUID", "Modality")
#: Attributes on which the files of one series must agree (within the tolerances), or it is refused.
GEOMETRY_ATTRIBUTES = ("FrameOfReferenceUID", "ImageOrientationPatient", "PixelSpacing")
#: The order this module gives when every slice has a position along one slice normal.
ORDER_BY_POSITION = "ImagePositionPatient along the slice normal"
GROUPING_POLICY = (
    "A series is the files that agree on PatientID, StudyInstanceUID, SeriesInstanceUID, Modality, "
    "FrameOfReferenceUID, ImageOrientationPatient (cosines within "
    f"{ORIENTATION_TOLERANCE:g}) and PixelSpacing (relative difference within {PIXEL_SPACING_TOLERANCE:g}). "
    "Files sharing a SeriesInstanceUID but disagreeing on patient, study or modality are never merged "
    "or split: the whole SeriesInstanceUID is refused and none of its files is used. Disagreement on "
    "geometry (frame of reference, orientation, pixel spacing) refuses the series as mixed geometry. "
    "Reasons name attributes and count values; they never contain the values."
)


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
    pixel_spacing: tuple[float, ...] | None = None
    position_mm: float | None = None  # along the slice normal, set by order_slices

    def attribute(self, keyword: str) -> str:
        """A header attribute as stripped text ("" when absent): for comparisons, never for output."""
        return str(self.dataset.get(keyword, "") or "").strip()


@dataclass
class DicomSeries:
    series_instance_uid: str
    study_instance_uid: str
    modality: str
    series_description: str
    image_type: tuple[str, ...]
    slices: list[DicomSlice] = field(default_factory=list)
    ordering: str = ""
    #: Why this SeriesInstanceUID must not be classified (:data:`GROUPING_POLICY`); None when it may be.
    refusal: str | None = None

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
        """None when ``series`` matches every rule, else which rule it fails (a refused series fails first)."""
        if series.refusal:
            return series.refusal
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
                      position=_floats(ds, "ImagePositionPatient", 3),
                      orientation=_floats(ds, "ImageOrientationPatient", 6),
                      pixel_spacing=_floats(ds, "PixelSpacing", 2))


def scan_folders(folders, progress: bool = True) -> ScanResult:
    """Read every file's header under ``folders``; group usable image files by SeriesInstanceUID.

    Every group is checked against :data:`GROUPING_POLICY` (:func:`integrity_problem`); a group
    that fails is kept whole with its ``refusal`` set, so that it is reported and never classified.
    A file repeating a SOPInstanceUID already seen in its series is skipped as a duplicate only
    when it agrees on patient, study and modality; otherwise it stays and the series is refused.
    """
    from tqdm.auto import tqdm

    files, skipped = list_files(folders)
    if not files:
        raise FileNotFoundError(f"no files in {as_path_list(folders)}")
    series: dict[str, DicomSeries] = {}
    seen: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {}
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
        identity = tuple(image.attribute(keyword) for keyword in IDENTITY_ATTRIBUTES)
        if key in seen and seen[key][1] == identity:
            skipped.append(SkippedFile(path, "duplicate SOPInstanceUID: the same instance as an earlier file of its series"))
            continue
        seen.setdefault(key, (path, identity))
        if uid not in series:
            series[uid] = DicomSeries(series_instance_uid=uid,
                                      study_instance_uid=str(ds.get("StudyInstanceUID", "") or ""),
                                      modality=str(ds.get("Modality", "") or ""),
                                      series_description=str(ds.get("SeriesDescription", "") or ""),
                                      image_type=_as_strings(ds.get("ImageType")))
        series[uid].slices.append(image)
    for item in series.values():
        item.refusal = integrity_problem(item)
        if item.refusal:
            modalities = sorted({s.attribute("Modality") or "(none)" for s in item.slices})
            item.modality = "/".join(modalities)  # modality values are not identifiers
            if len({s.attribute("StudyInstanceUID") for s in item.slices}) > 1:
                item.study_instance_uid = ""
    refused = sum(item.refusal is not None for item in series.values())
    logger.info("scanned %d file(s): %d series (%d refused), %d file(s) skipped", len(files), len(series), refused,
                len(skipped))
    return ScanResult(list(series.values()), skipped, len(files), identifiers)


def _value_counts(values: Sequence, same: Callable[[object, object], bool]) -> list[int]:
    """How many values fall in each group of values that are ``same`` as the group's first (largest first).

    None (absent or unreadable) is a value of its own: it agrees only with None.
    """
    representatives: list = []
    counts: list[int] = []
    for value in values:
        for index, representative in enumerate(representatives):
            if (value is None and representative is None) or (
                    value is not None and representative is not None and same(representative, value)):
                counts[index] += 1
                break
        else:
            representatives.append(value)
            counts.append(1)
    return sorted(counts, reverse=True)


def _within(tolerance: float, relative: bool = False) -> Callable[[Sequence[float], Sequence[float]], bool]:
    """Equality of number sequences within an absolute (or, with ``relative``, a relative) tolerance."""

    def same(a: Sequence[float], b: Sequence[float]) -> bool:
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if a.shape != b.shape:
            return False
        limit = tolerance * np.maximum(np.abs(a), np.abs(b)) if relative else tolerance
        return bool(np.all(np.abs(a - b) <= limit))
    return same


def _disagreements(slices: list[DicomSlice], attributes: Sequence[str]) -> list[str]:
    """For each attribute on which ``slices`` disagree: 'Name (K values: n1 + n2 files)' (counts only)."""
    exact = lambda a, b: a == b  # noqa: E731
    rules = {"ImageOrientationPatient": (lambda s: s.orientation, _within(ORIENTATION_TOLERANCE)),
             "PixelSpacing": (lambda s: s.pixel_spacing, _within(PIXEL_SPACING_TOLERANCE, relative=True))}
    parts = []
    for keyword in attributes:
        value_of, same = rules.get(keyword, (lambda s, k=keyword: s.attribute(k) or None, exact))
        counts = _value_counts([value_of(s) for s in slices], same)
        if len(counts) > 1:
            tolerance = {"ImageOrientationPatient": f" beyond {ORIENTATION_TOLERANCE:g}",
                         "PixelSpacing": f" beyond relative {PIXEL_SPACING_TOLERANCE:g}"}.get(keyword, "")
            parts.append(f"{keyword} ({len(counts)} values{tolerance}: {' + '.join(map(str, counts))} files)")
    return parts


def integrity_problem(series: DicomSeries) -> str | None:
    """Why the files of ``series`` (one SeriesInstanceUID) must not be classified together, or None.

    Patient, study or modality disagreement comes first (never merged, never relaxed), then mixed
    geometry. The reason names attributes and counts values (:data:`GROUPING_POLICY`).
    """
    n = len(series.slices)
    identity = _disagreements(series.slices, IDENTITY_ATTRIBUTES)
    if identity:
        return (f"refused: files sharing one SeriesInstanceUID disagree on {', '.join(identity)}; files of "
                f"different patients, studies or modalities are never merged, none of the {n} files is used")
    geometry = _disagreements(series.slices, GEOMETRY_ATTRIBUTES)
    if geometry:
        return (f"refused, mixed geometry: files of one series disagree on {', '.join(geometry)}; "
                f"none of the {n} files is used")
    return None


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
        steps = np.diff([s.position_mm for s in slices])
        distinct = 1 + int(np.sum(steps > DUPLICATE_POSITION_TOLERANCE_MM))
        series.ordering = ORDER_BY_POSITION
        if distinct < len(slices):
            series.ordering += f" ({len(slices) - distinct} slice(s) share a position with another)"
    elif all(s.instance_number is not None for s in slices):
        slices.sort(key=lambda s: (s.instance_number, s.path))
        series.ordering = f"InstanceNumber ({problem})"
    else:
        slices.sort(key=lambda s: s.path)
        series.ordering = f"file name ({problem}; InstanceNumber missing)"
    return series


def completeness_problem(series: DicomSeries) -> str | None:
    """Why the ordered ``series`` looks incomplete (duplicate or missing slices), or None; one line.

    Along the slice normal (ordered by :data:`ORDER_BY_POSITION`): positions within
    :data:`DUPLICATE_POSITION_TOLERANCE_MM` of the previous one are duplicates; a step between
    distinct positions above :data:`GAP_FACTOR` times their median step is missing slice(s).
    Ordered by InstanceNumber: a repeated number, or consecutive numbers more than 1 apart.
    Ordered by file name: completeness cannot be checked, which counts as incomplete.
    """
    slices = series.slices
    if not series.ordering:
        raise ValueError("completeness_problem needs an ordered series: call order_slices first")
    if len(slices) <= 1:
        return None
    problems = []
    if series.ordering.startswith(ORDER_BY_POSITION):
        positions = np.array([s.position_mm for s in slices], dtype=np.float64)
        duplicate = np.diff(positions) <= DUPLICATE_POSITION_TOLERANCE_MM
        if duplicate.any():
            first = positions[1:][duplicate][0]
            problems.append(f"duplicate positions: {int(duplicate.sum())} slice(s) within "
                            f"{DUPLICATE_POSITION_TOLERANCE_MM:g} mm of the previous one (first at {first:.2f} mm)")
        distinct = positions[np.concatenate([[True], ~duplicate])]
        if len(distinct) >= 3:
            steps = np.diff(distinct)
            median = float(np.median(steps))
            gaps = np.flatnonzero(steps > GAP_FACTOR * median)
            if len(gaps):
                k = int(gaps[0])
                more = f" (and {len(gaps) - 1} more gap(s))" if len(gaps) > 1 else ""
                problems.append(f"missing slice(s) between positions {distinct[k]:.2f} mm and "
                                f"{distinct[k + 1]:.2f} mm, gap {steps[k]:.2f} mm against median {median:.2f} mm "
                                f"(limit {GAP_FACTOR:g} x median){more}")
    elif all(s.instance_number is not None for s in slices):
        numbers = np.array([s.instance_number for s in slices])
        steps = np.diff(numbers)
        if (steps == 0).any():
            problems.append(f"duplicate InstanceNumber: {int((steps == 0).sum())} slice(s) repeat the previous "
                            f"number (first {int(numbers[1:][steps == 0][0])})")
        gaps = np.flatnonzero(steps > 1)
        if len(gaps):
            k = int(gaps[0])
            more = f" (and {len(gaps) - 1} more gap(s))" if len(gaps) > 1 else ""
            problems.append(f"missing InstanceNumber(s) between {int(numbers[k])} and {int(numbers[k + 1])}{more}")
        if problems:
            problems.append(f"ordered by {series.ordering}")
    else:
        problems.append(f"completeness cannot be checked: ordered by {series.ordering}")
    return "; ".join(problems) or None


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
