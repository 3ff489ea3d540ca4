"""Image-noise models of the paper's protocol, as pure numpy functions.

Images are float arrays scaled to [0, 1]. Every function takes an explicit
``numpy.random.Generator`` so that the caller decides how noise is seeded: the
protocol fixes one realisation per (seed, sample), it is not an augmentation.
"""

from __future__ import annotations

import numpy as np

#: Reference noise level of the paper: N(0, 32) on the 0-255 scale.
PAPER_SIGMA = 32.0 / 255.0
#: Scale of the authors' released "Rician" field: Rice(b=1) samples x 16 on 0-255.
REFERENCE_RICE_SCALE = 16.0 / 255.0

NOISE_TYPES = ("none", "gaussian", "rician", "rician_reference")


def add_gaussian_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Additive white Gaussian noise N(0, sigma^2), clipped back to [0, 1]."""
    noisy = image + rng.normal(0.0, sigma, size=image.shape)
    return np.clip(noisy, 0.0, 1.0).astype(image.dtype, copy=False)


def add_rician_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude-MRI noise: |x + n1 + i n2| with n1, n2 ~ N(0, sigma^2), clipped to [0, 1].

    This is how noise enters a magnitude image reconstructed from complex data with
    Gaussian noise in both channels; on a zero image the mean is sigma * sqrt(pi / 2).
    """
    real = image + rng.normal(0.0, sigma, size=image.shape)
    imag = rng.normal(0.0, sigma, size=image.shape)
    return np.clip(np.hypot(real, imag), 0.0, 1.0).astype(image.dtype, copy=False)


def reference_rician_field(shape: tuple[int, ...], seed: int = 0, scale: float = REFERENCE_RICE_SCALE) -> np.ndarray:
    """The authors' released "Rician" noise: Rice(b=1) samples times ``scale``.

    Their code draws it once with a fixed seed, so every image gets the same field;
    it is additive and always positive (mean about 24.8/255, std 12.4/255).
    """
    rng = np.random.default_rng(seed)
    # Rice(b, sigma=1) is the magnitude of a 2-D Gaussian centred at (b, 0).
    field = np.hypot(1.0 + rng.standard_normal(shape), rng.standard_normal(shape))
    return field * scale


def apply_noise(image: np.ndarray, noise: str, sigma: float, rng: np.random.Generator,
                reference_field: np.ndarray | None = None) -> np.ndarray:
    """Dispatch to one noise model by name (one of :data:`NOISE_TYPES`)."""
    if noise == "none":
        return image
    if noise == "gaussian":
        return add_gaussian_noise(image, sigma, rng)
    if noise == "rician":
        return add_rician_noise(image, sigma, rng)
    if noise == "rician_reference":
        field = reference_field if reference_field is not None else reference_rician_field(image.shape)
        if field.shape != image.shape:
            raise ValueError(f"reference noise field has shape {field.shape}, image has {image.shape}")
        return np.clip(image + field, 0.0, 1.0).astype(image.dtype, copy=False)
    raise ValueError(f"unknown noise type {noise!r}; expected one of {NOISE_TYPES}")
