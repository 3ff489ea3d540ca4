"""Enhanced MR and Legacy Converted Enhanced MR: multi-frame files read frame by frame, under the series rules."""

import json
import random
import shutil

import numpy as np
import pydicom
import pytest

from robustmri.bench.dicom_fixtures import (
    ENHANCED_MR_IMAGE_STORAGE,
    LEGACY_CONVERTED_ENHANCED_MR_IMAGE_STORAGE,
    write_enhanced_mr,
    write_mr_series,
)
from robustmri.deploy.dicom.headers import scan_folders
from robustmri.deploy.dicom.integrity import completeness_problem, order_slices
from robustmri.deploy.dicom.pixels import release_pixels, slice_pixels
from robustmri.deploy.dicom.series import PIXEL_DATA_TAG
from robustmri.deploy.dicom.study import infer_dicom
from robustmri.deploy.onnx.runtime import OnnxClassifier

from deploy_helpers import export_tiny, gradient_detector_data, gradient_series, signed_classifier

N = 6
TILTED = ["1.0", "0.0", "0.0", "0.0", f"{np.cos(0.4):.6f}", f"{np.sin(0.4):.6f}"]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    # a detector that accepts the gradient slices these tests write: their subject is reading frames, not the detector
    _, _, onnx_file, _ = export_tiny(tmp_path_factory.mktemp("model"), ood=gradient_detector_data(n=N),
                                     target_acceptance=1.0, signed=True)
    return signed_classifier(onnx_file)


def shuffled(n=N, seed=0):
    order = list(range(n))
    random.Random(seed).shuffle(order)
    assert order != sorted(order)
    return order


def write(tmp_path, legacy=False, **options):
    """One multi-frame file of ``N`` gradient slices, frames in shuffled spatial order by default."""
    options.setdefault("frame_order", shuffled())
    if legacy:  # a rescale of its own per frame, written in the per-frame functional groups
        options.setdefault("rescale", [(0.25, -10.0 - 4 * k) for k in range(N)])
    return write_enhanced_mr(tmp_path / "in" / "enhanced.dcm", gradient_series(N), legacy=legacy, **options)


def only_series(folder):
    scan = scan_folders(folder, progress=False)
    (series,) = scan.series
    return scan, series


def deferred(dataset) -> bool:
    element = dataset.get_item(PIXEL_DATA_TAG, keep_deferred=True)
    return isinstance(element, pydicom.dataelem.RawDataElement) and element.value is None


@pytest.mark.slow
@pytest.mark.parametrize("legacy", [False, True], ids=["enhanced", "legacy-converted"])
def test_shuffled_frames_ordered_decoded_and_classified_like_the_single_frame_series(tmp_path, classifier, legacy):
    images = gradient_series(N)
    order = shuffled()
    path = write(tmp_path, legacy=legacy, frame_order=order)
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == (LEGACY_CONVERTED_ENHANCED_MR_IMAGE_STORAGE if legacy else ENHANCED_MR_IMAGE_STORAGE)
    assert int(ds.NumberOfFrames) == N and "PixelSpacing" not in ds and "ImagePositionPatient" not in ds

    scan, series = only_series(tmp_path / "in")
    assert not scan.skipped_files and series.refusal is None and series.files == [path]
    order_slices(series)
    assert series.ordering == "ImagePositionPatient along the slice normal" and completeness_problem(series) is None
    # frame f (1-based, storage order) holds spatial slice order[f - 1]: ordered, frame k + 1 is at order.index(k)
    assert [s.frame for s in series.slices] == [order.index(k) + 1 for k in range(N)]
    np.testing.assert_allclose(np.diff([s.position_mm for s in series.slices]), 6.0, atol=1e-3)
    assert {s.pixel_spacing for s in series.slices} == {(0.49, 0.49)}
    assert {s.slice_thickness for s in series.slices} == {6.0}
    for image, expected in zip(series.slices, images):
        np.testing.assert_array_equal(slice_pixels(image), expected)  # the frame's own rescale applied
    assert not deferred(series.header)  # the frames share the file's pixel data until the series is released
    release_pixels(series)
    assert deferred(series.header)

    single = write_mr_series(tmp_path / "single", images)
    out_single = infer_dicom(tmp_path / "single", classifier, tmp_path / "out_single", progress=False,
                             include_paths=True)
    out_multi = infer_dicom(tmp_path / "in", classifier, tmp_path / "out_multi", progress=False, include_paths=True)
    assert out_single["n_series_classified"] == out_multi["n_series_classified"] == 1, out_multi["studies"]
    assert not out_multi["skipped_files"] and not out_multi["skipped_series"]
    a = json.loads((tmp_path / "out_single" / out_single["series"][0]["report_file"]).read_text())
    b = json.loads((tmp_path / "out_multi" / out_multi["series"][0]["report_file"]).read_text())
    assert [row["file"] for row in a["slices"]] == single and [row["file"] for row in b["slices"]] == [path] * N
    assert [row["frame"] for row in b["slices"]] == [order.index(k) + 1 for k in range(N)]
    assert a["result"]["class"] == b["result"]["class"] and a["ordering"] == b["ordering"]
    for name in classifier.class_names:
        assert b["result"]["probabilities"][name] == pytest.approx(a["result"]["probabilities"][name], abs=1e-6)
        np.testing.assert_allclose([r["probabilities"][name] for r in b["slices"]],
                                   [r["probabilities"][name] for r in a["slices"]], atol=1e-6)

    sr = pydicom.dcmread(tmp_path / "out_multi" / out_multi["series"][0]["sr_file"])
    (evidence,) = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert evidence.ReferencedSOPInstanceUID == ds.SOPInstanceUID and "ReferencedFrameNumber" not in evidence
    (image_item,) = sr.ContentSequence[0].ContentSequence  # the instance once, with every frame used
    reference = image_item.ReferencedSOPSequence[0]
    assert reference.ReferencedSOPInstanceUID == ds.SOPInstanceUID and reference.ReferencedSOPClassUID == ds.SOPClassUID
    assert [int(f) for f in reference.ReferencedFrameNumber] == [order.index(k) + 1 for k in range(N)]


@pytest.mark.slow
@pytest.mark.parametrize("legacy", [False, True], ids=["enhanced", "legacy-converted"])
def test_missing_frame_makes_the_series_incomplete(tmp_path, classifier, legacy):
    write(tmp_path, legacy=legacy, frame_order=[4, 0, 5, 1, 3])  # spatial slice 2 is missing
    _, series = only_series(tmp_path / "in")
    order_slices(series)
    assert "missing slice(s) between positions" in completeness_problem(series)
    summary = infer_dicom(tmp_path / "in", classifier, tmp_path / "out", progress=False)
    assert summary["n_series_classified"] == 0
    (skipped,) = summary["skipped_series"]
    assert skipped["reason"].startswith("incomplete series: missing slice(s)") and skipped["n_files"] == 1


@pytest.mark.slow
def test_frames_of_mixed_orientation_are_refused_as_mixed_geometry(tmp_path, classifier):
    write(tmp_path, frame_overrides={3: {"PlaneOrientationSequence": {"ImageOrientationPatient": TILTED}}})
    scan, series = only_series(tmp_path / "in")
    assert series.refusal == ("refused, mixed geometry: files of one series disagree on ImageOrientationPatient "
                              "(2 values beyond 0.001: 5 + 1 frames); none of the 1 files is used")
    summary = infer_dicom(tmp_path / "in", classifier, tmp_path / "out", progress=False, include_paths=True)
    assert summary["n_series_classified"] == 0 and summary["skipped_series"][0]["reason"] == series.refusal
    (skipped,) = summary["skipped_files"]
    assert skipped["reason"] == f"not used: {series.refusal}" and skipped["count"] == 1  # the file once, not per frame
    assert len(scan.series[0].files) == 1


@pytest.mark.parametrize("attribute, value", [("StackID", "2"), ("TemporalPositionIndex", 2)])
def test_several_stacks_or_time_points_in_one_series_are_refused(tmp_path, attribute, value):
    write(tmp_path, frame_order=list(range(N)),
          frame_overrides={k: {"FrameContentSequence": {attribute: value}} for k in (1, 3, 5)})
    _, series = only_series(tmp_path / "in")
    assert series.refusal.startswith(f"refused, several stacks or time points: frames of one series disagree on "
                                     f"{attribute} (2 values: 3 + 3 frames)")


def test_without_positions_frames_are_ordered_and_checked_by_in_stack_position(tmp_path):
    bad = {"PlanePositionSequence": {"ImagePositionPatient": ["0", "0"]}}  # unusable: two values
    order = shuffled()
    write(tmp_path, frame_order=order, frame_overrides={0: bad})
    _, series = only_series(tmp_path / "in")
    order_slices(series)
    assert series.ordering == ("InStackPositionNumber "
                               "(ImagePositionPatient/ImageOrientationPatient missing or unreadable)")
    assert [s.in_stack_position for s in series.slices] == list(range(1, N + 1))
    assert completeness_problem(series) is None

    shutil.rmtree(tmp_path / "in")
    write(tmp_path, frame_order=[5, 0, 1, 3, 4], frame_overrides={0: bad})  # InStackPositionNumber 3 is missing
    _, series = only_series(tmp_path / "in")
    order_slices(series)
    assert "missing InStackPositionNumber(s) between 2 and 4" in completeness_problem(series)


def test_a_copy_of_a_multi_frame_file_is_one_duplicate_not_one_per_frame(tmp_path):
    path = write(tmp_path)
    shutil.copy(path, tmp_path / "in" / "copy.dcm")
    scan, series = only_series(tmp_path / "in")
    assert len(series.slices) == N and len(series.files) == 1
    (skipped,) = scan.skipped_files
    assert skipped.reason.startswith("duplicate SOPInstanceUID")


def test_unusable_multi_frame_files_are_skipped_with_their_reason(tmp_path):
    (single,) = write_mr_series(tmp_path / "in", gradient_series(1))
    ds = pydicom.dcmread(single)
    ds.NumberOfFrames, ds.PixelData = 2, ds.PixelData * 2
    ds.save_as(single)  # multi-frame, but no functional groups say where its frames are
    enhanced = write(tmp_path)
    ds = pydicom.dcmread(enhanced)
    del ds.PerFrameFunctionalGroupsSequence[-1]
    ds.save_as(enhanced)
    scan = scan_folders(tmp_path / "in", progress=False)
    assert not scan.series
    reasons = {s.path: s.reason for s in scan.skipped_files}
    assert "multi-frame image (2 frames) without functional groups" in reasons[single]
    assert reasons[enhanced] == f"PerFrameFunctionalGroupsSequence has {N - 1} item(s) for {N} frame(s)"
