"""Decode the pixels of selected slices, and release them again.

Memory: scanning keeps headers only. Decoding a single-frame file leaves its dataset as scanned;
the frames of a multi-frame file share its pixel data, read once and kept until
:func:`release_pixels` returns the series' datasets to their scanned state, so a run holds the
pixel data of at most one series at a time.
"""

from __future__ import annotations

import numpy as np

from robustmri.data.readers import ImageReadError, check_finite_2d, dicom_pixels
from robustmri.deploy.dicom.series import DicomSeries, DicomSlice


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
            image.restore_pixels()
    values = check_finite_2d(values, image.path)
    if values.shape != (image.rows, image.columns):
        raise ImageReadError(image.path, f"decoded {values.shape}, header says {image.rows} x {image.columns}")
    return values


def release_pixels(series: DicomSeries) -> None:
    """Return the datasets of ``series`` to their scanned state: pixel data read for decoding is dropped
    (deferred again, read from the file if decoded again). Call when the series is classified; headers
    stay, for the reports."""
    series.release()
