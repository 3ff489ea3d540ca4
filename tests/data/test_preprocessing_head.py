"""Tests for the head-based preprocessing (robustmri.data.preprocessing: head_mask, crop_to_head,
standardise_in_head, preprocess_head, the landmark standardisation and the registry by name).

The synthetic head is an ellipse placed off-centre in a non-square slice, so framing and
aspect ratio are known exactly; one real figshare slice checks the mask where the data exist.
"""

import csv

import numpy as np
import pytest

from robustmri.data.preprocessing import (
    HEAD_CROP_MARGIN,
    HEAD_LANDMARKS_NORMALISATION,
    HEAD_MASK_CLOSING,
    HEAD_MASK_WORKING_SIZE,
    HEAD_NORMALISATION,
    HEAD_PERCENTILES,
    HEAD_THRESHOLD_FRACTION,
    INTENSITY_NORMALISATION,
    LANDMARK_PERCENTILES,
    LANDMARK_SCALE,
    PREPROCESSING,
    check_preprocess,
    crop_to_head,
    head_mask,
    preprocess_head,
    preprocess_head_landmarks,
    preprocess_minmax,
    preprocessing_by_name,
    scale_intensity,
    standardise_in_head,
    standardise_landmarks_in_head,
)
from robustmri.data.readers import read_image

from helpers import axes_ratio, ellipse_head


def iou(a, b) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_head_mask_recovers_an_off_centre_ellipse():
    image, truth = ellipse_head()
    mask = head_mask(image)
    assert mask.dtype == bool and mask.shape == image.shape
    assert iou(mask, truth) > 0.9
    # The dark "ventricle" inside is filled, the noisy background is not taken.
    assert mask[55, 125] and not truth[5:15, 5:15].any() and not mask[5:15, 5:15].any()


def test_head_mask_keeps_the_largest_component_only():
    image, truth = ellipse_head()
    image[100:110, 10:20] = 250.0  # a bright marker away from the head
    mask = head_mask(image)
    assert not mask[100:110, 10:20].any()
    assert iou(mask, truth) > 0.9


def ellipse_radius(shape, centre, axes):
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    return np.hypot((rows - centre[0]) / axes[0], (cols - centre[1]) / axes[1])


def test_head_mask_takes_the_scalp_beyond_a_dark_skull():
    # A wide dark "skull" ring between a thin scalp and the brain: the head is the whole ellipse,
    # not the brain inside the skull (the largest single bright region).
    image, truth = ellipse_head()
    radius = ellipse_radius(image.shape, (55.0, 125.0), (40.0, 28.0))
    image[(radius > 0.6) & (radius <= 0.9)] = 5.0
    assert iou(head_mask(image), truth) > 0.9


def test_head_mask_fills_a_head_cut_by_the_field_of_view():
    # The head leaves the slice at the top, and its inside is as dark as the background:
    # only the bright rim is above the threshold, the inside is filled up to the image edge.
    shape, centre, axes = (100, 160), (20.0, 80.0), (45.0, 40.0)
    radius = ellipse_radius(shape, centre, axes)
    truth = radius <= 1.0
    image = np.where((radius > 0.85) & truth, 200.0, 5.0) + np.random.default_rng(0).normal(0.0, 2.0, shape)
    mask = head_mask(image)
    assert iou(mask, truth) > 0.9
    assert mask[0, 80] and mask[20, 80]
    assert not mask[0, 5] and not mask[0, -5]  # the corners beyond the head stay background


def test_head_mask_follows_a_linear_intensity_change():
    image, _ = ellipse_head()
    np.testing.assert_array_equal(head_mask(image), head_mask(3.5 * image - 40.0))


@pytest.mark.parametrize("image, message", [
    (np.full((32, 48), 7.0), "constant image"),
    (np.zeros((0, 0)), "empty"),
    (np.zeros(16), "2-D"),
])
def test_head_mask_refuses_images_without_a_head(image, message):
    with pytest.raises(ValueError, match=message):
        head_mask(image)


def test_head_mask_refuses_a_tiny_foreground():
    image = np.zeros((100, 100), np.float32)
    image[40:45, 40:45] = 100.0  # 0.25 % of the image
    with pytest.raises(ValueError, match="no head found"):
        head_mask(image)


def test_head_mask_refuses_nan():
    image, _ = ellipse_head()
    image[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        head_mask(image)


def test_crop_to_head_is_a_centred_square_that_keeps_the_aspect_ratio():
    image, truth = ellipse_head()
    cropped = crop_to_head(image)
    assert cropped.ndim == 2 and cropped.shape[0] == cropped.shape[1] and cropped.dtype == image.dtype
    # The ellipse's box is 81 rows high: the side is the longer side plus 5 % on both sides.
    longer = 81
    assert crop_to_head(image, truth).shape[0] == longer + 2 * round(HEAD_CROP_MARGIN * longer)
    assert abs(cropped.shape[0] - crop_to_head(image, truth).shape[0]) <= 2
    inside = head_mask(cropped)
    assert abs(axes_ratio(inside) / axes_ratio(truth) - 1) < 0.05
    rows, cols = np.nonzero(inside)
    centre = (cropped.shape[0] - 1) / 2
    assert abs(rows.mean() - centre) < 1.5 and abs(cols.mean() - centre) < 1.5
    # The same mask passed explicitly gives the same crop; margin 0 is the box itself.
    np.testing.assert_array_equal(crop_to_head(image, head_mask(image)), cropped)
    assert crop_to_head(image, truth, margin=0.0).shape == (longer, longer)


def test_crop_to_head_pads_with_the_background_beyond_the_image():
    image, truth = ellipse_head(centre=(42.0, 125.0))  # the head's top row is 2: the square reaches above the slice
    cropped = crop_to_head(image, truth, margin=0.1)
    side = cropped.shape[0]
    assert side == 81 + 2 * 8
    top = 2 - 8  # box top minus the margin (the box is the square's height)
    assert np.all(cropped[: -top] == image.min())
    np.testing.assert_array_equal(cropped[-top:], image[: side + top, 125 - side // 2: 125 - side // 2 + side])


def test_crop_to_head_checks_the_mask():
    image, truth = ellipse_head()
    with pytest.raises(ValueError, match="shape"):
        crop_to_head(image, truth[:-1])
    with pytest.raises(ValueError, match="empty"):
        crop_to_head(image, np.zeros_like(truth))
    with pytest.raises(ValueError, match="margin"):
        crop_to_head(image, truth, margin=-0.1)


def test_standardise_in_head_uses_the_head_percentiles():
    image, truth = ellipse_head()
    out = standardise_in_head(image, truth)
    assert out.dtype == np.float32 and out.shape == image.shape
    assert out.min() == 0.0 and out.max() == 1.0
    head = out[truth]
    assert 0.005 < np.mean(head == 0.0) < 0.02 and 0.005 < np.mean(head == 1.0) < 0.02
    assert np.all(out[~truth] == 0.0)  # the background is darker than the head's 1st percentile


def test_standardise_in_head_is_invariant_to_a_linear_intensity_change():
    image, truth = ellipse_head()
    np.testing.assert_allclose(standardise_in_head(2.7 * image + 300.0, truth), standardise_in_head(image, truth),
                               atol=1e-5)


def test_standardise_in_head_ignores_a_bright_spot_outside_the_head():
    image, truth = ellipse_head()
    spotted = image.copy()
    spotted[110:115, 5:10] = 5000.0
    np.testing.assert_allclose(standardise_in_head(spotted, truth)[truth], standardise_in_head(image, truth)[truth])
    # Min-max scaling is not: every head pixel is squeezed towards 0.
    assert scale_intensity(spotted)[truth].mean() < 0.2 * scale_intensity(image)[truth].mean()


def test_standardise_in_head_is_nearly_invariant_to_background_padding():
    image, truth = ellipse_head()
    rng = np.random.default_rng(1)
    pad = 60
    padded = np.pad(image, pad, constant_values=0.0)
    border = np.pad(np.zeros(image.shape, bool), pad, constant_values=True)
    padded[border] = np.clip(5.0 + rng.normal(0.0, 2.0, int(border.sum())), 0, None)  # the same noisy background
    # With the mask found again on the padded slice, the head is scaled (nearly) as before.
    out = standardise_in_head(padded, head_mask(padded))[pad:-pad, pad:-pad]
    reference = standardise_in_head(image, head_mask(image))
    assert np.abs(out - reference)[truth].max() < 0.02


def test_standardise_in_head_refuses_bad_arguments():
    image, truth = ellipse_head()
    with pytest.raises(ValueError, match="percentiles"):
        standardise_in_head(image, truth, low=99.0, high=1.0)
    with pytest.raises(ValueError, match="no contrast inside the head"):
        standardise_in_head(np.where(truth, 50.0, 0.0), truth)


def test_preprocess_head_keeps_the_aspect_ratio_that_preprocess_distorts():
    image, truth = ellipse_head()
    out = preprocess_head(image, 64)
    assert out.shape == (64, 64) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0 and np.isfinite(out).all()
    assert abs(axes_ratio(head_mask(out)) / axes_ratio(truth) - 1) < 0.05
    # The plain square resize of a 120 x 200 slice stretches the head (by 200 / 120, less the edge's blur).
    assert axes_ratio(head_mask(preprocess_minmax(image, 64))) / axes_ratio(truth) > 1.4


def test_preprocess_head_is_invariant_to_a_linear_intensity_change():
    image, _ = ellipse_head()
    np.testing.assert_allclose(preprocess_head(0.5 * image + 1000.0, 48), preprocess_head(image, 48), atol=1e-4)


def test_landmark_standardisation_is_the_piecewise_linear_map_by_hand():
    # head pixels 0..1000: the p-th percentile is 10 p, so the landmarks are 10, 100, 200, ..., 900, 990
    image = np.arange(1001, dtype=np.float64).reshape(7, 143)
    out = standardise_landmarks_in_head(image, np.ones(image.shape, dtype=bool))
    assert out.dtype == np.float32
    expected = {0: 0.0, 10: 0.0, 55: 0.05, 100: 0.1, 150: 0.15, 500: 0.5, 945: 0.95, 990: 1.0, 1000: 1.0}
    for value, mapped in expected.items():  # between 10 and 100: 0 + (v - 10) / 90 x 0.1; 900 to 990 alike
        assert out.reshape(-1)[value] == pytest.approx(mapped, abs=1e-6), value
    assert LANDMARK_PERCENTILES[0] == 1.0 and LANDMARK_PERCENTILES[-1] == 99.0
    assert LANDMARK_SCALE == pytest.approx(np.linspace(0, 1, 11))


def test_landmark_standardisation_undoes_a_contrast_curve_that_two_percentiles_do_not():
    image, mask = ellipse_head()
    curved = 255.0 * (image / 255.0) ** 2.0  # another site's contrast curve: a gamma of 2
    landmarks = np.abs(standardise_landmarks_in_head(curved, mask) - standardise_landmarks_in_head(image, mask))[mask]
    two_point = np.abs(standardise_in_head(curved, mask) - standardise_in_head(image, mask))[mask]
    assert landmarks.mean() < 0.25 * two_point.mean()
    assert landmarks.mean() < 0.02


def test_landmark_standardisation_handles_ties_and_refuses_bad_arguments():
    image = np.zeros((20, 20))
    image[:, 12:] = np.linspace(1.0, 2.0, 8)  # 60 % of the head at one value: six landmarks tie at 0
    out = standardise_landmarks_in_head(image, np.ones(image.shape, dtype=bool))
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0
    assert np.all(np.diff(out[0]) >= 0)  # the order of intensities is kept
    mask = np.ones((4, 4), dtype=bool)
    with pytest.raises(ValueError, match="no contrast inside the head"):
        standardise_landmarks_in_head(np.full((4, 4), 3.0), mask)
    with pytest.raises(ValueError, match="strictly increasing"):
        standardise_landmarks_in_head(np.arange(16.0).reshape(4, 4), mask, (1, 50, 40), (0, 0.5, 1))
    with pytest.raises(ValueError, match="same length"):
        standardise_landmarks_in_head(np.arange(16.0).reshape(4, 4), mask, (1, 99), (0, 0.5, 1))


def test_preprocess_head_landmarks_frames_like_head_and_is_invariant_to_a_monotone_curve():
    image, truth = ellipse_head()
    out = preprocess_head_landmarks(image, 64)
    assert out.shape == (64, 64) and out.dtype == np.float32 and out.min() >= 0.0 and out.max() <= 1.0
    # the same crop: both map the head's pixels above its 1st percentile, and only those, above 0
    np.testing.assert_array_equal(out > 1e-6, preprocess_head(image, 64) > 1e-6)
    np.testing.assert_allclose(preprocess_head_landmarks(0.5 * image + 1000.0, 48), preprocess_head_landmarks(image, 48),
                               atol=1e-4)
    check_preprocess("head_landmarks", HEAD_LANDMARKS_NORMALISATION)
    assert "percentiles 1, 10, 20, ..., 90, 99 mapped piecewise-linearly" in HEAD_LANDMARKS_NORMALISATION


def test_registry_by_name():
    assert PREPROCESSING == {"minmax": preprocess_minmax, "head": preprocess_head,
                             "head_landmarks": preprocess_head_landmarks}
    assert preprocessing_by_name("head") is preprocess_head
    assert preprocessing_by_name("minmax") is preprocess_minmax
    with pytest.raises(ValueError, match=r"'square'.*valid names: head, head_landmarks, minmax"):
        preprocessing_by_name("square")


def test_head_normalisation_describes_the_constants():
    assert HEAD_NORMALISATION != INTENSITY_NORMALISATION
    assert f"{100 * HEAD_CROP_MARGIN:g} % of its longer side" in HEAD_NORMALISATION
    assert f"at most {HEAD_MASK_WORKING_SIZE} px" in HEAD_NORMALISATION
    assert f"radius {100 * HEAD_MASK_CLOSING:g} %" in HEAD_NORMALISATION
    assert HEAD_THRESHOLD_FRACTION == 0.5 and "half-way from the minimum to Otsu's threshold" in HEAD_NORMALISATION
    assert HEAD_PERCENTILES == (1.0, 99.0) and "1st-99th percentile" in HEAD_NORMALISATION


def test_head_mask_on_a_real_slice(figshare_dir):
    row = next(csv.DictReader(open(figshare_dir / "labels.csv")))
    image = read_image(figshare_dir / row["file"])
    mask = head_mask(image)
    height, width = image.shape
    assert 0.1 < mask.mean() < 0.95
    # The tumour lies in the head, and nearly no bright pixel is left outside the mask.
    assert mask[int(float(row["box_y_center"]) * height), int(float(row["box_x_center"]) * width)]
    bright = image > image.min() + 0.1 * (image.max() - image.min())
    assert (bright & ~mask).sum() < 0.02 * bright.sum()
    out = preprocess_head(image, 64)
    assert out.shape == (64, 64) and 0.0 <= out.min() and out.max() <= 1.0
