"""Tests for the honest bench's shifts (robustmri.data.shift_families): each shift's physics against an
independent computation, determinism, and the family / severity tags held to the augmentation's ranges."""

import dataclasses
import math

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from robustmri.data.augmentation import FAMILIES, SiteShiftAugmentation
from robustmri.data.preprocessing import preprocess_minmax, resize
from robustmri.data.shift_families import (
    IN_RANGE,
    MOTION_TRANSLATION,
    NEW_FAMILIES,
    NEW_FAMILY,
    OUT_OF_RANGE,
    REFERENCE,
    SEVERITIES,
    TISSUE_BANDS,
    downsample_at,
    family_examples_figure,
    family_shifts,
    frame_crop,
    frame_pad,
    gibbs_ringing,
    motion,
    motion_kspace,
    render_family_shift,
    rician,
    severity_under,
    tissue_contrast,
    tissue_curve,
    training_geometry,
)
from robustmri.data.site_shift import bias, bias_field, rotate, rotate_10
from robustmri.data.synthetic import generate_slices

from helpers import ellipse_head

SIZE = 32


@pytest.fixture(scope="module")
def synthetic():
    """A slice of the embedded set in raw-like units, at four times the training size."""
    return (generate_slices(n_patients=1, size=4 * SIZE, seed=0)["images"][0] * 300.0 + 20.0).astype(np.float32)


@pytest.fixture(scope="module")
def ellipse():
    return ellipse_head()[0]


def _shifts():
    return family_shifts(SIZE)


# ---------------------------------------------------------------------- every shift


@pytest.mark.parametrize("name", list(family_shifts(SIZE)))
def test_every_shift_is_finite_2d_float32_and_deterministic_for_a_seed(name, synthetic, ellipse):
    for image in (synthetic, ellipse):
        out = render_family_shift(image, name, SIZE, [7, 1])
        assert out.dtype == np.float32 and out.ndim == 2 and np.isfinite(out).all()
        assert np.array_equal(out, render_family_shift(image, name, SIZE, [7, 1]))
        assert np.array_equal(image, ellipse) or np.array_equal(image, synthetic)  # the input is untouched


def test_shifts_that_draw_change_with_the_seed(synthetic):
    drawing = ("frame_pad_wide", "fov_loose", "skull_cut", "bias_field", "bias_0.4", "motion", "tissue_contrast",
               "rician_0.05", "rician_0.2")
    for name in drawing:
        assert not np.array_equal(render_family_shift(synthetic, name, SIZE, 1),
                                  render_family_shift(synthetic, name, SIZE, 2)), name


def test_unknown_names_and_constant_images_are_refused(synthetic):
    with pytest.raises(ValueError, match="unknown shift 'gamma_9'; valid names: none, frame_pad_0.1"):
        render_family_shift(synthetic, "gamma_9", SIZE, 0)
    for name in family_shifts(SIZE):
        with pytest.raises(ValueError, match="constant image"):
            render_family_shift(np.full((40, 40), 3.0), name, SIZE, 0)


def test_the_streams_are_distinct_and_do_not_depend_on_the_order():
    streams = [shift.stream for shift in _shifts().values()]
    assert len(set(streams)) == len(streams)
    assert _shifts()["motion"].stream == family_shifts(64)["motion"].stream


# ---------------------------------------------------------------------- tags


def test_the_tags_agree_with_the_augmentations_ranges():
    """Widening (or narrowing) a range of SiteShiftAugmentation's defaults without re-tagging fails here."""
    shifts = {name: shift for name, shift in _shifts().items() if name != REFERENCE}
    for shift in shifts.values():
        assert shift.severity == severity_under(shift), shift.name
        assert shift.family in FAMILIES or shift.family in NEW_FAMILIES
        assert (shift.severity == NEW_FAMILY) == (shift.family in NEW_FAMILIES)
    # every family the augmentation has is tested inside and beyond its range, and every severity is present
    for family in FAMILIES:
        assert {s.severity for s in shifts.values() if s.family == family} == {IN_RANGE, OUT_OF_RANGE}, family
    assert {s.severity for s in shifts.values()} == set(SEVERITIES)


def test_severity_follows_the_augmentation_it_is_judged_against():
    shifts = _shifts()
    wider = SiteShiftAugmentation(gamma=(0.45, 2.2), rotation_degrees=25.0, blur_sigma=(0.0, 2.5))
    for name in ("gamma_0.5", "gamma_2", "rotate_20", "blur_2px"):
        assert severity_under(shifts[name], wider) == IN_RANGE, name
    narrower = SiteShiftAugmentation(gamma=(0.8, 1.2), rotation_degrees=5.0)
    assert severity_under(shifts["gamma_0.7"], narrower) == OUT_OF_RANGE
    assert severity_under(shifts["rotate_10"], narrower) == OUT_OF_RANGE
    # a family the augmentation leaves out is a new family to a model trained without it
    assert severity_under(shifts["rotate_10"], SiteShiftAugmentation(exclude="rotation")) == NEW_FAMILY
    assert severity_under(shifts["tissue_contrast"]) == NEW_FAMILY
    straddling = dataclasses.replace(shifts["gamma_0.7"], measures={"gamma": (0.5, 0.9)})
    with pytest.raises(ValueError, match="across the edge"):
        severity_under(straddling)


def test_out_of_range_severities_are_the_issues_examples():
    measures = {name: shift.measures for name, shift in _shifts().items()}
    assert measures["gamma_0.5"] == {"gamma": (0.5, 0.5)} and measures["gamma_2"] == {"gamma": (2.0, 2.0)}
    assert measures["rotate_20"] == {"rotation_degrees": (20.0, 20.0)}
    assert measures["bias_0.4"] == {"bias_amplitude": (0.4, 0.4)}
    assert measures["blur_2px"] == {"blur_sigma": (2.0, 2.0)}


# ---------------------------------------------------------------------- framing on the frame


@pytest.mark.parametrize("name", ["frame_pad_0.1", "frame_crop_0.9", "fov_loose", "frame_pad_wide", "skull_cut"])
def test_framing_reads_the_frame_only(name, synthetic):
    """An increasing intensity map before the shift gives the same frame as after it: the rule never reads
    the intensities (and so not the head detector)."""
    curve = lambda image: np.sqrt(image.astype(np.float64) + 1.0).astype(np.float32)  # noqa: E731 (increasing)
    assert synthetic.min() > 0
    before = render_family_shift(curve(synthetic), name, SIZE, 5)
    after = render_family_shift(synthetic, name, SIZE, 5)
    assert before.shape == after.shape and np.allclose(before, curve(after), rtol=1e-6)


def test_crops_are_windows_of_the_slice_and_pads_keep_it_whole(synthetic):
    rng = np.random.default_rng(3)
    out = frame_crop(0.6)(synthetic, rng)
    side = round(0.6 * 128)
    assert out.shape == (side, side)
    hits = [(t, l) for t in range(128 - side + 1) for l in range(128 - side + 1)
            if np.array_equal(synthetic[t:t + side, l:l + side], out)]
    assert len(hits) == 1
    centred = frame_crop(0.9, centred=True)(synthetic, rng)
    offset = (128 - round(0.9 * 128)) // 2
    assert np.array_equal(centred, synthetic[offset:offset + centred.shape[0], offset:offset + centred.shape[1]])
    padded = frame_pad(0.0, 0.5)(synthetic, rng)
    assert padded.shape == (128, 192)
    starts = [c for c in range(65) if np.array_equal(padded[:, c:c + 128], synthetic)]
    assert len(starts) == 1 and np.all(np.delete(padded, np.s_[starts[0]:starts[0] + 128], axis=1) == synthetic.min())


def test_skull_cut_always_cuts_the_head():
    image, mask = ellipse_head(shape=(160, 160), centre=(80.0, 80.0), axes=(66.0, 56.0))
    marked = image + 1000.0 * mask  # the analytic head, recognisable in the window
    for seed in range(20):
        window = render_family_shift(marked, "skull_cut", SIZE, seed) >= 1000.0
        edge = np.concatenate([window[0], window[-1], window[:, 0], window[:, -1]])
        assert edge.any() and window.sum() < mask.sum()  # the head runs out of the window


# ---------------------------------------------------------------------- sizes at the training size


def test_blur_is_two_pixels_at_the_training_size(synthetic):
    """Prepared for the network, the blurred slice is closest to the prepared slice blurred by 2 px (min-max,
    whose resize is the same for both; the head preprocessing's training pixel is checked below)."""
    name, prepare = "minmax", preprocess_minmax
    prepared = prepare(synthetic, SIZE).astype(np.float64)
    rendered = prepare(render_family_shift(synthetic, "blur_2px", SIZE, 0, preprocess=name), SIZE).astype(np.float64)
    rendered = (rendered - rendered.min()) / (rendered.max() - rendered.min())
    errors = {}
    for sigma in (1.0, 1.5, 2.0, 2.5, 3.0):
        reference = ndimage.gaussian_filter(prepared, sigma, mode="nearest")
        reference = (reference - reference.min()) / (reference.max() - reference.min())
        errors[sigma] = float(np.abs(rendered - reference).mean())
    assert min(errors, key=errors.get) == 2.0, errors


def test_downsampling_at_the_training_size_removes_what_the_factor_says():
    """A grating of 4 training pixels per period survives a loss of 1.5 (its grid still resolves it) and
    not one of 3 (a grid of size / 3 pixels cannot)."""
    native = 4 * SIZE
    cols = np.arange(native)
    grating = (100.0 + 50.0 * np.sin(2 * np.pi * cols / (4 * native / SIZE)))[None].repeat(native, axis=0)
    # resized at a fixed scale (min-max would stretch an attenuated grating back up)
    amplitude = lambda image: np.abs(np.fft.rfft(resize((image - 50.0) / 100.0, SIZE).mean(axis=0)))[SIZE // 4]  # noqa
    rng = np.random.default_rng(0)
    reference = amplitude(grating)
    assert amplitude(downsample_at(1.5, SIZE, "minmax")(grating, rng)) > 0.3 * reference
    assert amplitude(downsample_at(3.0, SIZE, "minmax")(grating, rng)) < 0.15 * reference
    assert training_geometry(grating, SIZE, "minmax") == (4.0, 100.0)


def test_the_training_pixel_and_unit_are_the_preprocessings():
    """The head preprocessing's training pixel is its square window around the head over the size, and its unit the
    head's 1st-99th percentile span: checked against the analytic head of the synthetic ellipse."""
    image, mask = ellipse_head()
    pixel, unit = training_geometry(image, SIZE, "head")
    rows, cols = np.nonzero(mask)
    longer = max(np.ptp(rows), np.ptp(cols)) + 1
    assert pixel * SIZE == pytest.approx(longer * 1.1, rel=0.05)  # 5 % margin on each side
    low, high = np.percentile(image[mask], [1, 99])
    assert unit == pytest.approx(high - low, rel=0.1)  # the detected head is not exactly the analytic one
    assert training_geometry(image, SIZE, "minmax") == (200 / SIZE, float(image.max() - image.min()))
    with pytest.raises(ValueError, match="unknown preprocessing 'zscore'"):
        training_geometry(image, SIZE, "zscore")


# ---------------------------------------------------------------------- artefacts


def test_gibbs_ringing_keeps_exactly_the_band_of_k_space(synthetic):
    out = gibbs_ringing(SIZE, "minmax")(synthetic, np.random.default_rng(0)).astype(np.float64)
    kept = round(0.6 * SIZE) // 2  # 9 cycles per field of view
    k = np.abs(np.fft.fftfreq(128) * 128)
    band = (k[:, None] <= kept) & (k[None, :] <= kept)
    spectrum, original = np.fft.fft2(out), np.fft.fft2(synthetic.astype(np.float64))
    # outside the band: zero, up to the float32 rounding of the output
    assert np.abs(spectrum[~band]).max() < 1e-5 * np.abs(original).max()
    assert np.allclose(spectrum[band], original[band], rtol=0, atol=1e-4 * np.abs(original).max())
    # the ripples: undershoots below the background next to the sharp edges, which the original never has
    assert out.min() < synthetic.min() - 1.0


def test_motion_is_a_phase_error_on_the_lines_after_the_movement(synthetic):
    spectrum, corrupted, (dy, dx) = motion_kspace(synthetic, np.random.default_rng(4), SIZE, "minmax")
    clean = np.fft.fft2(synthetic.astype(np.float64) - synthetic.min())
    moved = np.fft.fft2(np.roll(synthetic.astype(np.float64) - synthetic.min(), (dy, dx), axis=(0, 1)))
    scale = np.abs(clean).max()
    assert np.allclose(spectrum[~corrupted], clean[~corrupted], atol=1e-9 * scale)  # untouched lines
    assert np.allclose(spectrum[corrupted], moved[corrupted], atol=1e-9 * scale)  # the shifted head's lines
    assert np.allclose(np.abs(spectrum), np.abs(clean), atol=1e-9 * scale)  # a phase error only
    # the lines after the onset, in sequential order from the lowest frequency: a contiguous run to the highest
    ky = np.fft.fftfreq(128) * 128
    assert 0.25 * 128 <= corrupted.sum() <= 0.45 * 128 and ky[corrupted].min() > 0
    assert set(ky[corrupted]) == set(np.arange(ky[corrupted].min(), 64))
    assert math.hypot(dy, dx) == pytest.approx(MOTION_TRANSLATION * 4, abs=1.0)
    out = motion(SIZE, "minmax")(synthetic, np.random.default_rng(4))
    assert np.allclose(out, synthetic.min() + np.abs(np.fft.ifft2(spectrum)), atol=1e-3)


# ---------------------------------------------------------------------- intensities


def test_tissue_contrast_is_monotone_within_each_band_with_its_own_curve(synthetic):
    out = tissue_contrast(synthetic, np.random.default_rng(2)).astype(np.float64)
    params = tissue_curve(synthetic, np.random.default_rng(2))
    low, high = float(synthetic.min()), float(synthetic.max())
    unit, mapped = (synthetic.astype(np.float64) - low) / (high - low), (out - low) / (high - low)
    edges, outputs, exponents = params["edges"], params["outputs"], params["exponents"]
    assert len(exponents) == TISSUE_BANDS and np.all(np.diff(edges) > 0) and np.all(np.diff(outputs) > 0)
    for band in range(TISSUE_BANDS):
        inside = (unit >= edges[band]) & (unit < edges[band + 1])
        assert inside.sum() > 50
        order = np.argsort(unit[inside], kind="stable")
        assert np.all(np.diff(mapped[inside][order]) >= -1e-6)  # monotone within the band
        assert mapped[inside].min() >= outputs[band] - 1e-6 and mapped[inside].max() <= outputs[band + 1] + 1e-6
        # the band's curve is its own power: the log-log slope of (position, output share) is its exponent
        t = (unit[inside] - edges[band]) / (edges[band + 1] - edges[band])
        s = (mapped[inside] - outputs[band]) / (outputs[band + 1] - outputs[band])
        keep = (t > 0.05) & (s > 1e-4)
        slope = np.polyfit(np.log(t[keep]), np.log(s[keep]), 1)[0]
        assert slope == pytest.approx(exponents[band], rel=0.02)
    assert exponents.max() / exponents.min() > 1.1  # not one curve for the whole slice


def test_rician_noise_has_its_level_at_the_training_size():
    """Half the slice background (Rayleigh floor: mean sigma sqrt(pi / 2)), half a flat tissue of 0.6 of the range
    (about Gaussian: mean sqrt(A^2 + sigma^2)), measured on the prepared slice in units of the raw range."""
    native = 8 * SIZE
    image = np.zeros((native, native), dtype=np.float32)
    image[:, native // 2:] = 600.0
    image[0, 0] = 1000.0  # the range: 1000
    for sigma in (0.05, 0.2):
        out = rician(sigma, SIZE, "minmax")(image, np.random.default_rng(1))
        prepared = np.asarray(preprocess_minmax(np.concatenate([out, [[0.0] * native]]), SIZE), np.float64)
        prepared *= (out.max() - 0.0) / 1000.0  # back to units of the original range (the minimum stays 0)
        background, tissue = prepared[2:-2, 2:SIZE // 2 - 2], prepared[2:-2, SIZE // 2 + 2:-2]
        assert background.mean() == pytest.approx(sigma * math.sqrt(math.pi / 2), rel=0.15)
        assert tissue.mean() == pytest.approx(math.hypot(0.6, sigma), rel=0.03)
        assert 0.4 * sigma < tissue.std() < 1.1 * sigma  # per training pixel, smoothed a little by the resizes


# ---------------------------------------------------------------------- parametrised forms of the first shifts


def test_the_factories_reproduce_the_first_benchs_shifts(synthetic):
    assert np.array_equal(rotate(10.0)(synthetic, None), rotate_10(synthetic, None))
    assert np.array_equal(bias(0.2)(synthetic, np.random.default_rng(3)),
                          bias_field(synthetic, np.random.default_rng(3)))
    with pytest.raises(ValueError, match="bias amplitude"):
        bias(1.5)


@pytest.mark.slow
def test_family_examples_figure(tmp_path, ellipse):
    path = family_examples_figure(ellipse, tmp_path / "figures" / "families.png", SIZE)
    assert path == tmp_path / "figures" / "families.png" and path.stat().st_size > 10_000
    with Image.open(path) as png:
        assert png.format == "PNG" and png.width > png.height > 300
