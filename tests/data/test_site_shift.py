"""Tests for the site shifts (robustmri.data.site_shift): each re-rendering of a raw slice does
what its name says, deterministically, and the head-based preprocessing undoes the framing
shifts that min-max scaling with a square resize does not."""

import csv

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from robustmri.data.preprocessing import head_box, head_mask, preprocess_head, preprocess_minmax
from robustmri.data.readers import read_image
from robustmri.data.site_shift import SHIFTS, render_shift, shift_by_name, shift_examples_figure
from robustmri.data.synthetic import generate_slices

from helpers import axes_ratio, ellipse_head

REQUIRED = ("none", "fov_tight", "fov_loose", "non_square_wide", "non_square_tall", "gamma_0.7", "gamma_1.5",
            "contrast_low", "bias_field", "blur", "downsample_2x", "rotate_10", "tight_gamma_0.7",
            "tight_nonsquare_gamma_0.7_blur")
#: The shifts that draw from the generator (the others are fixed re-renderings).
RANDOM = ("fov_tight", "fov_loose", "non_square_wide", "non_square_tall", "bias_field", "tight_gamma_0.7",
          "tight_nonsquare_gamma_0.7_blur")
FRAMING = ("fov_tight", "fov_loose", "non_square_wide", "non_square_tall")
INTENSITY = ("gamma_0.7", "gamma_1.5", "contrast_low", "bias_field", "blur", "downsample_2x")


@pytest.fixture(scope="module")
def ellipse():
    return ellipse_head()[0]


@pytest.fixture(scope="module")
def synthetic():
    """A slice of the embedded set in raw-like units (it is generated in [0, 1])."""
    return generate_slices(n_patients=1, size=128, seed=0)["images"][0] * 300.0 + 20.0


@pytest.fixture
def real(figshare_dir):
    row = next(csv.DictReader(open(figshare_dir / "labels.csv")))
    return read_image(figshare_dir / row["file"])


def unit(image):
    image = np.asarray(image, np.float64)
    return (image - image.min()) / (image.max() - image.min())


def iou(a, b) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_registry_holds_the_named_shifts():
    assert set(REQUIRED) <= set(SHIFTS)
    assert all(shift_by_name(name) is SHIFTS[name] for name in SHIFTS)


def test_unknown_names_and_constant_images_are_refused(ellipse):
    with pytest.raises(ValueError, match=r"'fov_wide'.*valid names: none, fov_tight, fov_loose"):
        render_shift(ellipse, "fov_wide")
    with pytest.raises(ValueError, match="constant image"):
        render_shift(np.full((32, 32), 3.0), "gamma_0.7")


@pytest.mark.parametrize("name", REQUIRED)
def test_every_shift_is_a_finite_2d_float_slice_and_deterministic(name, ellipse, synthetic):
    for image in (ellipse, synthetic):
        before = image.copy()
        out = render_shift(image, name, seed=3)
        assert out.ndim == 2 and out.dtype == np.float32 and min(out.shape) >= 16
        assert np.isfinite(out).all()
        np.testing.assert_array_equal(render_shift(image, name, seed=3), out)
        np.testing.assert_array_equal(image, before)  # the input is left alone


@pytest.mark.parametrize("name", RANDOM)
def test_random_shifts_follow_the_seed(name, synthetic):
    outs = [render_shift(synthetic, name, seed) for seed in range(5)]
    assert any(out.shape != outs[0].shape or not np.array_equal(out, outs[0]) for out in outs[1:])


def test_none_is_the_identity(ellipse):
    out = render_shift(ellipse, "none", seed=0)
    np.testing.assert_array_equal(out, ellipse)
    assert out is not ellipse


def test_fov_tight_is_a_square_just_around_the_head(synthetic):
    out = render_shift(synthetic, "fov_tight", seed=0)
    assert out.shape[0] == out.shape[1] < synthetic.shape[0]
    top, left, height, width = head_box(head_mask(out))
    side = out.shape[0]
    assert max(height, width) >= 0.9 * side  # the head spans the crop on its longer axis
    assert head_mask(out).mean() > head_mask(synthetic).mean()


def test_fov_loose_adds_background_around_the_whole_slice(synthetic):
    out = render_shift(synthetic, "fov_loose", seed=0)
    growth = np.array(out.shape) / np.array(synthetic.shape)
    assert np.all((growth >= 1.39) & (growth <= 1.61))
    # Only background is added: the intensities above the minimum are the slice's own.
    assert out.min() == synthetic.min()
    np.testing.assert_allclose((out - out.min()).sum(), (synthetic - synthetic.min()).sum(), rtol=1e-5)
    head_area = head_mask(out).sum()
    assert abs(head_area / head_mask(synthetic).sum() - 1) < 0.05


@pytest.mark.parametrize("name, axis", [("non_square_wide", 1), ("non_square_tall", 0)])
def test_non_square_crops_are_tight_and_longer_on_one_axis(name, axis, ellipse, synthetic):
    for image in (ellipse, synthetic):
        out = render_shift(image, name, seed=0)
        ratio = out.shape[axis] / out.shape[1 - axis]
        assert 1.2 <= ratio <= 1.6
        box = head_box(head_mask(out))
        assert box[3 - axis] >= 0.9 * out.shape[1 - axis]  # tight across the short side


@pytest.mark.parametrize("value", [0.7, 1.5])
def test_gamma_is_the_curve_on_the_min_max_scaled_slice(value, synthetic):
    out = render_shift(synthetic, f"gamma_{value:g}", seed=0)
    assert out.shape == synthetic.shape
    assert np.isclose(out.min(), synthetic.min()) and np.isclose(out.max(), synthetic.max(), rtol=1e-5)
    np.testing.assert_allclose(unit(out), unit(synthetic) ** value, atol=1e-5)
    brighter = unit(out).mean() > unit(synthetic).mean()
    assert brighter == (value < 1)


def test_contrast_low_halves_the_range_and_both_preprocessings_undo_it(synthetic):
    out = render_shift(synthetic, "contrast_low", seed=0)
    assert np.isclose(np.ptp(out), 0.5 * np.ptp(synthetic), rtol=1e-4)
    np.testing.assert_allclose(preprocess_minmax(out, 64), preprocess_minmax(synthetic, 64), atol=1e-4)
    np.testing.assert_allclose(preprocess_head(out, 64), preprocess_head(synthetic, 64), atol=1e-4)


def test_bias_field_is_a_smooth_multiplicative_field_of_20_percent(synthetic):
    out = render_shift(synthetic, "bias_field", seed=0)
    low = synthetic.min()
    signal = (synthetic - low > 0.1 * np.ptp(synthetic)) & head_mask(synthetic)
    field = (out - low)[signal] / (synthetic - low)[signal]
    assert field.min() >= 0.8 - 1e-4 and field.max() <= 1.2 + 1e-4
    assert np.abs(field - 1).max() > 0.15
    # Smooth: neighbouring pixels see nearly the same gain.
    full = np.ones_like(synthetic)
    full[signal] = field
    both = signal[:, 1:] & signal[:, :-1]
    assert np.abs(np.diff(full, axis=1))[both].max() < 0.02


def test_blur_removes_fine_detail(synthetic):
    out = render_shift(synthetic, "blur", seed=0)
    assert np.abs(ndimage.laplace(out)).mean() < 0.5 * np.abs(ndimage.laplace(synthetic)).mean()
    assert abs(out.mean() / synthetic.mean() - 1) < 0.01


def test_downsample_2x_loses_the_finest_pattern_and_keeps_smooth_ones():
    rows, cols = np.mgrid[:64, :96]
    checker = 100.0 + 50.0 * ((rows + cols) % 2)
    out = render_shift(checker, "downsample_2x", seed=0)
    assert out.shape == checker.shape and out.std() < 0.2 * checker.std()
    ramp = (10.0 + rows + 2.0 * cols).astype(np.float32)
    assert np.abs(render_shift(ramp, "downsample_2x", seed=0) - ramp)[4:-4, 4:-4].max() < 1.0


def test_rotate_10_turns_the_head_by_10_degrees_at_the_same_scale(ellipse):
    out = render_shift(ellipse, "rotate_10", seed=0)
    assert out.shape == ellipse.shape
    before, after = head_mask(ellipse), head_mask(out)
    rows, cols = np.nonzero(after)
    rows, cols = rows - rows.mean(), cols - cols.mean()
    # Orientation of the long axis (vertical before the rotation) from the second moments.
    angle = np.degrees(0.5 * np.arctan2(2 * (rows * cols).mean(), (cols**2).mean() - (rows**2).mean()))
    assert abs(abs(angle) - 90 + 10) < 2.0
    assert abs(after.sum() / before.sum() - 1) < 0.03


def test_combinations_are_their_parts_in_order(synthetic):
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        expected = SHIFTS["gamma_0.7"](SHIFTS["fov_tight"](synthetic, rng), rng)
        np.testing.assert_array_equal(render_shift(synthetic, "tight_gamma_0.7", seed), expected)
        rng = np.random.default_rng(seed)
        expected = SHIFTS["blur"](SHIFTS["gamma_0.7"](SHIFTS["non_square_tall"](synthetic, rng), rng), rng)
        np.testing.assert_array_equal(render_shift(synthetic, "tight_nonsquare_gamma_0.7_blur", seed), expected)
    out = render_shift(synthetic, "tight_gamma_0.7", 0)
    assert out.shape[0] == out.shape[1] and unit(out).mean() > unit(render_shift(synthetic, "fov_tight", 0)).mean()


def distances(image, name, seed, size=64):
    """Mean absolute change of the network input under a shift: (head preprocessing, min-max preprocessing)."""
    shifted = render_shift(image, name, seed)
    head = np.abs(preprocess_head(shifted, size) - preprocess_head(image, size)).mean()
    minmax = np.abs(preprocess_minmax(shifted, size) - preprocess_minmax(image, size)).mean()
    return head, minmax


@pytest.mark.parametrize("name", FRAMING)
def test_head_preprocessing_undoes_the_framing_shifts(name, ellipse, synthetic):
    for image in (ellipse, synthetic):
        for seed in (0, 1):
            head, minmax = distances(image, name, seed)
            assert head < 0.03 and head < 0.5 * minmax, (name, seed, head, minmax)


@pytest.mark.parametrize("name", FRAMING)
def test_head_preprocessing_undoes_the_framing_shifts_on_a_real_slice(name, real):
    head, minmax = distances(real, name, seed=0)
    assert head < 0.03 and head < 0.5 * minmax, (name, head, minmax)


def test_head_mask_is_stable_under_intensity_shifts(synthetic, ellipse):
    for image in (ellipse, synthetic):
        mask = head_mask(image)
        for name in INTENSITY:
            assert iou(head_mask(render_shift(image, name, 0)), mask) > 0.9, name


def test_head_mask_is_stable_under_intensity_shifts_on_a_real_slice(real):
    mask = head_mask(real)
    for name in INTENSITY:
        assert iou(head_mask(render_shift(real, name, 0)), mask) > 0.9, name


def test_head_preprocessing_keeps_the_head_shape_of_a_non_square_site(ellipse):
    # A tight, tall crop resized to a square squashes the head with min-max preprocessing only.
    shifted = render_shift(ellipse, "non_square_tall", seed=0)
    reference = axes_ratio(head_mask(preprocess_head(ellipse, 64)))
    assert abs(axes_ratio(head_mask(preprocess_head(shifted, 64))) / reference - 1) < 0.05
    assert abs(axes_ratio(head_mask(preprocess_minmax(shifted, 64))) / reference - 1) > 0.15


@pytest.mark.slow
def test_shift_examples_figure(tmp_path, ellipse):
    path = shift_examples_figure(ellipse, tmp_path / "figures" / "shifts.png")
    assert path == tmp_path / "figures" / "shifts.png"
    assert path.stat().st_size > 10_000
    with Image.open(path) as png:
        assert png.format == "PNG" and png.width > png.height > 300
