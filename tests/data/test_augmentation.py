"""Site-shift augmentation (robustmri.data.augmentation): parameters fixed by (seed, epoch, sample id),
each component doing what it says against an independent computation, and the in-memory batches
unchanged when it is off."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from robustmri.data.augmentation import (
    COMPONENTS,
    FAMILIES,
    MR_COMPONENTS,
    MR_FAMILIES,
    SiteShiftAugmentation,
    augmentation_examples_figure,
    bias_field,
    check_exclude,
    ghosting,
    rician,
    ringing,
    tissue_curve,
)
from robustmri.data.in_memory import InMemoryDataset

from conftest import BUNDLE
from helpers import axes_ratio

#: Every sample augmented, every component taken: the whole pipeline runs on every sample.
EVERYTHING = SiteShiftAugmentation(prob=1.0, component_prob=1.0)


def _disk(size=32, radius=8.0, centre=None, value=0.8) -> torch.Tensor:
    """A [1, 1, size, size] disk of ``value`` on a zero background."""
    c = (size - 1) / 2 if centre is None else centre
    rows, cols = np.mgrid[:size, :size]
    image = ((rows - c) ** 2 + (cols - c) ** 2 <= radius**2) * value
    return torch.from_numpy(image.astype(np.float32))[None, None]


def _smooth_batch(n=5, size=16, seed=0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    images = ndimage.gaussian_filter(rng.random((n, 1, size, size)), sigma=(0, 0, 1.5, 1.5))
    images = (images - images.min()) / (images.max() - images.min())
    return torch.from_numpy(images.astype(np.float32))


def _params(n=1, **values):
    """Identity parameters for ``n`` samples with ``values`` (scalars or per-sample) set."""
    params = SiteShiftAugmentation(prob=0.0).draw(0, 0, list(range(n)))
    for key, value in values.items():
        params[key] = np.broadcast_to(np.asarray(value, dtype=np.float64), params[key].shape).copy()
    params["augmented"][:] = True
    return params


def _items(n=8, size=16):
    images = _smooth_batch(n, size, seed=1).numpy()
    return [{"image": images[k], "label": k % 3, "id": 200 + k} for k in range(n)]


# ---------------------------------------------------------------------- randomness


def test_parameters_depend_only_on_seed_epoch_and_id():
    augmentation = SiteShiftAugmentation(prob=0.7)
    batch = augmentation.draw(3, 2, [11, 5, 42])
    alone = augmentation.draw(3, 2, [42])
    again = augmentation.draw(3, 2, [11, 5, 42])
    for key in batch:
        assert np.array_equal(batch[key][2], alone[key][0]) and np.array_equal(batch[key], again[key])
    many = np.arange(400)
    epochs = augmentation.draw(3, 2, many), augmentation.draw(3, 3, many), augmentation.draw(4, 2, many)
    assert not np.array_equal(epochs[0]["gamma"], epochs[1]["gamma"])
    assert not np.array_equal(epochs[0]["gamma"], epochs[2]["gamma"])
    assert epochs[0]["augmented"].mean() == pytest.approx(0.7, abs=0.07)
    # Among augmented samples each component is taken about half the time; others hold the identity.
    taken = epochs[0]["gamma"][epochs[0]["augmented"]] != 1
    assert taken.mean() == pytest.approx(0.5, abs=0.1)
    assert np.all(epochs[0]["gamma"][~epochs[0]["augmented"]] == 1)
    assert np.all(epochs[0]["rotation"][~epochs[0]["augmented"]] == 0)


def test_drawn_values_stay_in_their_ranges():
    params = EVERYTHING.draw(0, 0, range(300))
    assert params["augmented"].all()
    assert np.all((params["gamma"] >= 0.67) & (params["gamma"] <= 1.5))
    assert np.all((params["contrast"] >= 0.7) & (params["contrast"] <= 1.3))
    assert np.all((params["scale"] >= 0.85) & (params["scale"] <= 1.15))
    assert np.all((params["aspect"] >= 0.8) & (params["aspect"] <= 1.25))
    assert np.all(np.abs(params["rotation"]) <= 10.0)
    assert np.all((params["blur_sigma"] >= 0) & (params["blur_sigma"] <= 1.0))
    assert np.all((params["downsample"] >= 1) & (params["downsample"] <= 2.0))
    assert np.all((params["bias_amplitude"] >= 0) & (params["bias_amplitude"] <= 0.2))
    # gamma and aspect are log-uniform: as many draws below 1 as above (about).
    assert (params["aspect"] < 1).mean() == pytest.approx(0.5, abs=0.1)


def test_a_sample_comes_out_the_same_alone_or_in_any_batch():
    images, ids = _smooth_batch(5), [7, 3, 99, 12, 40]
    out = EVERYTHING(images, 1, 4, ids)
    assert torch.equal(out, EVERYTHING(images, 1, 4, ids))
    order = [3, 0, 4, 2, 1]
    assert torch.equal(EVERYTHING(images[order], 1, 4, [ids[k] for k in order]), out[order])
    for row in (0, 2):
        assert torch.equal(EVERYTHING(images[row:row + 1], 1, 4, [ids[row]])[0], out[row])
    other_epoch = EVERYTHING(images, 1, 5, ids)
    assert all(not torch.equal(a, b) for a, b in zip(out, other_epoch))


# ---------------------------------------------------------------------- off means off


def test_prob_zero_and_unaugmented_samples_are_untouched():
    images = _smooth_batch(4) * 1.5 - 0.2  # outside [0, 1]: not even clipped
    off = SiteShiftAugmentation(prob=0.0)
    assert off(images, 0, 0, [1, 2, 3, 4]) is images
    assert torch.equal(off.apply(images, off.draw(0, 0, [1, 2, 3, 4])), images)
    params = _params(4, gamma=[1.0, 0.8, 1.0, 1.3])
    out = SiteShiftAugmentation().apply(images, params)
    assert torch.equal(out[[0, 2]], images[[0, 2]]) and not torch.equal(out[1], images[1])
    assert out.dtype == images.dtype and out.shape == images.shape


def test_the_dataset_without_augmentation_serves_the_old_batches_bit_for_bit():
    items = _items()
    old, off = InMemoryDataset(items, 0.5, seed=3), InMemoryDataset(items, 0.5, seed=3,
                                                                    site_shift=SiteShiftAugmentation(prob=0.0))
    on = InMemoryDataset(items, 0.5, seed=3, site_shift=SiteShiftAugmentation(prob=0.5))
    for dataset in (old, off, on):
        dataset.set_epoch(2)
    indices = [5, 0, 7, 2, 3, 6]
    reference = old.__getitems__(indices)
    assert torch.equal(off.__getitems__(indices)["image"], reference["image"])
    batch = on.__getitems__(indices)
    ids = reference["id"].tolist()
    assert torch.equal(batch["id"], reference["id"]) and torch.equal(batch["label"], reference["label"])
    # The augmentation acts on the flipped batch; samples it leaves alone are the old ones exactly.
    assert torch.equal(batch["image"], on.site_shift(reference["image"], 3, 2, ids))
    augmented = on.site_shift.draw(3, 2, ids)["augmented"]
    assert 0 < augmented.sum() < len(ids)
    for row, flag in enumerate(augmented):
        assert torch.equal(batch["image"][row], reference["image"][row]) != flag
    assert on[5] is items[5]  # a single index stays unaugmented
    with pytest.raises(ValueError, match="site_shift"):
        InMemoryDataset(items, site_shift={"prob": 0.5})


# ---------------------------------------------------------------------- components


def test_gamma_alone_is_the_power():
    images = _smooth_batch(3)
    gammas = np.array([0.67, 1.0, 1.5])
    out = SiteShiftAugmentation().apply(images, _params(3, gamma=gammas))
    expected = images ** torch.tensor(gammas, dtype=torch.float32).view(-1, 1, 1, 1)
    assert torch.equal(out, expected)


def test_rotation_by_90_degrees_is_rot90_and_a_tiny_one_is_nearly_nothing():
    images = _smooth_batch(2)
    out = SiteShiftAugmentation().apply(images, _params(2, rotation=90.0))
    torch.testing.assert_close(out, torch.rot90(images, 1, dims=(-2, -1)), atol=1e-5, rtol=0)
    # Counter-clockwise as displayed: a dot right of the centre goes above it.
    dot = torch.zeros(1, 1, 9, 9)
    dot[0, 0, 4, 7] = 1.0
    rotated = SiteShiftAugmentation().apply(dot, _params(1, rotation=90.0))
    assert rotated[0, 0].argmax().item() == 1 * 9 + 4
    tiny = SiteShiftAugmentation().apply(images, _params(2, rotation=1e-6))
    torch.testing.assert_close(tiny, images, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scale", [0.85, 1.15])
def test_scale_changes_a_centred_disks_area_by_its_square(scale):
    disk = _disk(64, radius=14.0)
    out = SiteShiftAugmentation().apply(disk, _params(1, scale=scale))
    area = lambda image: float((image > 0.4).sum())  # noqa: E731 (half the disk's value)
    assert area(out) / area(disk) == pytest.approx(scale**2, rel=0.04)


def test_translation_moves_the_content_by_its_share_of_each_side():
    dot = torch.zeros(1, 1, 40, 20)
    dot[0, 0, 10, 5] = 1.0
    # right by 0.25 of the width (5 px), down by 0.1 of the height (4 px): exactly whole pixels, so exact
    moved = SiteShiftAugmentation().apply(dot, _params(1, shift=[[0.25, 0.1]]))
    assert moved[0, 0].argmax().item() == 14 * 20 + 10 and moved.max().item() == pytest.approx(1.0, abs=1e-5)
    # content moved out of the frame is gone, the frame it leaves is background
    edge = SiteShiftAugmentation().apply(dot, _params(1, shift=[[-0.3, 0.0]]))
    assert edge.abs().sum().item() == 0.0


def test_translation_has_its_own_stream_is_off_by_default_and_goes_with_framing():
    ids = list(range(80))
    plain = SiteShiftAugmentation().draw(3, 2, ids)
    moved = SiteShiftAugmentation(translation=0.2).draw(3, 2, ids)
    assert not plain["shift"].any()  # off by default
    for key in SITE_KEYS:  # switching it on moves no other draw
        assert np.array_equal(plain[key], moved[key]), key
    # only augmented samples move, about component_prob of them, within the range
    assert not moved["shift"][~moved["augmented"]].any()
    share = (moved["shift"][moved["augmented"]] != 0).any(1).mean()
    assert 0.3 < share < 0.7 and np.abs(moved["shift"]).max() <= 0.2
    # the stream by hand: [seed, epoch, id, 7933], one uniform to take it, then the two shifts
    for row in np.flatnonzero(moved["augmented"])[:5]:
        rng = np.random.default_rng([3, 2, ids[row], 7933])
        take, shift = rng.random() < 0.5, rng.uniform(-0.2, 0.2, 2)
        assert np.array_equal(moved["shift"][row], shift if take else np.zeros(2))
    assert not SiteShiftAugmentation(translation=0.2, exclude=["framing"]).draw(3, 2, ids)["shift"].any()
    assert SiteShiftAugmentation(translation=0.2).describe()["translation"] == 0.2
    with pytest.raises(ValueError, match="translation"):
        SiteShiftAugmentation(translation=0.7)


def test_aspect_squeezes_the_width_against_the_height():
    disk = _disk(64, radius=14.0)
    out = SiteShiftAugmentation().apply(disk, _params(1, aspect=1.25))
    # A crop 1.25 times as wide as high, resized to the square: the disk comes out 1.25 times as high as wide.
    assert axes_ratio(out[0, 0].numpy() > 0.4) == pytest.approx(1.25, rel=0.04)
    assert float((out > 0.4).sum()) / float((disk > 0.4).sum()) == pytest.approx(1.0, rel=0.04)  # area kept


def test_blur_is_scipys_gaussian_keeps_the_mean_and_lowers_the_peak():
    disk = _disk(32, radius=6.0, value=1.0)
    disk[0, 0, 16, 16] = 1.0
    out = SiteShiftAugmentation().apply(disk, _params(1, blur_sigma=1.0))
    expected = ndimage.gaussian_filter(disk[0, 0].double().numpy(), sigma=1.0, mode="nearest", truncate=3.0)
    np.testing.assert_allclose(out[0, 0].numpy(), expected, atol=1e-6)
    assert float(out.mean()) == pytest.approx(float(disk.mean()), rel=1e-5)
    spike = torch.zeros(1, 1, 16, 16)
    spike[0, 0, 8, 8] = 1.0
    blurred = SiteShiftAugmentation().apply(spike, _params(1, blur_sigma=0.8))
    assert float(blurred.max()) < 0.5 and float(blurred.sum()) == pytest.approx(1.0, rel=1e-5)


def test_downsampling_by_one_is_nothing_and_by_two_removes_the_finest_detail():
    images = _smooth_batch(2)
    assert torch.equal(SiteShiftAugmentation().apply(images, _params(2, downsample=1.0)), images)
    checkerboard = torch.from_numpy((np.indices((16, 16)).sum(0) % 2).astype(np.float32))[None, None]
    out = SiteShiftAugmentation().apply(checkerboard, _params(1, downsample=2.0))
    # Antialiased down then up: the Nyquist pattern becomes its mean inside (plain sampling would keep 0s or 1s).
    np.testing.assert_allclose(out[0, 0, 3:-3, 3:-3].numpy(), 0.5, atol=0.02)
    odd = SiteShiftAugmentation().apply(images, _params(2, downsample=1.5))
    assert odd.shape == images.shape and not torch.equal(odd, images)


def test_bias_field_lies_within_one_plus_minus_its_amplitude():
    rng = np.random.default_rng(0)
    coefficients = torch.from_numpy(rng.normal(size=(6, 5)))
    amplitude = torch.tensor([0.2, 0.1, 0.05, 0.2, 0.15, 0.0], dtype=torch.float64)
    fields = bias_field(coefficients, amplitude, (24, 20))
    assert fields.shape == (6, 1, 24, 20)
    deviation = (fields - 1).abs().amax(dim=(1, 2, 3))
    torch.testing.assert_close(deviation, amplitude)  # reaches its amplitude, never more
    # Smooth: neighbouring pixels differ by a small part of the range.
    assert float((fields[:, :, 1:] - fields[:, :, :-1]).abs().max()) < 0.05
    flat = torch.full((1, 1, 24, 20), 0.5)
    params = _params(1, bias_amplitude=0.2)
    params["bias_coefficients"][0] = coefficients[0].numpy()
    out = SiteShiftAugmentation().apply(flat, params)
    torch.testing.assert_close(out, (0.5 * fields[:1]).float(), atol=1e-6, rtol=0)


def test_contrast_scales_about_the_foreground_mean_and_clips():
    image = np.zeros((1, 1, 8, 8), dtype=np.float32)
    image[..., 2:6, 2:4], image[..., 2:6, 4:6] = 0.6, 0.4  # foreground mean 0.5
    out = SiteShiftAugmentation().apply(torch.from_numpy(image), _params(1, contrast=0.5)).numpy()
    np.testing.assert_allclose(out, np.clip(0.5 + 0.5 * (image - 0.5), 0, 1), atol=1e-7)
    assert out[0, 0, 3, 3] == pytest.approx(0.55) and out[0, 0, 0, 0] == pytest.approx(0.25)
    stronger = SiteShiftAugmentation().apply(torch.from_numpy(image), _params(1, contrast=3.0)).numpy()
    assert stronger[0, 0, 3, 3] == pytest.approx(0.8) and stronger[0, 0, 0, 0] == 0.0


def test_augmented_images_stay_in_the_unit_interval():
    strong = SiteShiftAugmentation(prob=1.0, component_prob=1.0, contrast=(1.3, 1.3), bias_amplitude=0.9,
                                   gamma=(0.5, 0.5))
    images = _smooth_batch(6)
    for augmentation in (EVERYTHING, strong):
        out = augmentation(images, 0, 0, range(6))
        assert out.min() >= 0.0 and out.max() <= 1.0 and torch.isfinite(out).all()
        assert out.dtype == torch.float32 and out.shape == images.shape


# ---------------------------------------------------------------------- settings


@pytest.mark.parametrize("field, value", [
    ("prob", 1.5), ("prob", -0.1), ("prob", "often"), ("component_prob", 2.0), ("gamma", (1.5, 0.67)),
    ("gamma", (0.0, 1.0)), ("gamma", 1.0), ("contrast", (-1.0, 1.0)), ("scale", (0.0, 1.0)),
    ("aspect", (float("nan"), 1.0)), ("blur_sigma", (-0.5, 1.0)), ("downsample", (0.5, 2.0)),
    ("bias_amplitude", 1.0), ("bias_amplitude", -0.1), ("rotation_degrees", -5.0), ("rotation_degrees", 270.0),
    ("translation", 0.6), ("translation", "far"),
])
def test_invalid_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SiteShiftAugmentation(**{field: value})


def test_settings_from_a_json_config_and_their_description():
    augmentation = SiteShiftAugmentation(prob="0.3", gamma=[0.8, 1.2])  # as a bundle config may write them
    assert augmentation.prob == 0.3 and augmentation.gamma == (0.8, 1.2)
    hash(augmentation)
    description = augmentation.describe()
    assert json.loads(json.dumps(description)) == description
    assert description["gamma"] == [0.8, 1.2] and description["prob"] == 0.3 and description["name"] == "site_shift"


@pytest.mark.slow
def test_augmentation_examples_figure(tmp_path):
    image = _disk(64, radius=20.0)[0].numpy()
    path = augmentation_examples_figure(image, tmp_path / "figures" / "augmentation.png", seed=1)
    assert path == tmp_path / "figures" / "augmentation.png" and path.stat().st_size > 10_000
    with Image.open(path) as png:
        assert png.format == "PNG" and png.width > 300
    mr = augmentation_examples_figure(image, tmp_path / "mr.png", seed=1,
                                      augmentation=SiteShiftAugmentation(prob=0.0, mr_prob=0.5, component_prob=0.7))
    assert mr.stat().st_size > 10_000 and mr.read_bytes() != path.read_bytes()


# ---------------------------------------------------------------------- families and augment_exclude


def _reference_draw(seed, epoch, sample, prob=0.5, component_prob=0.5):
    """The per-sample draw as the module states it, written out again independently (the stream
    ``[seed, epoch, id, 7919]``, one uniform for ``augmented``, one per component for taking it, then
    the values in component order with the defaults' ranges, then the bias coefficients)."""
    rng = np.random.default_rng([seed, epoch, sample, 7919])
    augmented = rng.random() < prob
    takes = (rng.random(8) < component_prob) & augmented
    rotation = rng.uniform(-10.0, 10.0)
    scale = rng.uniform(0.85, 1.15)
    aspect = np.exp(rng.uniform(np.log(0.8), np.log(1.25)))
    downsample, blur = rng.uniform(1.0, 2.0), rng.uniform(0.0, 1.0)
    bias, contrast = rng.uniform(0.0, 0.2), rng.uniform(0.7, 1.3)
    gamma = np.exp(rng.uniform(np.log(0.67), np.log(1.5)))
    coefficients = rng.normal(size=5)
    identity = (0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0)
    values = [v if t else i for v, t, i in zip((rotation, scale, aspect, downsample, blur, bias, contrast, gamma),
                                               takes, identity)]
    return augmented, values, coefficients if takes[5] else np.zeros(5)


def test_the_default_augmentations_draws_are_unchanged():
    """``exclude`` is new: by default (and with an empty one) every sample's draw is the one written out above."""
    keys = ("rotation", "scale", "aspect", "downsample", "blur_sigma", "bias_amplitude", "contrast", "gamma")
    ids = list(range(60))
    for augmentation in (SiteShiftAugmentation(), SiteShiftAugmentation(exclude=[]), SiteShiftAugmentation(exclude="")):
        assert augmentation.exclude == ()
        params = augmentation.draw(4, 1, ids)
        for row, sample in enumerate(ids):
            augmented, values, coefficients = _reference_draw(4, 1, sample)
            assert params["augmented"][row] == augmented
            assert [params[key][row] for key in keys] == pytest.approx(values, rel=1e-12, abs=0)
            assert np.array_equal(params["bias_coefficients"][row], coefficients)
    assert params["augmented"].any() and (params["gamma"] != 1).any()  # the check above saw augmented samples


@pytest.mark.parametrize("family", list(FAMILIES))
def test_excluding_a_family_removes_its_components_and_keeps_every_other_draw(family):
    keys = {"rotation": "rotation", "scale": "scale", "aspect": "aspect", "downsample": "downsample",
            "blur": "blur_sigma", "bias": "bias_amplitude", "contrast": "contrast", "gamma": "gamma"}
    identity = {"rotation": 0.0, "blur_sigma": 0.0, "bias_amplitude": 0.0}
    ids = range(200)
    full = EVERYTHING.draw(2, 3, ids)
    without = SiteShiftAugmentation(prob=1.0, component_prob=1.0, exclude=family).draw(2, 3, ids)
    assert without["augmented"].all()
    for component, key in keys.items():
        if component in FAMILIES[family]:
            assert np.all(without[key] == identity.get(key, 1.0)) and np.any(full[key] != identity.get(key, 1.0))
        else:
            assert np.array_equal(without[key], full[key])
    removed_bias = "bias" in FAMILIES[family]
    assert np.array_equal(without["bias_coefficients"], np.zeros_like(full["bias_coefficients"]) if removed_bias
                          else full["bias_coefficients"])
    # applied: an image under the excluded family's augmentation equals the image under the other components alone
    images = _smooth_batch(6, 24, seed=3)
    without = {key: value[:6] for key, value in without.items()}
    other = {key: value[:6].copy() for key, value in full.items()}
    for component in FAMILIES[family]:
        other[keys[component]][:] = identity.get(keys[component], 1.0)
        if component == "bias":
            other["bias_coefficients"][:] = 0.0
    assert torch.equal(SiteShiftAugmentation(exclude=family).apply(images, without),
                       SiteShiftAugmentation().apply(images, other))


def test_every_component_belongs_to_exactly_one_family():
    members = [component for components in FAMILIES.values() for component in components]
    assert sorted(members) == sorted(COMPONENTS)


def test_exclude_takes_names_lists_and_comma_strings_and_refuses_unknown_families():
    assert SiteShiftAugmentation(exclude="blur, rotation").exclude == ("rotation", "blur")
    assert SiteShiftAugmentation(exclude=["intensity_curve"]).exclude == ("intensity_curve",)
    assert check_exclude(None) == ()
    with pytest.raises(ValueError, match="augment_exclude: unknown augmentation family 'gamma'; valid: framing"):
        SiteShiftAugmentation(exclude=["gamma"])
    assert SiteShiftAugmentation(exclude=["blur"]).describe()["exclude"] == ["blur"]


def test_the_bundle_passes_augment_exclude_to_the_training_dataset():
    from robustmri.engine.workflow import load_workflow

    for overrides, expected in (({}, ()), ({"augment_exclude": ["rotation", "framing"]}, ("framing", "rotation"))):
        workflow = load_workflow(BUNDLE, ["train.json"], overrides)
        workflow.parser["train#dataset#data"] = []
        assert workflow.parser.get_parsed_content("train#dataset#site_shift").exclude == expected
    # the framing ranges too: the defaults, and a wider framing
    for overrides, expected in (({}, ((0.85, 1.15), 0.0)),
                                ({"augment_scale": [0.85, 1.5], "augment_translation": 0.15}, ((0.85, 1.5), 0.15))):
        workflow = load_workflow(BUNDLE, ["train.json"], overrides)
        workflow.parser["train#dataset#data"] = []
        augmentation = workflow.parser.get_parsed_content("train#dataset#site_shift")
        assert (augmentation.scale, augmentation.translation) == expected


# ---------------------------------------------------------------------- MR acquisition components

MR_KEYS = ("ringing_kept", "ghosting_shift", "tissue_strength", "noise_sigma")
SITE_KEYS = ("augmented", "rotation", "scale", "aspect", "downsample", "blur_sigma", "bias_amplitude",
             "bias_coefficients", "contrast", "gamma")


def test_the_mr_components_have_their_own_stream_and_leave_the_site_draws_alone():
    ids = list(range(80))
    site = SiteShiftAugmentation().draw(3, 2, ids)
    both = SiteShiftAugmentation(mr_prob=0.5).draw(3, 2, ids)
    for key in SITE_KEYS[1:]:
        assert np.array_equal(site[key], both[key]), key
    assert np.array_equal(site["augmented"] | both["augmented"], both["augmented"])
    assert all((both[key] != (1.0 if key == "ringing_kept" else 0.0)).any() for key in MR_KEYS)
    assert all((site[key] == (1.0 if key == "ringing_kept" else 0.0)).all() for key in MR_KEYS)  # off by default
    alone = SiteShiftAugmentation(mr_prob=0.5).draw(3, 2, [ids[17]])  # a sample's draw is its own
    assert all(np.array_equal(alone[key][0], both[key][17]) for key in MR_KEYS + ("tissue_knots", "noise_seed"))


def test_ringing_is_the_truncated_spectrum_by_numpy_and_keeping_everything_is_nothing():
    image = _smooth_batch(1, 24, seed=5)[0]
    np.testing.assert_allclose(ringing(image, 1.0, 2).numpy(), image.numpy(), atol=1e-6)
    spectrum = np.fft.fft2(image.numpy().astype(np.float64))
    keep = np.abs(np.fft.fftfreq(24)) <= 0.5 * 0.5
    expected = np.abs(np.fft.ifft2(spectrum * keep[:, None]))  # rows truncated to the central half
    np.testing.assert_allclose(ringing(image, 0.5, 0).numpy(), expected, atol=1e-6)
    assert not np.allclose(expected, image.numpy(), atol=1e-3)


def test_ghosting_takes_every_periodth_line_from_the_translated_image():
    image = _disk(24, radius=5.0)[0]
    shift = 3 / 24  # three pixels: the translated copy is np.roll's
    spectrum = np.fft.fft2(image.numpy().astype(np.float64))
    moved = np.fft.fft2(np.roll(image.numpy().astype(np.float64), 3, axis=-2))
    lines = np.arange(24) % 3 == 0
    expected = np.abs(np.fft.ifft2(np.where(lines[:, None], moved, spectrum)))
    np.testing.assert_allclose(ghosting(image, shift, 3, 0).numpy(), expected, atol=1e-6)
    assert ghosting(image, 0.0, 3, 1).sub(image).abs().max() < 1e-6


def test_the_tissue_curve_by_hand():
    image = torch.tensor([[[0.0, 0.3, 0.5, 0.9, 1.0]]])
    np.testing.assert_allclose(tissue_curve(image, [0.2, 0.4, 0.6, 0.8], 1.0).numpy(), image.numpy(), atol=1e-7)
    # knots at abscissae 0, 0.2, ..., 1 and ordinates 0, 0.1, 0.1, 0.1, 0.1, 1: 0.9 -> 0.1 + 0.5 x 0.9 = 0.55
    curved = tissue_curve(image, [0.1, 0.1, 0.1, 0.1], 1.0)[0, 0].numpy()
    np.testing.assert_allclose(curved, [0.0, 0.1, 0.1, 0.55, 1.0], atol=1e-7)
    half = tissue_curve(image, [0.1, 0.1, 0.1, 0.1], 0.5)[0, 0].numpy()  # halfway to the identity
    np.testing.assert_allclose(half, 0.5 * (curved + image[0, 0].numpy()), atol=1e-7)


def test_rician_noise_has_the_rayleigh_mean_on_a_dark_background():
    dark = torch.zeros(1, 128, 128)
    noisy = rician(dark, 0.1, seed=0).numpy()
    assert noisy.mean() == pytest.approx(0.1 * np.sqrt(np.pi / 2), rel=0.02)
    assert np.array_equal(noisy, rician(dark, 0.1, seed=0).numpy())  # the seed fixes it


@pytest.mark.parametrize("family", list(MR_FAMILIES))
def test_excluding_an_mr_family_drops_its_components_and_keeps_the_others(family):
    ids = range(120)
    full = SiteShiftAugmentation(prob=1.0, component_prob=1.0, mr_prob=1.0).draw(1, 0, ids)
    without = SiteShiftAugmentation(prob=1.0, component_prob=1.0, mr_prob=1.0, exclude=family).draw(1, 0, ids)
    by_component = dict(zip(MR_COMPONENTS, MR_KEYS))
    for component, key in by_component.items():
        identity = 1.0 if key == "ringing_kept" else 0.0
        if component in MR_FAMILIES[family]:
            assert (without[key] == identity).all() and (full[key] != identity).any()
        else:
            assert np.array_equal(without[key], full[key])
    for key in SITE_KEYS:
        assert np.array_equal(without[key], full[key])


def test_every_mr_component_belongs_to_exactly_one_family_and_the_bundle_passes_the_option():
    from robustmri.engine.workflow import load_workflow

    assert sorted(c for members in MR_FAMILIES.values() for c in members) == sorted(MR_COMPONENTS)
    workflow = load_workflow(BUNDLE, ["train.json"], {"augment_mr_prob": 0.5})
    workflow.parser["train#dataset#data"] = []
    assert workflow.parser.get_parsed_content("train#dataset#site_shift").mr_prob == 0.5
    with pytest.raises(ValueError, match="mr_prob must lie in"):
        SiteShiftAugmentation(mr_prob=1.5)
    with pytest.raises(ValueError, match="ringing_kept"):
        SiteShiftAugmentation(ringing_kept=(0.5, 1.5))


def test_mr_augmented_images_stay_in_the_unit_interval_and_unaugmented_ones_are_untouched():
    images = _smooth_batch(40, 24, seed=9) * 1.2 - 0.1  # noisy training images leave [0, 1]
    augmentation = SiteShiftAugmentation(prob=0.0, mr_prob=0.5)
    params = augmentation.draw(0, 0, range(40))
    out = augmentation(images, 0, 0, range(40))
    assert params["augmented"].any() and not params["augmented"].all()
    assert torch.equal(out[~torch.from_numpy(params["augmented"])], images[~torch.from_numpy(params["augmented"])])
    touched = torch.from_numpy(params["augmented"]) & (out != images).flatten(1).any(1)
    assert touched.any() and out[touched].min() >= 0.0 and out[touched].max() <= 1.0

