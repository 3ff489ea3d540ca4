"""DICOM series as scanned: slices (a file, or one frame of a multi-frame file), series, skipped files.

Every file that cannot be used is kept with its reason (:class:`SkippedFile`), every series
that is not used with its reason, so a caller reports skips instead of failing a whole run
or, worse, classifying something it should not. Nothing here logs or returns patient identifiers;
:attr:`ScanResult.identifiers` collects them only so that a report writer can redact them from file paths.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

PIXEL_DATA_TAG = 0x7FE00010


@dataclass
class SkippedFile:
    path: str
    reason: str


@dataclass
class DicomSlice:
    """One greyscale image: a single-frame file, or one frame of a multi-frame file (``frame`` set).

    ``dataset`` has its pixel data deferred; the frames of one file share it. For a frame, the
    geometry and ``rescale`` come from its functional groups (:data:`.policy.MULTI_FRAME_POLICY`).
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
    #: The PixelData element as scanned (deferred), restored by :meth:`restore_pixels`.
    scanned_pixels: object = field(default=None, repr=False)

    def attribute(self, keyword: str) -> str:
        """A header attribute as stripped text ("" when absent): for comparisons, never for output."""
        return str(self.dataset.get(keyword, "") or "").strip()

    def restore_pixels(self) -> None:
        """Return the dataset to its scanned state: pixel data read for decoding is dropped (deferred again)."""
        if self.scanned_pixels is not None and self.dataset.get_item(PIXEL_DATA_TAG, keep_deferred=True) is not \
                self.scanned_pixels:
            self.dataset[PIXEL_DATA_TAG] = self.scanned_pixels


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
        """Return the datasets to their scanned state: pixel data read for decoding is dropped (deferred again,
        read from the file if decoded again). Call when the series is classified; headers stay, for the reports."""
        for image in self.slices:
            image.restore_pixels()



@dataclass
class ScanResult:
    series: list[DicomSeries]
    skipped_files: list[SkippedFile]
    n_files: int
    identifiers: set[str] = field(default_factory=set, repr=False)



def as_strings(values) -> tuple[str, ...]:
    """Text values of a header or an option (one string split at commas and backslashes)."""
    if values is None:
        return ()
    if isinstance(values, str):
        values = [part for part in re.split(r"[,\\]", values) if part.strip()]
    return tuple(str(v).strip() for v in values)
