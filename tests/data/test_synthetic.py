"""Tests for the embedded synthetic data set (robustmri.data.synthetic).

Besides shapes and determinism, they check that each class carries the radiological cue
it is meant to teach (location, enhancement pattern, oedema), since a generator that
silently lost a cue would still "work" but make the benchmark meaningless.
"""

import time

import numpy as np
import pytest
from scipy import ndimage

from robustmri import CLASS_NAMES
from robustmri.data.synthetic import CLASS_PROBABILITIES, generate_slices

MENINGIOMA, GLIOMA, PITUITARY = (
    CLASS_NAMES.index(name) for name in ("meningioma", "glioma", "pituitary")
)


@pytest.fixture(scope="module")
def dataset():
    """One mid-size set with masks, shared by the anatomy tests (kept small for speed)."""
    return generate_slices(n_patients=90, size=64, seed=0, return_masks=True)


def _centroid(mask):
    rows, cols = np.nonzero(mask)
    return rows.mean(), cols.mean()


def test_class_names_and_probabilities_follow_the_real_data_set():
    assert CLASS_NAMES == ("meningioma", "glioma", "pituitary")
    assert np.isclose(sum(CLASS_PROBABILITIES), 1.0)
    assert np.argmax(CLASS_PROBABILITIES) == GLIOMA  # 1426 of 3064 real slices


def test_shapes_dtypes_and_range():
    data = generate_slices(n_patients=12, size=40, seed=3)
    assert set(data) == {"images", "labels", "groups"}
    images, labels, groups = data["images"], data["labels"], data["groups"]
    assert images.dtype == np.float32 and labels.dtype == np.int64 and groups.dtype == np.int64
    assert images.ndim == 3 and images.shape[1:] == (40, 40)
    assert labels.shape == groups.shape == (images.shape[0],)
    assert np.isfinite(images).all()
    # Scaled to [0, 1] per image: every image reaches both ends.
    np.testing.assert_allclose(images.min(axis=(1, 2)), 0.0, atol=1e-6)
    np.testing.assert_allclose(images.max(axis=(1, 2)), 1.0, atol=1e-6)
    assert set(np.unique(labels)) <= {0, 1, 2}


def test_background_is_dark_and_head_is_bright():
    data = generate_slices(n_patients=10, size=64, seed=1)
    images = data["images"]
    corners = np.concatenate([images[:, :4, :4], images[:, -4:, -4:]], axis=1)
    centre = images[:, 24:40, 24:40]
    assert corners.mean() < 0.1
    assert centre.mean() > 3 * corners.mean()


def test_same_arguments_give_bit_identical_output():
    first = generate_slices(n_patients=8, size=48, seed=7, return_masks=True)
    second = generate_slices(n_patients=8, size=48, seed=7, return_masks=True)
    assert first.keys() == second.keys()
    for key in first:
        assert first[key].dtype == second[key].dtype
        assert np.array_equal(first[key], second[key]), key


def test_different_seeds_give_different_data():
    first = generate_slices(n_patients=8, size=48, seed=0)
    second = generate_slices(n_patients=8, size=48, seed=1)
    assert np.abs(first["images"][0] - second["images"][0]).mean() > 0.01
    n = min(len(first["images"]), len(second["images"]))
    assert not np.allclose(first["images"][:n], second["images"][:n], atol=0.01)


def test_patient_slices_do_not_depend_on_the_number_of_patients():
    small = generate_slices(n_patients=3, size=32, seed=5)
    large = generate_slices(n_patients=7, size=32, seed=5)
    n = len(small["images"])
    assert np.array_equal(small["images"], large["images"][:n])
    assert np.array_equal(small["labels"], large["labels"][:n])
    assert np.array_equal(small["groups"], large["groups"][:n])


def test_groups_have_one_label_and_slice_counts_within_range():
    data = generate_slices(n_patients=25, size=24, seed=2, slices_per_patient=(2, 3))
    groups, labels = data["groups"], data["labels"]
    assert np.array_equal(np.unique(groups), np.arange(25))
    assert np.all(np.diff(groups) >= 0)  # each patient's slices are contiguous
    counts = np.bincount(groups)
    assert counts.min() >= 2 and counts.max() <= 3
    assert {2, 3} == set(counts)  # both ends of the range occur
    for patient in range(25):
        assert len(np.unique(labels[groups == patient])) == 1


def test_single_slice_per_patient():
    data = generate_slices(n_patients=6, size=16, seed=0, slices_per_patient=(1, 1))
    assert np.array_equal(data["groups"], np.arange(6))


def test_all_classes_present_with_realistic_imbalance():
    labels = generate_slices(n_patients=200, size=16, seed=0, slices_per_patient=(1, 1))["labels"]
    fractions = np.bincount(labels, minlength=3) / len(labels)
    assert np.all(fractions > 0)
    np.testing.assert_allclose(fractions, CLASS_PROBABILITIES, atol=0.08)
    assert fractions[GLIOMA] == fractions.max()


def test_slices_of_one_patient_look_alike(dataset):
    """Neighbouring slices share anatomy and tumour: why splits must group by patient."""
    flat = dataset["images"].reshape(len(dataset["images"]), -1).astype(np.float64)
    flat = (flat - flat.mean(axis=1, keepdims=True)) / flat.std(axis=1, keepdims=True)
    correlation = flat @ flat.T / flat.shape[1]
    groups = dataset["groups"]
    same_patient = (groups[:, None] == groups[None, :]) & ~np.eye(len(groups), dtype=bool)
    other_patient = groups[:, None] != groups[None, :]
    assert same_patient.any()
    assert correlation[same_patient].mean() > correlation[other_patient].mean() + 0.15
    # ...but they are not copies of each other.
    assert correlation[same_patient].max() < 0.9999


def test_masks_are_returned_and_consistent(dataset):
    tumour, intracranial = dataset["tumour_masks"], dataset["intracranial_masks"]
    assert tumour.dtype == bool and intracranial.dtype == bool
    assert tumour.shape == intracranial.shape == dataset["images"].shape
    assert tumour.any(axis=(1, 2)).all()  # every slice shows its tumour
    assert not (tumour & ~intracranial).any()  # tumours are inside the skull
    tumour_fraction = tumour.mean(axis=(1, 2))
    assert tumour_fraction.max() < 0.25  # lesions, not whole-brain blobs


def test_masks_absent_by_default():
    assert "tumour_masks" not in generate_slices(n_patients=2, size=16)


def _distance_to_midline(intracranial):
    """Pixel distance to the head's midline: the long principal axis of the skull cavity."""
    rows, cols = np.nonzero(intracranial)
    centre = np.array([rows.mean(), cols.mean()])
    covariance = np.cov(np.stack([rows, cols]))
    long_axis = np.linalg.eigh(covariance)[1][:, -1]
    normal = np.array([-long_axis[1], long_axis[0]])
    grid = np.stack(np.mgrid[: intracranial.shape[0], : intracranial.shape[1]], axis=-1)
    return np.abs((grid - centre) @ normal)


def test_meningioma_is_dural_based_and_glioma_is_intra_axial(dataset):
    """Meningiomas sit on the dura (inner table of the skull, or the falx on the
    midline); gliomas grow inside the brain, away from the skull."""
    labels, tumour, intracranial = (
        dataset["labels"], dataset["tumour_masks"], dataset["intracranial_masks"]
    )
    touches_skull = np.array([
        (ndimage.binary_dilation(t, iterations=2) & ~inside).any()
        for t, inside in zip(tumour, intracranial)
    ])
    touches_falx = np.array([
        _distance_to_midline(inside)[t].min() < 1.5 for t, inside in zip(tumour, intracranial)
    ])
    meningioma, glioma = labels == MENINGIOMA, labels == GLIOMA
    assert (touches_skull | touches_falx)[meningioma].mean() > 0.9
    assert touches_skull[meningioma].mean() > 0.45  # convexity ones are the majority
    assert touches_skull[glioma].mean() < 0.05
    assert touches_skull[labels == PITUITARY].mean() < 0.05


def test_pituitary_mass_is_on_the_midline_below_the_centre(dataset):
    labels, tumour, intracranial = (
        dataset["labels"], dataset["tumour_masks"], dataset["intracranial_masks"]
    )
    size = tumour.shape[-1]
    offsets, below = [], []
    for t, inside in zip(tumour, intracranial):
        tumour_row, tumour_col = _centroid(t)
        brain_row, brain_col = _centroid(inside)
        offsets.append(abs(tumour_col - brain_col) / size)
        below.append(tumour_row > brain_row)
    offsets, below = np.array(offsets), np.array(below)
    pituitary = labels == PITUITARY
    assert np.quantile(offsets[pituitary], 0.9) < 0.04
    assert below[pituitary].all()
    # Gliomas sit in one hemisphere: clearly off the midline.
    assert np.median(offsets[labels == GLIOMA]) > 3 * np.median(offsets[pituitary])


def test_enhancement_patterns_match_the_radiology(dataset):
    """Meningioma/pituitary enhance brightly and homogeneously; gliomas are
    heterogeneous (ring around necrosis) and surrounded by hypointense oedema."""
    images, labels = dataset["images"], dataset["labels"]
    tumour, intracranial = dataset["tumour_masks"], dataset["intracranial_masks"]
    brightness, heterogeneity, surround = [], [], []
    for image, t, inside in zip(images, tumour, intracranial):
        brain_level = np.median(image[inside & ~t])
        values = image[t]
        brightness.append(values.mean() / brain_level)
        heterogeneity.append(values.std() / values.mean())
        band = (
            ndimage.binary_dilation(t, iterations=5)
            & ~ndimage.binary_dilation(t, iterations=1)
            & inside
        )
        surround.append(image[band].mean() / brain_level)
    brightness, heterogeneity, surround = map(np.array, (brightness, heterogeneity, surround))

    for name in (MENINGIOMA, PITUITARY):
        assert np.median(brightness[labels == name]) > 1.25
    assert np.median(brightness[labels == GLIOMA]) < np.median(brightness[labels == MENINGIOMA])
    glioma_heterogeneity = np.median(heterogeneity[labels == GLIOMA])
    assert glioma_heterogeneity > 2 * np.median(heterogeneity[labels == MENINGIOMA])
    glioma_surround = np.median(surround[labels == GLIOMA])
    assert glioma_surround < 0.92
    assert glioma_surround < np.median(surround[labels != GLIOMA]) - 0.05


def test_some_tumours_are_low_contrast():
    """Subtle cases keep the task from being trivially solvable."""
    data = generate_slices(n_patients=60, size=48, seed=4, return_masks=True)
    ratios = []
    for image, label, t, inside in zip(
        data["images"], data["labels"], data["tumour_masks"], data["intracranial_masks"]
    ):
        if label != GLIOMA:
            ratios.append(image[t].mean() / np.median(image[inside & ~t]))
    ratios = np.array(ratios)
    assert (ratios < 1.3).any()
    assert (ratios > 1.3).mean() > 0.6


@pytest.mark.parametrize("size", [16, 17, 512])
def test_extreme_sizes_work(size):
    data = generate_slices(n_patients=1, size=size, seed=0, slices_per_patient=(1, 2))
    images = data["images"]
    assert images.shape[1:] == (size, size)
    assert np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0


def test_small_data_set_is_fast():
    generate_slices(n_patients=2, size=32)  # warm caches
    start = time.perf_counter()
    generate_slices(n_patients=20, size=32)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_patients": 0}, "n_patients"),
        ({"n_patients": -3}, "n_patients"),
        ({"n_patients": 2.5}, "n_patients"),
        ({"size": 15}, "size"),
        ({"size": 64.0}, "size"),
        ({"seed": -1}, "seed"),
        ({"seed": "0"}, "seed"),
        ({"slices_per_patient": (0, 2)}, "slices_per_patient"),
        ({"slices_per_patient": (3, 2)}, "slices_per_patient"),
        ({"slices_per_patient": (2,)}, "slices_per_patient"),
        ({"slices_per_patient": 2}, "slices_per_patient"),
        ({"slices_per_patient": "14"}, "slices_per_patient"),
        ({"slices_per_patient": (1.5, 3)}, "slices_per_patient"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_slices(**kwargs)


def test_tumour_free_heads_have_no_lesion_and_leave_the_default_unchanged():
    default = generate_slices(n_patients=6, size=48, seed=5, return_masks=True)
    again = generate_slices(n_patients=6, size=48, seed=5, return_masks=True, tumour_free=False)
    np.testing.assert_array_equal(default["images"], again["images"])
    free = generate_slices(n_patients=6, size=48, seed=5, return_masks=True, tumour_free=True)
    assert default["tumour_masks"].any() and not free["tumour_masks"].any()
    assert free["images"].shape == default["images"].shape and np.isfinite(free["images"]).all()
    np.testing.assert_array_equal(free["intracranial_masks"], default["intracranial_masks"])  # same head, no mass
    inside = default["tumour_masks"]
    assert np.abs(free["images"][inside] - default["images"][inside]).mean() > 0.05  # the lesion is gone
