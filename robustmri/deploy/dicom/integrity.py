"""Whether the files of one series may be classified together, and in which order: integrity and completeness.

Series integrity (:data:`.policy.GROUPING_POLICY`): a series is the files that agree on PatientID,
StudyInstanceUID, SeriesInstanceUID, Modality, FrameOfReferenceUID, ImageOrientationPatient
(within :data:`.policy.ORIENTATION_TOLERANCE`) and PixelSpacing (within the relative
:data:`.policy.PIXEL_SPACING_TOLERANCE`). Files that share a SeriesInstanceUID but disagree on patient,
study or modality are never merged and never split: the whole SeriesInstanceUID is refused
(``DicomSeries.refusal``), none of its files is used. Disagreement on geometry (frame of
reference, orientation, pixel spacing) refuses the series too ("mixed geometry"). Reasons name
the attributes and count the values, never the values themselves.

Series completeness (:func:`completeness_problem`, after :func:`order_slices`): along the slice
normal, two slices within :data:`.policy.DUPLICATE_POSITION_TOLERANCE_MM` of each other, or a step
larger than :data:`.policy.GAP_FACTOR` times the median step (a missing slice), make a series
incomplete; when positions are unusable, repeated or skipped InstanceNumbers (InStackPositionNumbers
for frames) do. A one-slice series is complete.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from robustmri.deploy.dicom.policy import (
    DUPLICATE_POSITION_TOLERANCE_MM,
    FRAME_ATTRIBUTES,
    GAP_FACTOR,
    GEOMETRY_ATTRIBUTES,
    IDENTITY_ATTRIBUTES,
    ORIENTATION_TOLERANCE,
    PIXEL_SPACING_TOLERANCE,
)
from robustmri.deploy.dicom.series import DicomSeries, DicomSlice

#: The order this module gives when every slice has a position along one slice normal.
ORDER_BY_POSITION = "ImagePositionPatient along the slice normal"


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
