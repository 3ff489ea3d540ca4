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
incomplete; when positions are unusable, repeated or skipped InstanceNumbers (InStackPositionNumbers
for frames) do. A one-slice series is complete.

Multi-frame images (Enhanced MR, Legacy Converted Enhanced MR; :data:`MULTI_FRAME_POLICY`): each
frame is one slice (:attr:`DicomSlice.frame`), its position, orientation, pixel spacing and
rescale read from its per-frame functional groups, else the shared ones, else the top-level
attributes. The rules above apply to frames exactly as to single-frame files.

Memory: scanning keeps headers only. Decoding a single-frame file leaves its dataset as scanned;
the frames of a multi-frame file share its pixel data, read once and kept until
:func:`release_pixels` returns the series' datasets to their scanned state, so a run holds the
pixel data of at most one series at a time.
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
#: Attributes of multi-frame images on which the frames of one series must agree, or it is refused.
FRAME_ATTRIBUTES = ("StackID", "TemporalPositionIndex")
#: The order this module gives when every slice has a position along one slice normal.
ORDER_BY_POSITION = "ImagePositionPatient along the slice normal"
PIXEL_DATA_TAG = 0x7FE00010
GROUPING_POLICY = (
    "A series is the files that agree on PatientID, StudyInstanceUID, SeriesInstanceUID, Modality, "
    "FrameOfReferenceUID, ImageOrientationPatient (cosines within "
    f"{ORIENTATION_TOLERANCE:g}) and PixelSpacing (relative difference within {PIXEL_SPACING_TOLERANCE:g}). "
    "Files sharing a SeriesInstanceUID but disagreeing on patient, study or modality are never merged "
    "or split: the whole SeriesInstanceUID is refused and none of its files is used. Disagreement on "
    "geometry (frame of reference, orientation, pixel spacing) refuses the series as mixed geometry. "
    "Reasons name attributes and count values; they never contain the values."
)
MULTI_FRAME_POLICY = (
    "A multi-frame image (Enhanced MR, Legacy Converted Enhanced MR) is read frame by frame: each frame is "
    "one slice, with the position, orientation, pixel spacing, slice thickness and rescale of its per-frame "
    "functional groups, else of the shared functional groups, else of the top-level attributes. Frames "
    "follow the series rules exactly as single-frame files do (a file mixing orientations is mixed "
    "geometry). A series whose frames carry more than one StackID or TemporalPositionIndex (several "
    "stacks or time points) is ambiguous and refused, never merged into one volume. A multi-frame image "
    "without functional groups is not used."
)


@dataclass
class SkippedFile:
    path: str
    reason: str


@dataclass
class DicomSlice:
    """One greyscale image: a single-frame file, or one frame of a multi-frame file (``frame`` set).

    ``dataset`` has its pixel data deferred; the frames of one file share it. For a frame, the
    geometry and ``rescale`` come from its functional groups (:data:`MULTI_FRAME_POLICY`).
    """

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
    #: 1-based frame number in a multi-frame file (ReferencedFrameNumber); None for a single-frame file.
    frame: int | None = None
    #: (RescaleSlope, RescaleIntercept) of the frame's Pixel Value Transformation; None: the top-level ones.
    rescale: tuple[float, float] | None = None
    slice_thickness: float | None = None
    #: Frame Content of a frame (None for a single-frame file or when absent).
    in_stack_position: int | None = None
    stack_id: str | None = None
    temporal_position: int | None = None
    #: The PixelData element as scanned (deferred), restored by :func:`release_pixels`.
    scanned_pixels: object = field(default=None, repr=False)

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
        """The files of the series, each once (the frames of a multi-frame file share one)."""
        return list(dict.fromkeys(s.path for s in self.slices))

    def release(self) -> None:
        """Drop the pixel data read for decoding (:func:`release_pixels`); call when the series is classified."""
        release_pixels(self)


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


def make_slices(path: str, ds) -> list[DicomSlice]:
    """Check that ``ds`` is a greyscale image and describe it: one slice, or one per frame.

    ImageReadError (naming the file and the problem) when it cannot be classified. A multi-frame
    image must carry functional groups (Enhanced MR, Legacy Converted Enhanced MR):
    :data:`MULTI_FRAME_POLICY`.
    """
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
    if frames < 1:
        raise ImageReadError(path, f"invalid NumberOfFrames {frames}")
    rows, columns = _integer(ds, "Rows", path), _integer(ds, "Columns", path)
    if rows < 2 or columns < 2:
        raise ImageReadError(path, f"image too small: {rows} x {columns}")
    common = dict(path=path, dataset=ds, sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=sop_class,
                  rows=rows, columns=columns, instance_number=_optional_integer(ds, "InstanceNumber"),
                  scanned_pixels=ds.get_item(PIXEL_DATA_TAG, keep_deferred=True))
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    if per_frame is None and shared is None:
        if frames != 1:
            raise ImageReadError(path, f"multi-frame image ({frames} frames) without functional groups: the "
                                       "frames' positions are unknown (Enhanced MR and Legacy Converted "
                                       "Enhanced MR are read frame by frame)")
        return [DicomSlice(**common, position=_floats(ds, "ImagePositionPatient", 3),
                           orientation=_floats(ds, "ImageOrientationPatient", 6),
                           pixel_spacing=_floats(ds, "PixelSpacing", 2),
                           slice_thickness=_float(ds, "SliceThickness"))]
    if per_frame is not None and len(per_frame) != frames:
        raise ImageReadError(path, f"PerFrameFunctionalGroupsSequence has {len(per_frame)} item(s) for "
                                   f"{frames} frame(s)")
    shared_item = shared[0] if shared else None
    slices = []
    for index in range(frames):
        frame_item = per_frame[index] if per_frame is not None else None
        sources = (frame_item, shared_item, ds)
        measures = _functional_group(sources, "PixelMeasuresSequence")
        transformation = _functional_group(sources, "PixelValueTransformationSequence")
        content = frame_item.FrameContentSequence[0] if frame_item is not None and frame_item.get(
            "FrameContentSequence") else None
        rescale = None
        if transformation is not ds:
            slope, intercept = _float(transformation, "RescaleSlope"), _float(transformation, "RescaleIntercept")
            if slope is None or intercept is None:
                raise ImageReadError(path, f"frame {index + 1}: Pixel Value Transformation without a valid "
                                           "RescaleSlope and RescaleIntercept")
            rescale = (slope, intercept)
        slices.append(DicomSlice(
            **common, frame=index + 1, rescale=rescale,
            position=_floats(_functional_group(sources, "PlanePositionSequence"), "ImagePositionPatient", 3),
            orientation=_floats(_functional_group(sources, "PlaneOrientationSequence"), "ImageOrientationPatient", 6),
            pixel_spacing=_floats(measures, "PixelSpacing", 2), slice_thickness=_float(measures, "SliceThickness"),
            in_stack_position=None if content is None else _optional_integer(content, "InStackPositionNumber"),
            stack_id=None if content is None else (str(content.get("StackID", "") or "").strip() or None),
            temporal_position=None if content is None else _optional_integer(content, "TemporalPositionIndex")))
    return slices


def _functional_group(sources, keyword: str):
    """The first item of functional group ``keyword`` in the frame's item, else in the shared item;
    else the dataset itself (``sources`` = (per-frame item or None, shared item or None, dataset))."""
    *items, ds = sources
    for item in items:
        if item is not None and item.get(keyword):
            return item[keyword][0]
    return ds


def scan_folders(folders, progress: bool = True) -> ScanResult:
    """Read every file's header under ``folders``; group usable image files by SeriesInstanceUID.

    Every group is checked against :data:`GROUPING_POLICY` (:func:`integrity_problem`); a group
    that fails is kept whole with its ``refusal`` set, so that it is reported and never classified.
    A file repeating a SOPInstanceUID already seen in its series is skipped as a duplicate only
    when it agrees on patient, study and modality; otherwise it stays and the series is refused.
    A multi-frame file adds one slice per frame (:func:`make_slices`).
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
            images = make_slices(path, ds)
        except ImageReadError as err:
            skipped.append(SkippedFile(path, err.reason))
            continue
        image = images[0]
        uid = str(ds.SeriesInstanceUID)
        key = (uid, image.sop_instance_uid)  # per file: the frames of one file share its SOPInstanceUID
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
        series[uid].slices += images
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
    """For each attribute on which ``slices`` disagree: 'Name (K values: n1 + n2 files)' (counts only).

    Slices are counted as "files", or as "frames" when one of them is a frame of a multi-frame file.
    """
    exact = lambda a, b: a == b  # noqa: E731
    rules = {"ImageOrientationPatient": (lambda s: s.orientation, _within(ORIENTATION_TOLERANCE)),
             "PixelSpacing": (lambda s: s.pixel_spacing, _within(PIXEL_SPACING_TOLERANCE, relative=True)),
             "StackID": (lambda s: s.stack_id, exact),
             "TemporalPositionIndex": (lambda s: s.temporal_position, exact)}
    unit = "frames" if any(s.frame is not None for s in slices) else "files"
    parts = []
    for keyword in attributes:
        value_of, same = rules.get(keyword, (lambda s, k=keyword: s.attribute(k) or None, exact))
        counts = _value_counts([value_of(s) for s in slices], same)
        if len(counts) > 1:
            tolerance = {"ImageOrientationPatient": f" beyond {ORIENTATION_TOLERANCE:g}",
                         "PixelSpacing": f" beyond relative {PIXEL_SPACING_TOLERANCE:g}"}.get(keyword, "")
            parts.append(f"{keyword} ({len(counts)} values{tolerance}: {' + '.join(map(str, counts))} {unit})")
    return parts


def integrity_problem(series: DicomSeries) -> str | None:
    """Why the files of ``series`` (one SeriesInstanceUID) must not be classified together, or None.

    Patient, study or modality disagreement comes first (never merged, never relaxed), then mixed
    geometry, then frames of several stacks or time points (:data:`MULTI_FRAME_POLICY`). The
    reason names attributes and counts values (:data:`GROUPING_POLICY`).
    """
    n = len(series.files)
    identity = _disagreements(series.slices, IDENTITY_ATTRIBUTES)
    if identity:
        return (f"refused: files sharing one SeriesInstanceUID disagree on {', '.join(identity)}; files of "
                f"different patients, studies or modalities are never merged, none of the {n} files is used")
    geometry = _disagreements(series.slices, GEOMETRY_ATTRIBUTES)
    if geometry:
        return (f"refused, mixed geometry: files of one series disagree on {', '.join(geometry)}; "
                f"none of the {n} files is used")
    frames = _disagreements(series.slices, FRAME_ATTRIBUTES)
    if frames:
        return (f"refused, several stacks or time points: frames of one series disagree on {', '.join(frames)}; "
                f"an ambiguous multi-frame series is not merged into one volume, none of the {n} files is used")
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
        # InstanceNumber, file and frame break ties (e.g. two echoes at one position): a deterministic order.
        slices.sort(key=lambda s: (s.position_mm, s.instance_number if s.instance_number is not None else 0, s.path,
                                   s.frame or 0))
        steps = np.diff([s.position_mm for s in slices])
        distinct = 1 + int(np.sum(steps > DUPLICATE_POSITION_TOLERANCE_MM))
        series.ordering = ORDER_BY_POSITION
        if distinct < len(slices):
            series.ordering += f" ({len(slices) - distinct} slice(s) share a position with another)"
    elif (numbering := _numbering(slices)) is not None:
        keyword, number = numbering
        slices.sort(key=lambda s: (number(s), s.path, s.frame or 0))
        series.ordering = f"{keyword} ({problem})"
    else:
        slices.sort(key=lambda s: (s.path, s.frame or 0))
        missing = ("InStackPositionNumber" if any(s.frame is not None for s in slices) else "InstanceNumber")
        series.ordering = f"file name ({problem}; {missing} missing)"
    return series


def _numbering(slices: list[DicomSlice]) -> tuple[str, Callable[[DicomSlice], int]] | None:
    """The number that orders ``slices`` when positions cannot: InstanceNumber of single-frame files,
    InStackPositionNumber of frames (the frames of one file share an InstanceNumber); None if one lacks it."""
    if all(s.frame is None and s.instance_number is not None for s in slices):
        return "InstanceNumber", lambda s: s.instance_number
    if all(s.frame is not None and s.in_stack_position is not None for s in slices):
        return "InStackPositionNumber", lambda s: s.in_stack_position
    return None


def completeness_problem(series: DicomSeries) -> str | None:
    """Why the ordered ``series`` looks incomplete (duplicate or missing slices), or None; one line.

    Along the slice normal (ordered by :data:`ORDER_BY_POSITION`): positions within
    :data:`DUPLICATE_POSITION_TOLERANCE_MM` of the previous one are duplicates; a step between
    distinct positions above :data:`GAP_FACTOR` times their median step is missing slice(s).
    Ordered by InstanceNumber (InStackPositionNumber for frames): a repeated number, or consecutive
    numbers more than 1 apart.
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
    elif (numbering := _numbering(slices)) is not None and series.ordering.startswith(numbering[0]):
        keyword, number = numbering
        numbers = np.array([number(s) for s in slices])
        steps = np.diff(numbers)
        if (steps == 0).any():
            problems.append(f"duplicate {keyword}: {int((steps == 0).sum())} slice(s) repeat the previous "
                            f"number (first {int(numbers[1:][steps == 0][0])})")
        gaps = np.flatnonzero(steps > 1)
        if len(gaps):
            k = int(gaps[0])
            more = f" (and {len(gaps) - 1} more gap(s))" if len(gaps) > 1 else ""
            problems.append(f"missing {keyword}(s) between {int(numbers[k])} and {int(numbers[k + 1])}{more}")
        if problems:
            problems.append(f"ordered by {series.ordering}")
    else:
        problems.append(f"completeness cannot be checked: ordered by {series.ordering}")
    return "; ".join(problems) or None


def slice_pixels(image: DicomSlice) -> np.ndarray:
    """Decode one slice (one frame of a multi-frame file) to float32 modality values, checked against its header.

    :func:`robustmri.data.readers.dicom_pixels` with the frame's own rescale. A single-frame file's
    dataset is returned to its scanned state (pixel data deferred) at once; a multi-frame file keeps
    its pixel data for its other frames until :func:`release_pixels`.
    """
    try:
        values = dicom_pixels(image.dataset, image.path, frame=image.frame, rescale=image.rescale)
    finally:
        if image.frame is None:
            _restore_pixels(image)
    values = check_finite_2d(values, image.path)
    if values.shape != (image.rows, image.columns):
        raise ImageReadError(image.path, f"decoded {values.shape}, header says {image.rows} x {image.columns}")
    return values


def release_pixels(series: DicomSeries) -> None:
    """Return the datasets of ``series`` to their scanned state: pixel data read for decoding is dropped
    (deferred again, read from the file if decoded again). Call when the series is classified; headers
    stay, for the reports."""
    for image in series.slices:
        _restore_pixels(image)


def _restore_pixels(image: DicomSlice) -> None:
    if image.scanned_pixels is not None and image.dataset.get_item(PIXEL_DATA_TAG, keep_deferred=True) is not \
            image.scanned_pixels:
        image.dataset[PIXEL_DATA_TAG] = image.scanned_pixels


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


def _float(ds, keyword: str) -> float | None:
    value = _floats(ds, keyword, 1)
    return None if value is None else value[0]


def _floats(ds, keyword: str, count: int) -> tuple[float, ...] | None:
    value = ds.get(keyword, None)
    if value is not None and (isinstance(value, (str, bytes)) or not hasattr(value, "__iter__")):
        value = [value]  # a single value
    try:
        numbers = tuple(float(v) for v in value) if value is not None else ()
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count and all(np.isfinite(numbers)) else None
