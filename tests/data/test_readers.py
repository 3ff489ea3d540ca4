import numpy as np
import pytest

from robustmri.data.catalog import DatasetError, scan_dataset
from robustmri.data.preprocessing import preprocess_minmax
from robustmri.data.readers import ImageReadError, read_figshare_mat, read_image

from helpers import gradient_image, write_figshare_mat, write_png


def test_png_roundtrip(tmp_path):
    image = gradient_image()
    path = write_png(tmp_path / "a.png", image)
    np.testing.assert_array_equal(read_image(path), image.astype(np.uint8).astype(np.float32))


def test_nifti_and_dicom(tmp_path):
    import nibabel as nib
    from pydicom.data import get_testdata_file

    image = gradient_image().astype(np.float32)
    nib.save(nib.Nifti1Image(image[:, :, None], np.eye(4)), tmp_path / "a.nii.gz")
    np.testing.assert_allclose(read_image(tmp_path / "a.nii.gz"), image)

    dicom = read_image(get_testdata_file("MR_small.dcm"))
    assert dicom.shape == (64, 64) and dicom.dtype == np.float32 and dicom.max() > dicom.min()


def test_figshare_mat_layout(tmp_path):
    image = gradient_image(40)
    path = write_figshare_mat(tmp_path / "1.mat", image, label=2, pid="12345")
    item = read_figshare_mat(path)
    np.testing.assert_array_equal(item.image, image.astype(np.int16))  # transposed back from MATLAB order
    assert item.label_name == "glioma" and item.patient_id == "12345"
    assert item.tumour_mask.shape == image.shape


def test_mat_without_cjdata_names_file(tmp_path):
    path = write_figshare_mat(tmp_path / "7.mat", gradient_image(), label=1, pid="1", with_cjdata=False)
    with pytest.raises(ImageReadError, match=r"7\.mat.*cjdata"):
        read_figshare_mat(path)


@pytest.mark.parametrize("content, reason", [(b"not an image", "not a readable image"), (b"", "not a readable image")])
def test_unreadable_image_names_file(tmp_path, content, reason):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=rf"broken\.png: {reason}"):
        read_image(path)


def test_nan_pixels_are_refused(tmp_path):
    import nibabel as nib

    image = gradient_image().astype(np.float32)
    image[3, 4] = np.nan
    image[5, 6] = np.inf
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "nan.nii")
    with pytest.raises(ImageReadError, match=r"nan\.nii: 2 NaN/Inf"):
        read_image(tmp_path / "nan.nii")


def test_preprocess_range_and_size():
    out = preprocess_minmax(gradient_image(50) + 100, 32)
    assert out.shape == (32, 32) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 1 and out.max() > 0.95 and out.min() < 0.05
    with pytest.raises(ValueError, match="constant image"):
        preprocess_minmax(np.full((8, 8), 3.0), 8)


def test_class_folders_and_labels_csv(tmp_path):
    for k, name in enumerate(["meningioma", "glioma", "pituitary"]):
        for i in range(2):
            write_png(tmp_path / name / f"{k}{i}.png", gradient_image(seed=i))
    catalog = scan_dataset(tmp_path)
    assert len(catalog) == 6 and sorted({r.label for r in catalog.records}) == [0, 1, 2]
    assert not catalog.grouped_by_patient

    (tmp_path / "labels.csv").write_text(
        "file,label_name,group\nmeningioma/00.png,meningioma,p1\nmeningioma/01.png,meningioma,p1\n"
        "glioma/10.png,glioma,p2\n")
    catalog = scan_dataset(tmp_path)
    assert [r.group for r in catalog.records] == [0, 0, 1] and catalog.grouped_by_patient


def test_unknown_class_raises_or_is_counted(tmp_path):
    write_png(tmp_path / "glioma" / "a.png", gradient_image())
    (tmp_path / "labels.csv").write_text("file,label_name\nglioma/a.png,glioma\nglioma/a.png,astrocytoma\n")
    with pytest.raises(ImageReadError, match="line 3: unknown class 'astrocytoma'"):
        scan_dataset(tmp_path)
    catalog = scan_dataset(tmp_path, on_error="skip")
    assert len(catalog) == 1 and len(catalog.skipped) == 1 and "astrocytoma" in catalog.skipped[0][1]


def test_unknown_class_folder(tmp_path):
    write_png(tmp_path / "glioma" / "a.png", gradient_image())
    write_png(tmp_path / "lymphoma" / "b.png", gradient_image())
    with pytest.raises(ImageReadError, match="lymphoma: folder is not a known class"):
        scan_dataset(tmp_path)
    assert len(scan_dataset(tmp_path, on_error="skip").skipped) == 1


def test_empty_folders(tmp_path):
    with pytest.raises(DatasetError, match="no labels.csv, no class folders"):
        scan_dataset(tmp_path)
    (tmp_path / "glioma").mkdir()
    with pytest.raises(DatasetError, match="no usable images"):
        scan_dataset(tmp_path)
    with pytest.raises(DatasetError, match="not found"):
        scan_dataset(tmp_path / "missing")


def test_figshare_mat_folder_groups_by_pid(tmp_path):
    pids = ["100", "100", "200", "300", "300"]
    for i, pid in enumerate(pids, start=1):
        write_figshare_mat(tmp_path / f"{i}.mat", gradient_image(seed=i), label=1 + i % 3, pid=pid)
    (tmp_path / "99.mat").write_bytes(b"garbage")
    with pytest.raises(ImageReadError, match=r"99\.mat"):
        scan_dataset(tmp_path)
    catalog = scan_dataset(tmp_path, on_error="skip")
    assert [r.group for r in catalog.records] == [0, 0, 1, 2, 2]
    assert len(catalog.skipped) == 1


def test_real_figshare_catalog(figshare_dir):
    catalog = scan_dataset(figshare_dir)
    labels = np.array([r.label for r in catalog.records])
    assert len(catalog) == 3064 and np.bincount(labels).tolist() == [708, 1426, 930]
    assert len({r.group for r in catalog.records}) == 260
    image = read_image(catalog.records[0].file)
    assert image.shape == (512, 512)
