"""Which scanned series to classify: the operator's selection rules, then one image size per series."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from robustmri.deploy.dicom.series import DicomSeries, as_strings


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
        self.modalities = as_strings(self.modalities)
        self.image_type = as_strings(self.image_type)
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
