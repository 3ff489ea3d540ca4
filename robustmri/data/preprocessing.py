"""The one intensity normalisation and resize used by training, evaluation and inference.

Keeping it in a single place is what guarantees that a deployed model sees images
prepared exactly as in training.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from robustmri.data.readers import ImageReadError, read_image

#: Written into exported models so that deployment can check it reproduces training.
INTENSITY_NORMALISATION = "per-image min-max to [0, 1], then bilinear resize (antialiased)"


def scale_intensity(image: np.ndarray) -> np.ndarray:
    """Min-max scale one image to [0, 1]; a constant image has no usable contrast."""
    low, high = float(image.min()), float(image.max())
    if not high > low:
        raise ValueError(f"constant image (every pixel is {low:g}): no contrast to classify")
    return ((image - low) / (high - low)).astype(np.float32)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a float image to ``size`` x ``size`` (antialiased when shrinking)."""
    if image.shape == (size, size):
        return image.astype(np.float32, copy=False)
    resized = Image.fromarray(image.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def preprocess(image: np.ndarray, size: int) -> np.ndarray:
    """Raw 2-D intensities to the network's [0, 1] ``size`` x ``size`` input."""
    return resize(scale_intensity(image), size)


def read_preprocessed(path: str, size: int) -> tuple[np.ndarray | None, str | None]:
    """``(image, None)``, or ``(None, reason)`` for an unreadable or constant image: callers count it and go on."""
    try:
        return preprocess(read_image(path), size), None
    except ImageReadError as err:
        return None, err.reason
    except ValueError as err:  # constant image
        return None, str(err)
