import numpy as np
import pytest

from robustmri.data.noise import PAPER_SIGMA, add_gaussian_noise, add_rician_noise, apply_noise, reference_rician_field


def test_gaussian_statistics():
    image = np.full((512, 512), 0.5)
    noisy = add_gaussian_noise(image, PAPER_SIGMA, np.random.default_rng(0))
    residual = noisy - image
    assert abs(residual.mean()) < 1e-3
    assert abs(residual.std() - PAPER_SIGMA) / PAPER_SIGMA < 0.01
    clipped = add_gaussian_noise(np.zeros((64, 64)), 0.5, np.random.default_rng(0))
    assert clipped.min() == 0.0 and clipped.max() <= 1.0


def test_rician_on_zero_image_has_rayleigh_mean():
    sigma = 0.1
    noisy = add_rician_noise(np.zeros((512, 512)), sigma, np.random.default_rng(1))
    expected = sigma * np.sqrt(np.pi / 2)
    assert abs(noisy.mean() - expected) / expected < 0.02


def test_rician_bias_at_high_signal_is_small():
    # at high SNR the Rician magnitude is approximately Gaussian around sqrt(A^2 + sigma^2)
    sigma, signal = 0.02, 0.6
    noisy = add_rician_noise(np.full((512, 512), signal), sigma, np.random.default_rng(2))
    assert abs(noisy.mean() - np.sqrt(signal**2 + sigma**2)) < 1e-3
    assert abs(noisy.std() - sigma) / sigma < 0.03


def test_reference_field_is_fixed_and_matches_released_statistics():
    field = reference_rician_field((256, 256), seed=0)
    np.testing.assert_array_equal(field, reference_rician_field((256, 256), seed=0))
    assert abs(field.mean() * 255 - 24.8) < 0.5  # Rice(b=1) mean 1.55 x 16
    assert abs(field.std() * 255 - 12.4) < 0.5


def test_noise_is_reproducible_per_rng_and_dispatch_rejects_unknown():
    image = np.random.default_rng(0).random((32, 32))
    a = apply_noise(image, "gaussian", 0.1, np.random.default_rng([3, 7]))
    b = apply_noise(image, "gaussian", 0.1, np.random.default_rng([3, 7]))
    np.testing.assert_array_equal(a, b)
    assert apply_noise(image, "none", 0.1, np.random.default_rng(0)) is image
    with pytest.raises(ValueError, match="unknown noise type"):
        apply_noise(image, "speckle", 0.1, np.random.default_rng(0))
