"""Background noise sigma (half-normal / Rayleigh maximum likelihood) and the complementary noise of test-time
noise matching, against known sigma on synthetic backgrounds and by hand."""

import numpy as np
import pytest

from robustmri.data.noise import apply_noise
from robustmri.data.noise_level import (
    MIN_BACKGROUND_PIXELS,
    add_complementary_noise,
    border_pixels,
    complementary_sigma,
    estimate_sigma,
)

SIGMAS = [16 / 255, 32 / 255, 64 / 255]


def head_slice(size=256):
    """A bright ellipse (the head) on a zero background, as the figshare slices are framed."""
    y, x = np.mgrid[:size, :size] / size - 0.5
    image = np.zeros((size, size), dtype=np.float32)
    image[(x / 0.36) ** 2 + (y / 0.40) ** 2 < 1] = 0.55  # inside the 8 % border
    return image


@pytest.mark.parametrize("noise", ["gaussian", "rician"])
@pytest.mark.parametrize("sigma", SIGMAS)
def test_the_estimate_recovers_a_known_sigma_on_a_noisy_background(noise, sigma):
    rng = np.random.default_rng(0)
    background = apply_noise(np.zeros((256, 256), dtype=np.float32), noise, sigma, rng)
    # 65,536 pixels (half of them for the censored Gaussian): relative standard error under 0.5 %
    assert estimate_sigma(background, noise) == pytest.approx(sigma, rel=0.02)


@pytest.mark.parametrize("noise", ["gaussian", "rician"])
def test_the_border_of_a_head_slice_is_its_background(noise):
    rng = np.random.default_rng(1)
    noisy = apply_noise(head_slice(), noise, 32 / 255, rng)
    pixels = border_pixels(noisy)
    assert len(pixels) > 5000
    assert estimate_sigma(pixels, noise) == pytest.approx(32 / 255, rel=0.03)
    # the whole image is not background: the head would inflate the estimate many times over
    assert estimate_sigma(noisy, noise) > 2 * 32 / 255


def test_a_clean_background_has_no_noise_and_too_few_pixels_are_refused():
    assert estimate_sigma(np.zeros(500), "gaussian") == 0.0
    assert estimate_sigma(np.zeros(500), "rician") == 0.0
    with pytest.raises(ValueError, match="usable background pixels"):
        estimate_sigma(np.full(MIN_BACKGROUND_PIXELS - 1, 0.1), "rician")
    with pytest.raises(ValueError, match="noise must be one of"):
        estimate_sigma(np.zeros(500), "rician_reference")


def test_the_complementary_sigma_is_the_variance_difference():
    assert complementary_sigma(5.0, 3.0) == pytest.approx(4.0)  # 25 - 9 = 16
    assert complementary_sigma(0.5, 0.0) == pytest.approx(0.5)
    assert complementary_sigma(3.0, 5.0) == 0.0  # already noisier than training: nothing added
    with pytest.raises(ValueError):
        complementary_sigma(-1.0, 0.0)


@pytest.mark.parametrize("noise", ["gaussian", "rician"])
@pytest.mark.parametrize("sigma_first", [0.0, 0.02, 16 / 255, 31 / 255])
def test_complementary_noise_brings_an_image_to_the_training_level(noise, sigma_first):
    """Noise of sigma_first, then the complement to 32/255: the background's sigma is 32/255 (Rician by the
    random phase, Gaussian by giving the clipped zeros their hidden negative half back)."""
    rng = np.random.default_rng(2)
    train = 32 / 255
    noisy = apply_noise(np.zeros((256, 256), dtype=np.float32), noise, sigma_first, rng)
    matched = add_complementary_noise(noisy, noise, estimate_sigma(noisy, noise), train, rng)
    assert estimate_sigma(matched, noise) == pytest.approx(train, rel=0.015)
    # and the clipped share of a Gaussian background is the half a training image has
    if noise == "gaussian":
        assert np.mean(matched == 0) == pytest.approx(0.5, abs=0.01)
    assert matched.dtype == noisy.dtype and matched.min() >= 0 and matched.max() <= 1


def test_no_complement_leaves_the_image_as_it_is():
    image = head_slice(64)
    assert add_complementary_noise(image, "rician", 40 / 255, 32 / 255, np.random.default_rng(0)) is image
