"""Scanning, grouping, selecting, ordering and decoding DICOM series, and every kind of bad input."""

import csv
import os
import random
import shutil

import numpy as np
import pydicom
import pytest

from robustmri.bench.dicom_fixtures import write_mr_series
from robustmri.data.readers import ImageReadError, read_image
from robustmri.deploy.dicom.headers import scan_folders
from robustmri.deploy.dicom.integrity import completeness_problem, order_slices
from robustmri.deploy.dicom.pixels import slice_pixels
from robustmri.deploy.dicom.selection import SeriesSelection, select_series

from deploy_helpers import copy_pydicom_files, gradient_series, pydicom_file


def shuffled_names(n, seed=0):
    names = [f"{random.Random(seed + i).getrandbits(40):x}" for i in range(n)]
    random.Random(seed).shuffle(names)
    return names


def by_uid(scan):
    return {s.series_instance_uid: s for s in scan.series}


def test_real_slices_grouped_selected_and_ordered(tmp_path, figshare_dir):
    rows = list(csv.DictReader(open(figshare_dir / "labels.csv")))
    glioma = [read_image(figshare_dir / r["file"]) for r in [r for r in rows if r["label_name"] == "glioma"][:5]]
    pituitary = [read_image(figshare_dir / r["file"]) for r in [r for r in rows if r["label_name"] == "pituitary"][:3]]
    a = write_mr_series(tmp_path, glioma, file_names=shuffled_names(5, 1))
    b = write_mr_series(tmp_path, pituitary, series_description="AX T1 POST", file_names=shuffled_names(3, 9))
    copy_pydicom_files(tmp_path, "CT_small.dcm")
    scan = scan_folders([tmp_path], progress=False)
    assert scan.n_files == 9 and not scan.skipped_files and len(scan.series) == 3
    selected, rejected = select_series(scan.series)
    assert sorted(len(s.slices) for s in selected) == [3, 5]
    assert [(s.modality, "Modality 'CT'" in why) for s, why in rejected] == [("CT", True)]
    for series, written, images in ((s, a if len(s.slices) == 5 else b, glioma if len(s.slices) == 5 else pituitary)
                                    for s in selected):
        order_slices(series)
        assert series.ordering == "ImagePositionPatient along the slice normal"
        assert series.files == written  # files were written in spatial order under shuffled names
        for image, expected in zip(series.slices, images):
            np.testing.assert_array_equal(slice_pixels(image), expected)  # slope and intercept applied


def test_oblique_series_ordered_along_the_normal_not_by_instance_number(tmp_path):
    c, s = np.cos(0.4), np.sin(0.4)
    orientation = (1.0, 0.0, 0.0, 0.0, c, s)  # tilted about x: the normal is (0, -s, c)
    paths = write_mr_series(tmp_path, gradient_series(5), orientation=orientation, file_names=shuffled_names(5))
    for path, number in zip(paths, [5, 3, 1, 4, 2]):  # InstanceNumber disagrees with position
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = number
        ds.save_as(path)
    (series,) = scan_folders(tmp_path, progress=False).series
    order_slices(series)
    assert series.files == paths
    steps = np.diff([sl.position_mm for sl in series.slices])
    np.testing.assert_allclose(steps, 6.0, atol=1e-3)  # the spacing the writer used


def test_falls_back_to_instance_number_then_file_name(tmp_path):
    paths = write_mr_series(tmp_path, gradient_series(4), file_names=["d", "c", "b", "a"])
    ds = pydicom.dcmread(paths[2])
    del ds.ImagePositionPatient
    ds.save_as(paths[2])
    (series,) = scan_folders(tmp_path, progress=False).series
    order_slices(series)
    assert series.ordering.startswith("InstanceNumber") and "ImagePositionPatient" in series.ordering
    assert series.files == paths
    ds = pydicom.dcmread(paths[0])
    del ds.InstanceNumber
    ds.save_as(paths[0])
    (series,) = scan_folders(tmp_path, progress=False).series
    order_slices(series)
    assert series.ordering.startswith("file name") and series.files == sorted(paths)


def test_monochrome1_is_negated(tmp_path):
    (path,) = write_mr_series(tmp_path, gradient_series(1))
    ds = pydicom.dcmread(path)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(path)
    (series,) = scan_folders(tmp_path, progress=False).series
    np.testing.assert_array_equal(slice_pixels(series.slices[0]), -gradient_series(1)[0])
    # single-file inference decodes the same way as series inference
    single = shutil.copy(path, tmp_path / "single.dcm")  # series files carry no suffix; single files do
    np.testing.assert_array_equal(read_image(single), -gradient_series(1)[0])


def test_selection_rules(tmp_path):
    write_mr_series(tmp_path, gradient_series(2), series_description="AX T1 POST GD")
    write_mr_series(tmp_path, gradient_series(2), series_description="SAG T2 FLAIR")
    series = scan_folders(tmp_path, progress=False).series
    describe = lambda rule: sorted(s.series_description for s in select_series(series, rule)[0])  # noqa: E731
    assert describe(SeriesSelection()) == ["AX T1 POST GD", "SAG T2 FLAIR"]
    assert describe(SeriesSelection(series_description=r"t1.*(post|gd)")) == ["AX T1 POST GD"]
    assert describe(SeriesSelection(image_type="ORIGINAL,PRIMARY")) == ["AX T1 POST GD", "SAG T2 FLAIR"]
    assert describe(SeriesSelection(image_type=["DERIVED"])) == []
    assert describe(SeriesSelection(modalities=["CT"])) == []
    with pytest.raises(ValueError, match="regular expression"):
        SeriesSelection(series_description="(")


def test_slices_of_different_sizes_are_not_one_series(tmp_path):
    paths = write_mr_series(tmp_path, gradient_series(3, size=40))
    first = pydicom.dcmread(paths[0])
    # same patient, study, series and frame of reference: only the size differs
    write_mr_series(tmp_path / "other", gradient_series(1, size=24), study_uid=first.StudyInstanceUID,
                    series_uid=first.SeriesInstanceUID, frame_of_reference_uid=first.FrameOfReferenceUID)
    selected, rejected = select_series(scan_folders(tmp_path, progress=False).series)
    assert not selected
    assert "different sizes" in rejected[0][1] and "40 x 40 (3 slices)" in rejected[0][1]


@pytest.mark.parametrize("name, reason", [
    ("badVR.dcm", "invalid NumberOfFrames '1A'"),
    ("no_meta.dcm", "not a DICOM Part 10 file"),
    ("rtplan.dcm", "no pixel data: RT Plan Storage is not an image"),
    ("reportsi.dcm", "no pixel data: Basic Text SR Storage is not an image"),
])
def test_unusable_files_are_skipped_with_their_reason(tmp_path, name, reason):
    write_mr_series(tmp_path, gradient_series(2))
    copy_pydicom_files(tmp_path, name)
    scan = scan_folders(tmp_path, progress=False)
    assert [(s.path.endswith(name), reason in s.reason) for s in scan.skipped_files] == [(True, True)]
    assert [len(s.slices) for s in scan.series] == [2]  # the good series is untouched


def test_non_dicom_files_and_empty_folders(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    (tmp_path / "in" / "slice.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    (tmp_path / "empty").mkdir()
    scan = scan_folders([tmp_path / "in", tmp_path / "empty"], progress=False)
    reasons = {s.path.rsplit("/", 1)[-1]: s.reason for s in scan.skipped_files}
    assert reasons["empty"] == "empty folder: no files"
    assert "not a DICOM Part 10 file" in reasons["notes.txt"] and "not a DICOM Part 10 file" in reasons["slice.png"]
    assert scan.series == []
    with pytest.raises(FileNotFoundError, match="no files"):
        scan_folders(tmp_path / "empty", progress=False)
    with pytest.raises(FileNotFoundError, match="not found"):
        scan_folders(tmp_path / "nowhere", progress=False)


def test_truncated_pixel_data_fails_that_slice_with_its_reason(tmp_path):
    copy_pydicom_files(tmp_path, "MR_truncated.dcm")
    (series,) = scan_folders(tmp_path, progress=False).series
    with pytest.raises(ImageReadError, match="cannot decode pixel data.*less than expected"):
        slice_pixels(series.slices[0])


def test_duplicate_instances_are_skipped(tmp_path):
    copy_pydicom_files(tmp_path / "a", "MR_small.dcm")
    copy_pydicom_files(tmp_path / "b", "MR_small.dcm")
    scan = scan_folders([tmp_path / "a", tmp_path / "b"], progress=False)
    assert len(scan.series[0].slices) == 1 and "duplicate SOPInstanceUID" in scan.skipped_files[0].reason


def decoder_installed(transfer_syntax) -> bool:
    from pydicom.pixels import get_decoder

    return get_decoder(transfer_syntax).is_available


@pytest.mark.parametrize("name", ["MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm"])
def test_compressed_slices_decode_or_name_the_missing_decoder(tmp_path, name):
    copy_pydicom_files(tmp_path, name)
    (series,) = scan_folders(tmp_path, progress=False).series
    syntax = series.header.file_meta.TransferSyntaxUID
    if decoder_installed(syntax):
        reference = pydicom.dcmread(pydicom_file("MR_small.dcm"))  # the same image, uncompressed
        np.testing.assert_array_equal(slice_pixels(series.slices[0]), reference.pixel_array.astype(np.float32))
    else:
        with pytest.raises(ImageReadError, match=f"{syntax.name}.*no decoder installed.*dicom-codecs"):
            slice_pixels(series.slices[0])


def test_missing_decoder_is_named(tmp_path, monkeypatch):
    """Whatever is installed: a decoder without its plugin gives an error naming it and the extra."""
    import pydicom.pixels

    class NoPlugin:
        is_available = False
        missing_dependencies = ["pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-rle>=2.0"]

    copy_pydicom_files(tmp_path, "MR_small_RLE.dcm")
    (series,) = scan_folders(tmp_path, progress=False).series
    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda syntax: NoPlugin())
    with pytest.raises(ImageReadError, match="RLE Lossless.*no decoder installed.*dicom-codecs.*pylibjpeg-rle"):
        slice_pixels(series.slices[0])


def test_transfer_syntax_without_any_decoder(tmp_path):
    copy_pydicom_files(tmp_path, "MR_small.dcm")
    path = tmp_path / "MR_small.dcm"
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: pydicom has no decoder for it
    ds.PixelData = encapsulate([ds.PixelData])
    ds.save_as(path)
    (series,) = scan_folders(tmp_path, progress=False).series
    with pytest.raises(ImageReadError, match="no decoder exists.*MPEG2"):
        slice_pixels(series.slices[0])


# Series integrity and completeness: each case is written beside an ordinary series, which must stay usable.

def scan_beside_ordinary(tmp_path, images, **kwargs):
    """Scan the series under test (``write_mr_series(images, **kwargs)``) and an ordinary 4-slice series.

    Returns (series under test, its file paths); asserts the ordinary series is selected and complete.
    """
    ordinary = write_mr_series(tmp_path / "ordinary", gradient_series(4))
    paths = write_mr_series(tmp_path / "case", images, **kwargs)
    scan = scan_folders(tmp_path, progress=False)
    selected, _ = select_series(scan.series)
    normal = [s for s in selected if s.files and s.files[0] in ordinary]
    assert len(normal) == 1 and sorted(normal[0].files) == sorted(ordinary) and normal[0].refusal is None
    assert completeness_problem(order_slices(normal[0])) is None
    (case,) = [s for s in scan.series if set(s.files) & set(paths)]
    return case, paths, scan


def assert_refused(case, scan, expected: str):
    """Refused whole: the reason says ``expected``, select_series rejects it with that reason."""
    assert case.refusal is not None and expected in case.refusal, case.refusal
    assert f"none of the {len(case.slices)} files is used" in case.refusal
    rejected = dict((s.series_instance_uid, why) for s, why in select_series(scan.series)[1])
    assert rejected[case.series_instance_uid] == case.refusal
    assert "\n" not in case.refusal and not any(os.path.basename(f) in case.refusal for f in case.files)


def test_ordinary_series_and_single_slice_are_complete(tmp_path):
    case, paths, _ = scan_beside_ordinary(tmp_path, gradient_series(1), overrides={0: {"InstanceNumber": None}})
    assert case.refusal is None and completeness_problem(order_slices(case)) is None
    with pytest.raises(ValueError, match="order_slices first"):
        completeness_problem(scan_folders(tmp_path / "ordinary", progress=False).series[0])


def test_ct_file_carrying_an_mr_series_uid_is_refused(tmp_path):
    case, paths, scan = scan_beside_ordinary(tmp_path, gradient_series(4), overrides={3: {"Modality": "CT"}})
    assert len(case.slices) == 4  # the CT file stays in its SeriesInstanceUID: refused whole, not split
    assert_refused(case, scan, "files sharing one SeriesInstanceUID disagree on Modality (2 values: 3 + 1 files); "
                               "files of different patients, studies or modalities are never merged")
    assert "PatientID" not in case.refusal and "StudyInstanceUID (" not in case.refusal
    assert case.modality == "CT/MR"


def test_mixed_orientation_is_refused(tmp_path):
    c, s = np.cos(0.1), np.sin(0.1)
    tilted = [f"{v:.6f}" for v in (1.0, 0.0, 0.0, 0.0, c, s)]
    case, _, scan = scan_beside_ordinary(tmp_path, gradient_series(4),
                                         overrides={2: {"ImageOrientationPatient": tilted}})
    assert_refused(case, scan, "refused, mixed geometry: files of one series disagree on ImageOrientationPatient "
                               "(2 values beyond 0.001: 3 + 1 files)")


def test_mixed_pixel_spacing_is_refused(tmp_path):
    case, _, scan = scan_beside_ordinary(tmp_path, gradient_series(4), overrides={1: {"PixelSpacing": ["0.5", "0.5"]}})
    assert_refused(case, scan, "refused, mixed geometry: files of one series disagree on PixelSpacing "
                               "(2 values beyond relative 0.001: 3 + 1 files)")


def test_mixed_frame_of_reference_is_refused(tmp_path):
    case, _, scan = scan_beside_ordinary(tmp_path, gradient_series(3),
                                         overrides={0: {"FrameOfReferenceUID": pydicom.uid.generate_uid()}})
    assert_refused(case, scan, "mixed geometry: files of one series disagree on FrameOfReferenceUID "
                               "(2 values: 2 + 1 files)")


def test_missing_middle_slice_makes_the_series_incomplete(tmp_path):
    case, paths, _ = scan_beside_ordinary(tmp_path, gradient_series(5))
    os.remove(paths[2])  # positions -40, -34, [-28 missing], -22, -16 mm
    (case,) = [s for s in scan_folders(tmp_path / "case", progress=False).series]
    assert case.refusal is None
    assert completeness_problem(order_slices(case)) == (
        "missing slice(s) between positions -34.00 mm and -22.00 mm, gap 12.00 mm against median 6.00 mm "
        "(limit 1.5 x median)")


def test_duplicate_positions_make_the_series_incomplete(tmp_path):
    # the last slice repeats the fourth one's position (-22 mm): no gap, one duplicate
    case, _, _ = scan_beside_ordinary(tmp_path, gradient_series(5),
                                      overrides={4: {"ImagePositionPatient": ["-125.0", "-125.0", "-22.0"]}})
    assert completeness_problem(order_slices(case)) == (
        "duplicate positions: 1 slice(s) within 0.001 mm of the previous one (first at -22.00 mm)")


@pytest.mark.parametrize("numbers, expected", [
    ([1, 2, 4, 5], "missing InstanceNumber(s) between 2 and 4; ordered by InstanceNumber "
                   "(ImagePositionPatient/ImageOrientationPatient missing or unreadable)"),
    ([1, 2, 2, 3], "duplicate InstanceNumber: 1 slice(s) repeat the previous number (first 2); "
                   "ordered by InstanceNumber"),
    ([1, 2, None, 3], "completeness cannot be checked: ordered by file name"),
])
def test_instance_numbers_when_positions_are_absent(tmp_path, numbers, expected):
    overrides = {i: {"ImagePositionPatient": None, "InstanceNumber": n} for i, n in enumerate(numbers)}
    case, _, _ = scan_beside_ordinary(tmp_path, gradient_series(4), overrides=overrides)
    assert case.refusal is None
    assert completeness_problem(order_slices(case)).startswith(expected)
