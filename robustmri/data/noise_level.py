"""How noisy is an image, and how much noise makes it as noisy as the training images?

Both questions are answered on the image's background, where the true signal is zero and the
noise of :mod:`robustmri.data.noise` has a known law:

- ``gaussian``: additive N(0, sigma^2) clipped to [0, 1], so a background pixel is ``max(0, n)``:
  zero half of the time, half-normal otherwise. The maximum-likelihood sigma of the positive
  pixels is ``sqrt(mean(x^2))`` over them (the zeros are the censored half and carry no scale).
- ``rician``: the magnitude of a complex Gaussian, so a background pixel is Rayleigh(sigma); its
  maximum-likelihood sigma is ``sqrt(mean(x^2) / 2)``.

Pixels clipped at 1 are left out (censored above; a background pixel reaches 1 only for sigma
near 1). :func:`complementary_sigma` gives the noise to add so that the total matches a training
level, ``sigma_add^2 = sigma_train^2 - sigma_hat^2`` (0 when the image is already as noisy), and
:func:`add_complementary_noise` adds it. Gaussian noise adds in variance once the negative half
that the clipping hid is given back to the zero pixels; for ``rician`` the magnitude is given a
uniformly random phase before complex noise is added, which is exact on the background (a Rayleigh
magnitude with a uniform phase is a complex Gaussian) and, where the signal dominates, the usual
high-SNR approximation.
"""

from __future__ import annotations

import numpy as np

from robustmri.data.noise import add_gaussian_noise

#: The noise laws a background sigma can be estimated for.
ESTIMABLE = ("gaussian", "rician")
#: Fewer usable background pixels than this and the estimate is refused (its relative error ~ 1/sqrt(2n)).
MIN_BACKGROUND_PIXELS = 64
#: The frame the noise is estimated on, as a share of each side: 2 px at 64 px, 8 px at 256 px. The head
#: preprocessing leaves a margin of 5 % of the head's longer side, about 4.5 % of the image, so a wider frame
#: reaches into the head: on clean figshare validation slices at 64 px an 8 % frame gave a Gaussian sigma-hat of
#: 50/255 (3 %: 0.7/255), and under noise of 32/255, 48/255 (3 %: 32.0/255).
BACKGROUND_FRAME = 0.03


def border_pixels(image: np.ndarray, width: float = BACKGROUND_FRAME) -> np.ndarray:
    """The pixels of a frame ``width`` (share of each side) wide around a 2-D image: where a head slice's
    background lies (the figshare slices, and any slice framed like them)."""
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"border_pixels: a 2-D image is needed, got shape {image.shape}")
    rows, cols = (max(1, int(round(width * n))) for n in image.shape)
    mask = np.zeros(image.shape, dtype=bool)
    mask[:rows], mask[-rows:], mask[:, :cols], mask[:, -cols:] = True, True, True, True
    return image[mask]


def estimate_sigma(background: np.ndarray, noise: str) -> float:
    """Maximum-likelihood noise sigma of ``background`` pixels (true signal zero) under ``noise``.

    Raises ValueError for another noise law or fewer than :data:`MIN_BACKGROUND_PIXELS` usable pixels.
    A noise-free background gives 0.
    """
    if noise not in ESTIMABLE:
        raise ValueError(f"estimate_sigma: noise must be one of {ESTIMABLE}, got {noise!r}")
    values = np.asarray(background, dtype=np.float64).ravel()
    values = values[values < 1.0]  # clipped at the top: censored, left out
    if len(values) < MIN_BACKGROUND_PIXELS:
        raise ValueError(f"estimate_sigma: {len(values)} usable background pixels, at least "
                         f"{MIN_BACKGROUND_PIXELS} needed")
    if noise == "gaussian":
        values = values[values > 0.0]  # the censored lower half carries no scale
        if len(values) == 0:  # every pixel zero: no noise
            return 0.0
    mean_square = float(np.mean(values ** 2))
    return float(np.sqrt(mean_square if noise == "gaussian" else mean_square / 2.0))


def image_sigma(image: np.ndarray, noise: str, width: float = BACKGROUND_FRAME) -> float:
    """The noise sigma of a 2-D image in [0, 1] under ``noise``, estimated on its frame (its background)."""
    return estimate_sigma(border_pixels(image, width), noise)


def complementary_sigma(sigma_train: float, sigma_hat: float) -> float:
    """The sigma to add so that noise of ``sigma_hat`` becomes ``sigma_train``: ``sqrt(max(t^2 - h^2, 0))``."""
    if sigma_train < 0 or sigma_hat < 0:
        raise ValueError(f"complementary_sigma: sigmas must be >= 0, got {sigma_train} and {sigma_hat}")
    return float(np.sqrt(max(sigma_train ** 2 - sigma_hat ** 2, 0.0)))


def add_complementary_noise(image: np.ndarray, noise: str, sigma_hat: float, sigma_train: float,
                            rng: np.random.Generator) -> np.ndarray:
    """``image`` (in [0, 1], noise of ``sigma_hat`` under ``noise``) made as noisy as ``sigma_train``: noise of
    :func:`complementary_sigma` added, clipped to [0, 1]; the image itself when it is already as noisy.

    ``gaussian``: the clipping at 0 hid the negative half of the first noise, so each zero pixel is first given
    back a draw from that hidden half (N(0, sigma_hat^2) below 0) and the sum is the clipped N(0, sigma_train^2)
    a training image had. ``rician``: the magnitude gets a uniformly random phase before complex noise is added.
    """
    if noise not in ESTIMABLE:
        raise ValueError(f"add_complementary_noise: noise must be one of {ESTIMABLE}, got {noise!r}")
    sigma_add = complementary_sigma(sigma_train, sigma_hat)
    if sigma_add == 0:
        return image
    if noise == "gaussian":
        hidden = -np.abs(rng.normal(0.0, sigma_hat, size=image.shape)) if sigma_hat > 0 else 0.0
        return add_gaussian_noise(np.where(image <= 0, hidden, image), sigma_add, rng).astype(image.dtype, copy=False)
    phase = rng.uniform(0.0, 2.0 * np.pi, size=image.shape)
    real = image * np.cos(phase) + rng.normal(0.0, sigma_add, size=image.shape)
    imag = image * np.sin(phase) + rng.normal(0.0, sigma_add, size=image.shape)
    return np.clip(np.hypot(real, imag), 0.0, 1.0).astype(image.dtype, copy=False)
