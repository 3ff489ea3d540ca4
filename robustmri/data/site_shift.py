"""Controlled re-renderings of a raw 2-D slice that mimic another site's framing and exposure.

A model trained on the figshare slices can fall to chance on another hospital's slices
that show the same anatomy framed differently (a tight, non-square crop around the head,
a wider field of view) or exposed differently (brighter, lower contrast, an intensity
bias, softer). Each shift here changes one such property of a RAW slice (before any
preprocessing) in a known way, so that the drop of a model, and what a preprocessing
undoes, can be measured shift by shift.

Every shift is ``fn(image, rng) -> image``: a finite 2-D float32 array in the raw
intensity units of ``image`` (the shape may change), deterministic for the state of the
numpy ``Generator`` ``rng``. Shifts that need the head use
:func:`robustmri.data.preprocessing.head_mask` and raise its ``ValueError`` when none is
found; every shift refuses a constant image. Regions added around the slice take the
image minimum (the background).

The site-shift bench (:mod:`robustmri.bench.shifts`, ``scripts/benchmark.py --profile shift_cpu``) renders the
validation and test splits under every shift; training uses :mod:`robustmri.data.augmentation` instead.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from robustmri.data.preprocessing import _as_finite_2d, extract_window, head_box, head_mask

#: Largest extra margin of the tight crops, relative to the head's longer side (drawn uniformly from 0).
TIGHT_MARGIN = 0.03
#: Range of the total padding of ``fov_loose``, relative to each side of the slice.
LOOSE_PADDING = (0.4, 0.6)
#: Range of the long/short side ratio of the non-square crops.
NON_SQUARE_RATIO = (1.25, 1.5)
#: Largest relative change of the multiplicative bias field.
BIAS_AMPLITUDE = 0.2
#: Gaussian sigma of ``blur``, in pixels of the slice as given (its native resolution).
BLUR_SIGMA = 1.5
#: Angle of ``rotate_10``, degrees (counter-clockwise as displayed).
ROTATION_DEGREES = 10.0
#: ``contrast_low`` keeps this fraction of the intensity range, about the head's median.
LOW_CONTRAST_FACTOR = 0.5


def _range(image: np.ndarray) -> tuple[float, float]:
    low, high = float(image.min()), float(image.max())
    if not high > low:
        raise ValueError(f"constant image (every pixel is {low:g}): nothing to shift")
    return low, high


def _check(image: np.ndarray) -> np.ndarray:
    image = _as_finite_2d(image).astype(np.float32, copy=False)
    _range(image)
    return image


def identity(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``none``: the slice itself (a float32 copy)."""
    return np.array(_check(image), dtype=np.float32, copy=True)


def _tight_box(image: np.ndarray, rng: np.random.Generator) -> tuple[float, float, int, int]:
    """Centre (row, col) and size (height, width) of the head's box plus a small random margin."""
    top, left, height, width = head_box(head_mask(image))
    margin = int(round(rng.uniform(0.0, TIGHT_MARGIN) * max(height, width)))
    return top + (height - 1) / 2, left + (width - 1) / 2, height + 2 * margin, width + 2 * margin


def _window(image: np.ndarray, centre_row: float, centre_col: float, height: int, width: int) -> np.ndarray:
    top = int(math.floor(centre_row - (height - 1) / 2 + 0.5))
    left = int(math.floor(centre_col - (width - 1) / 2 + 0.5))
    return extract_window(image, top, left, height, width, fill=float(image.min()))


def fov_tight(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A square crop just around the head (margin 0 to 3 % of its longer side); background fills any overflow."""
    image = _check(image)
    row, col, height, width = _tight_box(image, rng)
    side = max(height, width)
    return _window(image, row, col, side, side)


def fov_loose(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A wider field of view: background added around the slice (40 to 60 % of each side in all,
    split at random between the two ends), so the head is smaller in the image."""
    image = _check(image)
    fraction = rng.uniform(*LOOSE_PADDING)
    pads = []
    for length in image.shape:
        total = int(round(fraction * length))
        before = int(round(rng.uniform(0.3, 0.7) * total))
        pads.append((before, total - before))
    return np.pad(image, pads, constant_values=float(image.min()))


def _non_square(image: np.ndarray, rng: np.random.Generator, wide: bool) -> np.ndarray:
    image = _check(image)
    row, col, height, width = _tight_box(image, rng)
    ratio = rng.uniform(*NON_SQUARE_RATIO)
    if wide:
        width = max(width, int(round(ratio * height)))
    else:
        height = max(height, int(round(ratio * width)))
    return _window(image, row, col, height, width)


def non_square_wide(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A tight crop around the head, wider than high (width/height 1.25 to 1.5, or the head's own if wider)."""
    return _non_square(image, rng, wide=True)


def non_square_tall(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A tight crop around the head, higher than wide (height/width 1.25 to 1.5, or the head's own if higher)."""
    return _non_square(image, rng, wide=False)


def _intensity_curve(image: np.ndarray, curve) -> np.ndarray:
    """Apply ``curve`` to the min-max scaled slice, then map back to the slice's original range."""
    image = _check(image)
    low, high = _range(image)
    unit = (image.astype(np.float64) - low) / (high - low)
    return (low + (high - low) * curve(unit)).astype(np.float32)


def gamma(value: float):
    """The shift ``x -> x ** value`` on the min-max scaled slice (below 1: brighter), in the original range."""

    def shift(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return _intensity_curve(image, lambda unit: unit**value)

    shift.__name__ = f"gamma_{value:g}"
    shift.__doc__ = f"Gamma {value:g} on the min-max scaled slice, back in the original intensity range."
    return shift


def contrast_low(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The intensity range compressed to half about the head's median (raw range halved, the head's level kept).

    This is an increasing linear change of intensity: min-max scaling and the head's
    percentile scaling both undo it exactly, so it is the control among the shifts (a
    model whose output moves under it is not seeing the preprocessed slice).
    """
    image = _check(image)
    median = float(np.median(image[head_mask(image)]))
    return (median + LOW_CONTRAST_FACTOR * (image.astype(np.float64) - median)).astype(np.float32)


def _bias_field(image: np.ndarray, rng: np.random.Generator, amplitude: float) -> np.ndarray:
    image = _check(image)
    low = float(image.min())
    mask = head_mask(image)
    top, left, height, width = head_box(mask)
    rows = np.clip((np.arange(image.shape[0]) - (top + (height - 1) / 2)) / max((height - 1) / 2, 1), -1, 1)
    cols = np.clip((np.arange(image.shape[1]) - (left + (width - 1) / 2)) / max((width - 1) / 2, 1), -1, 1)
    rows, cols = np.meshgrid(rows, cols, indexing="ij")
    terms = np.stack([cols, rows, cols**2, rows**2, cols * rows])
    poly = np.tensordot(rng.normal(size=len(terms)), terms, axes=1)
    poly -= poly[mask].mean()
    poly /= np.abs(poly[mask]).max()
    field = 1.0 + amplitude * poly
    return (low + (image.astype(np.float64) - low) * field).astype(np.float32)


def bias_field(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A smooth multiplicative field, as a receive coil's sensitivity: a random quadratic polynomial of
    position over the head's bounding box (held at the box's edge beyond it), centred and scaled to
    +-20 % at its extreme within the head, applied to the intensities above the slice's minimum."""
    return _bias_field(image, rng, BIAS_AMPLITUDE)


def bias(amplitude: float):
    """:func:`bias_field` scaled to +-``amplitude`` (a fraction, below 1) at its extreme within the head."""
    if not 0.0 <= float(amplitude) < 1.0:
        raise ValueError(f"bias amplitude must lie in [0, 1), got {amplitude!r}")

    def shift(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return _bias_field(image, rng, float(amplitude))

    shift.__name__ = f"bias_{amplitude:g}"
    shift.__doc__ = f"The bias field of ``bias_field`` at +-{100 * amplitude:g} % within the head."
    return shift


def blur(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A softer image: Gaussian blur of sigma 1.5 px at the slice's own resolution."""
    from scipy import ndimage

    image = _check(image)
    return ndimage.gaussian_filter(image.astype(np.float64), sigma=BLUR_SIGMA, mode="nearest").astype(np.float32)


def downsample_2x(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Half the resolution: bilinear (antialiased) down by 2, then bilinear up to the original shape."""
    image = _check(image)
    height, width = image.shape
    small = Image.fromarray(image).resize((max(1, width // 2), max(1, height // 2)), Image.BILINEAR)
    return np.asarray(small.resize((width, height), Image.BILINEAR), dtype=np.float32)


def _rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    from scipy import ndimage

    image = _check(image)
    rotated = ndimage.rotate(image.astype(np.float64), degrees, reshape=False, order=1,
                             mode="constant", cval=float(image.min()))
    return rotated.astype(np.float32)


def rotate_10(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 10 degree in-plane rotation about the slice's centre, same shape and scale, background filled in."""
    return _rotate(image, ROTATION_DEGREES)


def rotate(degrees: float):
    """An in-plane rotation by ``degrees`` (counter-clockwise as displayed), as :func:`rotate_10`."""

    def shift(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return _rotate(image, float(degrees))

    shift.__name__ = f"rotate_{degrees:g}"
    shift.__doc__ = f"A {degrees:g} degree in-plane rotation about the slice's centre, background filled in."
    return shift


gamma_07 = gamma(0.7)
gamma_15 = gamma(1.5)


def tight_gamma_07(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A brighter, tightly cropped site: ``fov_tight`` then ``gamma_0.7``."""
    return gamma_07(fov_tight(image, rng), rng)


def tight_nonsquare_gamma_07_blur(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``non_square_tall`` (a tight crop of an axial head, longer front to back, is higher than wide),
    then ``gamma_0.7``, then ``blur``."""
    return blur(gamma_07(non_square_tall(image, rng), rng), rng)


#: The shifts by name: ``fn(raw_image, rng) -> raw_image``.
SHIFTS = {
    "none": identity,
    "fov_tight": fov_tight,
    "fov_loose": fov_loose,
    "non_square_wide": non_square_wide,
    "non_square_tall": non_square_tall,
    "gamma_0.7": gamma_07,
    "gamma_1.5": gamma_15,
    "contrast_low": contrast_low,
    "bias_field": bias_field,
    "blur": blur,
    "downsample_2x": downsample_2x,
    "rotate_10": rotate_10,
    "tight_gamma_0.7": tight_gamma_07,
    "tight_nonsquare_gamma_0.7_blur": tight_nonsquare_gamma_07_blur,
}


def shift_by_name(name: str):
    """The shift called ``name`` in :data:`SHIFTS`; ``ValueError`` naming the valid ones otherwise."""
    try:
        return SHIFTS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown site shift {name!r}; valid names: {', '.join(SHIFTS)}") from None


def render_shift(image: np.ndarray, name: str, seed: int = 0) -> np.ndarray:
    """The raw slice ``image`` under the shift ``name``, drawn with ``numpy.random.default_rng(seed)``."""
    shift = shift_by_name(name)
    return shift(_check(image), np.random.default_rng(seed))


def shift_examples_figure(image: np.ndarray, path: str | os.PathLike, seed: int = 0) -> Path:
    """Write one PNG showing ``image`` under every shift of :data:`SHIFTS` (titles: the names).

    All panels share the display window of the original slice (its min to max), so the
    intensity shifts are visible; each panel keeps its slice's shape. Returns the path.
    """
    from robustmri.outputs import image_grid

    image = _check(image)
    low, high = _range(image)
    image_grid([render_shift(image, name, seed) for name in SHIFTS], list(SHIFTS), path, ncols=5,
               suptitle=f"site shifts (seed {seed}; display window: the original slice's min to max)",
               vmin=low, vmax=high)
    return Path(path)
