"""Memory of DICOM inference is bounded by the largest series, not by the run.

Python's own allocations (numpy arrays included) are traced with tracemalloc, which, unlike
the resident set size, does not depend on the allocator or on other threads.
"""

import gc
import tracemalloc

import numpy as np
import pytest

from robustmri.bench.dicom_fixtures import write_mr_series
from robustmri.deploy.dicom.headers import DEFER_SIZE, scan_folders
from robustmri.deploy.dicom.pixels import slice_pixels
from robustmri.deploy.dicom.series import PIXEL_DATA_TAG
from robustmri.deploy.dicom.study import infer_dicom
from robustmri.deploy.onnx.runtime import OnnxClassifier

from deploy_helpers import export_tiny, signed_classifier

SIZE, PER_SERIES = 512, 4
PIXEL_BYTES = SIZE * SIZE * 2  # uint16 per slice, far above DEFER_SIZE: deferred when scanned


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    _, _, onnx_file, _ = export_tiny(tmp_path_factory.mktemp("model"), signed=True)
    return signed_classifier(onnx_file)


def write_series(folder, n_series):
    rng = np.random.default_rng(n_series)
    for k in range(n_series):
        images = [rng.integers(0, 4000, (SIZE, SIZE)) * 0.25 for _ in range(PER_SERIES)]
        write_mr_series(folder / f"s{k}", images, series_number=k + 1)


def peak_traced_bytes(folder, classifier, out) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        summary = infer_dicom(folder, classifier, out, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # every series went through the model: classified, or abstained (random slices are out of distribution)
    assert summary["n_series_classified"] + summary["n_series_abstained"] == len(list(folder.iterdir()))
    return peak


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_number_of_series(tmp_path, classifier):
    assert PIXEL_BYTES > 4 * 1024 * int(DEFER_SIZE.split()[0])
    write_series(tmp_path / "two", 2)
    write_series(tmp_path / "six", 6)
    peaks = {n: peak_traced_bytes(tmp_path / name, classifier, tmp_path / f"out_{name}")
             for n, name in ((2, "two"), (6, "six"))}
    extra_files = (6 - 2) * PER_SERIES
    # Keeping each decoded slice's pixel data and pydicom's cached array (as before) added about
    # 2.2 x PIXEL_BYTES per extra file; what grows now is the headers and report rows, ~30 KB a file.
    assert (peaks[6] - peaks[2]) / extra_files < PIXEL_BYTES / 4, peaks


def test_decoding_a_slice_leaves_its_pixel_data_deferred(tmp_path):
    write_series(tmp_path, 1)
    (series,) = scan_folders(tmp_path, progress=False).series
    image = series.slices[0]
    assert image.dataset.get_item(PIXEL_DATA_TAG, keep_deferred=True).value is None  # deferred when scanned
    assert slice_pixels(image).shape == (SIZE, SIZE)
    element = image.dataset.get_item(PIXEL_DATA_TAG, keep_deferred=True)
    assert element.value is None and element is image.scanned_pixels  # not kept after decoding
    assert slice_pixels(image).shape == (SIZE, SIZE)  # and read again from the file when needed
