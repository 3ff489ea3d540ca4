"""Read DICOM headers: scan folders, describe each usable image, group files by SeriesInstanceUID.

Datasets are read with their pixel data deferred: scanning a folder reads headers only, pixels are
decoded for selected series (:mod:`.pixels`). Each group is checked against the grouping policy
(:func:`.integrity.integrity_problem`).

Multi-frame images (Enhanced MR, Legacy Converted Enhanced MR; :data:`.policy.MULTI_FRAME_POLICY`): each
frame is one slice (:attr:`DicomSlice.frame`), its position, orientation, pixel spacing and
rescale read from its per-frame functional groups, else the shared ones, else the top-level
attributes. The series rules apply to frames exactly as to single-frame files.
"""

from __future__ import annotations

import io
import logging
import os
import re
import stat

import numpy as np

from robustmri.data.readers import ImageReadError, as_path_list, safe_detail
from robustmri.deploy.dicom.integrity import integrity_problem
from robustmri.deploy.dicom.policy import IDENTITY_ATTRIBUTES
from robustmri.deploy.dicom.series import PIXEL_DATA_TAG, DicomSeries, DicomSlice, ScanResult, SkippedFile, as_strings

logger = logging.getLogger(__name__)

#: Values deferred past this size are read from the file only when used (the pixel data).
DEFER_SIZE = "16 KB"
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
#: At most this many bytes are parsed to find where a file's header ends (pydicom stops before the
#: pixel data) before the file is read with its pixel data deferred. A corrupt file (say, hundreds of
#: MB of zeros after a valid 'DICM' prefix) would otherwise be parsed element by element to its end,
#: for minutes; real headers, Enhanced MR with a functional group per frame included, are far smaller.
HEADER_LIMIT_BYTES = 4 * 1024 * 1024
NOT_REGULAR = "not a regular file (named pipe, socket or device): not opened"


def list_files(folders) -> tuple[list[str], list[SkippedFile]]:
    """Every regular file under the folders (DICOM files often have no suffix); empty folders as skips.

    Named pipes, sockets and devices are skipped without being opened (reading a pipe would wait
    for a writer forever); they count among the files found."""
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
        for path in found:
            if _is_regular(path):
                files.append(path)
            else:
                skipped.append(SkippedFile(path, NOT_REGULAR))
    return files, skipped


def _is_regular(path: str) -> bool:
    """Whether ``path`` is a regular file (or a link to one); a file that vanished counts as regular, and its
    read then says why it is skipped."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return True


def read_header(path: str):
    """Read a DICOM file with its pixel data deferred; raise ImageReadError saying why it is unusable."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ImageReadError(path, NOT_REGULAR)
        _check_header_size(path)
        ds = pydicom.dcmread(path, defer_size=DEFER_SIZE)
    except ImageReadError:
        raise
    except InvalidDicomError as err:
        raise ImageReadError(path, "not a DICOM Part 10 file: no 'DICM' prefix or file meta information") from err
    except OSError as err:
        raise ImageReadError(path, f"cannot read the file ({safe_detail(err)})") from err
    except Exception as err:  # pydicom raises many types for corrupt files
        raise ImageReadError(path, f"unreadable DICOM file ({safe_detail(err)})") from err
    return ds


def _check_header_size(path: str) -> None:
    """ImageReadError when a file larger than :data:`HEADER_LIMIT_BYTES` has no pixel data element within its
    first :data:`HEADER_LIMIT_BYTES` (a corrupt file, or a header too large to be an image's)."""
    import pydicom

    if os.path.getsize(path) <= HEADER_LIMIT_BYTES:
        return  # parsing the whole file is bounded by the limit already
    with open(path, "rb") as handle:
        prefix = io.BytesIO(handle.read(HEADER_LIMIT_BYTES))
    pydicom.dcmread(prefix, stop_before_pixels=True)  # InvalidDicomError when not DICOM
    if prefix.tell() >= HEADER_LIMIT_BYTES:  # read to the end of the prefix without reaching the pixel data
        raise ImageReadError(path, f"no pixel data within the first {HEADER_LIMIT_BYTES // (1024 * 1024)} MB: "
                                   "a corrupt file or a header too large to parse")


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
                                      image_type=as_strings(ds.get("ImageType")))
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
