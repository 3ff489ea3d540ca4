"""The preprocessing used by training, evaluation and inference: raw 2-D intensities to the network's input.

Three preprocessings exist, by name (:data:`PREPROCESSING`; the bundle option ``preprocess``):

- ``minmax``: per-image min-max scaling, then a square resize (:func:`preprocess_minmax`);
- ``head``: the head found first, cropped keeping its aspect ratio, intensities scaled by the
  head's own percentiles, then the resize (:func:`preprocess_head`);
- ``head_landmarks``: ``head``'s crop, then the head's intensity histogram standardised by
  landmarks (Nyúl and Udupa's piecewise-linear mapping to a standard scale), then the resize
  (:func:`preprocess_head_landmarks`): a site's contrast curve is undone, not only its scale.

A trained model records the name it was trained with (``model_metadata.json``, the ONNX
metadata, together with the exact description of :data:`DESCRIPTIONS`), and every deployed
path (file inference, DICOM inference, MONAI Label) calls the same function by that name:
keeping it in a single place is what guarantees that a deployed model sees images prepared
exactly as in training.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from robustmri.data.readers import ImageReadError, read_image

#: Written into exported models so that deployment can check it reproduces training.
INTENSITY_NORMALISATION = "per-image min-max to [0, 1], then bilinear resize (antialiased)"
#: The preprocessing the product trains with (``train.json``'s ``preprocess``): the default of every signature
#: that takes one, so a library call prepares images as the bundle does.
DEFAULT_PREPROCESS = "head"


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


def preprocess_minmax(image: np.ndarray, size: int) -> np.ndarray:
    """Raw 2-D intensities to the network's [0, 1] ``size`` x ``size`` input."""
    return resize(scale_intensity(image), size)


def read_preprocessed(path: str, size: int, name: str = DEFAULT_PREPROCESS) -> tuple[np.ndarray | None, str | None]:
    """``(image, None)``, or ``(None, reason)`` for an unreadable, constant or headless image: callers count it
    and go on. ``name``: the preprocessing (:data:`PREPROCESSING`)."""
    function = preprocessing_by_name(name)
    try:
        return function(read_image(path), size), None
    except ImageReadError as err:
        return None, err.reason
    except ValueError as err:  # constant image
        return None, str(err)


# --- Head-based preprocessing (for models that travel between sites) ----------------------
#
# Min-max scaling and a plain square resize depend on how a site frames and exposes its
# slices: a tight, non-square crop is stretched, and one bright pixel or a wide background
# changes the scale of every tissue. The functions below find the head first, crop to it
# keeping its aspect ratio, and scale intensities from the head's own percentiles
# (``preprocess: "head"``; docs/results.md measures it under site shifts).

#: :func:`head_mask` works on a copy of at most this many pixels a side (speed; the mask's edge is
#: then exact to about one pixel of that copy).
HEAD_MASK_WORKING_SIZE = 256
#: Radius of the closing in :func:`head_mask`, relative to the shorter side of its working copy.
HEAD_MASK_CLOSING = 0.02
#: :func:`head_mask` thresholds at this fraction of the way from the minimum to Otsu's threshold.
#: Otsu's own cut lies between dark and bright tissue in T1 slices (it drops the scalp and, in
#: sagittal slices, parts of the brain); half of it separates the head from the background.
HEAD_THRESHOLD_FRACTION = 0.5
#: A foreground smaller than this fraction of the image is "no head found".
HEAD_MASK_MIN_FRACTION = 0.01
#: Margin of :func:`crop_to_head` and :func:`preprocess_head`, relative to the head's longer side.
HEAD_CROP_MARGIN = 0.05
#: Percentiles of the head's intensities mapped to 0 and 1 by :func:`preprocess_head`.
HEAD_PERCENTILES = (1.0, 99.0)

#: Describes :func:`preprocess_head` exactly, as :data:`INTENSITY_NORMALISATION` describes :func:`preprocess_minmax`.
HEAD_NORMALISATION = (
    "head mask (on a copy of at most 256 px a side, Gaussian sigma 1 px: pixels >= half-way from the minimum to "
    "Otsu's threshold (256 bins); closing by a disk of radius 2 % of the shorter side; holes filled, the head "
    "closed along the image edge where it leaves the image; largest 8-connected region); crop to the mask's "
    "bounding box plus 5 % of its longer side on every side, padded with the image minimum to a square centred "
    "on the box; 1st-99th percentile of the head's pixels to [0, 1], clipped; then bilinear resize (antialiased)"
)

#: Landmarks of :func:`standardise_landmarks_in_head`: percentiles of the head's intensities (Nyúl and Udupa's
#: deciles, with the 1st and 99th percentiles as the ends, as :data:`HEAD_PERCENTILES`).
LANDMARK_PERCENTILES = (1.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 99.0)
#: The standard scale the landmarks are mapped to: evenly spaced on [0, 1]. Fixed, not learned from a training
#: set as in Nyúl and Udupa, so that a model carries no site-dependent state and every deployed path applies the
#: same function by name.
LANDMARK_SCALE = tuple(float(v) for v in np.linspace(0.0, 1.0, len(LANDMARK_PERCENTILES)))
#: Describes :func:`preprocess_head_landmarks` exactly.
HEAD_LANDMARKS_NORMALISATION = HEAD_NORMALISATION.replace(
    "1st-99th percentile of the head's pixels to [0, 1], clipped",
    "the head's pixels' percentiles 1, 10, 20, ..., 90, 99 mapped piecewise-linearly to 0, 0.1, ..., 1 "
    "(landmark histogram standardisation), clipped")


def _as_finite_2d(image: np.ndarray, name: str = "image") -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"{name} must be a 2-D slice, got an array of shape {image.shape}")
    if image.size == 0:
        raise ValueError(f"{name} is empty (shape {image.shape}): no head to find")
    if not np.isfinite(image).all():
        raise ValueError(f"{name} has NaN/Inf pixels")
    return image


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values``: the cut that maximises the between-class variance.

    The histogram spans ``[min, max]``, so the threshold follows any increasing linear change
    of intensity exactly. Pixels ``>= threshold`` are the bright class, as in the histogram's bins.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    low, high = float(values.min()), float(values.max())
    if not high > low:
        raise ValueError(f"constant image (every pixel is {low:g}): no foreground to separate")
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts)[:-1].astype(np.float64)  # class "<= edge k+1", k = 0..bins-2
    weight_high = counts.sum() - weight_low
    sum_low = np.cumsum(counts * centres)[:-1]
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (np.sum(counts * centres) - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[1:-1][int(np.argmax(between))])


def _disk(radius: int) -> np.ndarray:
    offsets = np.arange(-radius, radius + 1)
    return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2


def _fill_holes_closing_cuts(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of ``mask``, a region that leaves the image counting as closed along the image edge.

    On each edge the stretch between the first and the last mask pixel touching it is closed
    (where the field of view cuts the head), so dark tissue inside a cut head is filled; the
    background in the corners beyond those stretches stays open.
    """
    from scipy import ndimage

    padded = np.pad(mask, 1)
    for edge, line in ((0, mask[0, :]), (-1, mask[-1, :])):  # top, bottom
        touching = np.flatnonzero(line)
        if touching.size:
            padded[edge, touching[0] + 1:touching[-1] + 2] = True
    for edge, line in ((0, mask[:, 0]), (-1, mask[:, -1])):  # left, right
        touching = np.flatnonzero(line)
        if touching.size:
            padded[touching[0] + 1:touching[-1] + 2, edge] = True
    return ndimage.binary_fill_holes(padded)[1:-1, 1:-1]


def head_mask(image: np.ndarray) -> np.ndarray:
    """The head (foreground) of a 2-D slice as a bool array of the image's shape.

    Works on a copy of at most :data:`HEAD_MASK_WORKING_SIZE` pixels a side (bilinear,
    antialiased), smoothed by a Gaussian of sigma 1 px: pixels at or above half of the way
    from the minimum to Otsu's threshold; a closing by a disk of radius 2 % of the shorter
    side bridges the dark skull and CSF; holes are filled (a head cut by the field of view
    counts as closed along the image edge); the largest 8-connected region is the head,
    mapped back to the image's shape (nearest).

    Raises ``ValueError`` for a non-2-D, empty, non-finite or constant image, and when the
    head covers less than 1 % of the image (no head found).
    """
    from scipy import ndimage

    image = _as_finite_2d(image)
    low, high = float(image.min()), float(image.max())
    if not high > low:
        raise ValueError(f"constant image (every pixel is {low:g}): no head to find")
    height, width = image.shape
    work = image.astype(np.float32)
    factor = HEAD_MASK_WORKING_SIZE / max(height, width)
    if factor < 1:
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        work = np.asarray(Image.fromarray(work).resize(size, Image.BILINEAR), dtype=np.float32)
    smooth = ndimage.gaussian_filter(work.astype(np.float64), sigma=1.0, mode="nearest")
    low = float(smooth.min())
    if not float(smooth.max()) > low:
        raise ValueError("image has no contrast after smoothing: no head to find")
    foreground = smooth >= low + HEAD_THRESHOLD_FRACTION * (otsu_threshold(smooth) - low)
    radius = max(1, int(round(HEAD_MASK_CLOSING * min(smooth.shape))))
    foreground = ndimage.binary_closing(np.pad(foreground, radius), _disk(radius))[radius:-radius, radius:-radius]
    labels, n = ndimage.label(_fill_holes_closing_cuts(foreground), structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        raise ValueError("no foreground above the threshold: no head found")
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    mask = labels == int(np.argmax(sizes))
    if mask.shape != image.shape:
        rows = np.minimum(((np.arange(height) + 0.5) * mask.shape[0] / height).astype(int), mask.shape[0] - 1)
        cols = np.minimum(((np.arange(width) + 0.5) * mask.shape[1] / width).astype(int), mask.shape[1] - 1)
        mask = mask[np.ix_(rows, cols)]
    fraction = float(mask.mean())
    if fraction < HEAD_MASK_MIN_FRACTION:
        raise ValueError(f"no head found: the largest foreground region covers {100 * fraction:.2g} % of the image "
                         f"(< {100 * HEAD_MASK_MIN_FRACTION:g} %)")
    return mask


def _check_mask(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"mask shape {mask.shape} differs from the image's {shape}")
    mask = mask.astype(bool, copy=False)
    if not mask.any():
        raise ValueError("mask is empty: no head")
    return mask


def head_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of the bounding box of a non-empty bool mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("mask is empty: no head")
    return int(rows[0]), int(cols[0]), int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def square_head_window(mask: np.ndarray, margin: float = HEAD_CROP_MARGIN) -> tuple[int, int, int]:
    """``(top, left, side)`` of the square around the mask's box plus ``margin`` x its longer side per side.

    The square is centred on the box; it may reach outside the image (see :func:`extract_window`).
    """
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    top, left, height, width = head_box(mask)
    longer = max(height, width)
    side = longer + 2 * int(round(margin * longer))
    return top + (height - side) // 2, left + (width - side) // 2, side


def extract_window(image: np.ndarray, top: int, left: int, height: int, width: int, fill: float) -> np.ndarray:
    """The ``height`` x ``width`` window at ``(top, left)``; the part outside the image is ``fill``."""
    out = np.full((height, width), fill, dtype=image.dtype)
    rows = slice(max(top, 0), min(top + height, image.shape[0]))
    cols = slice(max(left, 0), min(left + width, image.shape[1]))
    if rows.stop > rows.start and cols.stop > cols.start:
        out[rows.start - top:rows.stop - top, cols.start - left:cols.stop - left] = image[rows, cols]
    return out


def crop_to_head(image: np.ndarray, mask: np.ndarray | None = None, margin: float = HEAD_CROP_MARGIN) -> np.ndarray:
    """Crop to the head's bounding box plus ``margin`` (relative to its longer side) on every side,
    padded with the background value (the image minimum) to a square centred on the head.

    Nothing is resampled, so the head keeps its aspect ratio. ``mask`` defaults to
    :func:`head_mask` of the image. The result has the image's dtype.
    """
    image = _as_finite_2d(image)
    mask = head_mask(image) if mask is None else _check_mask(mask, image.shape)
    top, left, side = square_head_window(mask, margin)
    return extract_window(image, top, left, side, side, fill=image.min())


def standardise_in_head(image: np.ndarray, mask: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Map the ``low`` and ``high`` percentiles of the pixels inside ``mask`` to 0 and 1; clip to [0, 1].

    Only the head's pixels set the scale, so a wider background, a bright spot outside the
    head or a different window/level change it little. Returns float32. Raises
    ``ValueError`` for bad percentiles, a mask that does not fit or is empty, and a head
    without contrast.
    """
    image = _as_finite_2d(image)
    mask = _check_mask(mask, image.shape)
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got low={low}, high={high}")
    lo, hi = np.percentile(image[mask].astype(np.float64), [low, high])
    if not hi > lo:
        raise ValueError(f"no contrast inside the head (percentiles {low:g} and {high:g} are both {lo:g})")
    scaled = (image.astype(np.float64) - lo) / (hi - lo)
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)


def standardise_landmarks_in_head(image: np.ndarray, mask: np.ndarray,
                                  percentiles=LANDMARK_PERCENTILES, scale=LANDMARK_SCALE) -> np.ndarray:
    """Map the ``percentiles`` of the pixels inside ``mask`` piecewise-linearly onto ``scale``; clip to its ends.

    Nyúl and Udupa's landmark standardisation with a fixed standard scale: between two landmarks the map
    is linear, so the order of intensities is kept while each site's contrast curve (a gamma, a different
    T1 weighting) is brought to one histogram shape. Landmarks that coincide (a flat stretch of the
    histogram) are separated by a negligible step so the map stays increasing. Returns float32; raises
    ``ValueError`` for percentiles and scale that do not match or do not increase, a mask that does not
    fit or is empty, and a head without contrast.
    """
    image = _as_finite_2d(image)
    mask = _check_mask(mask, image.shape)
    percentiles, scale = np.asarray(percentiles, dtype=np.float64), np.asarray(scale, dtype=np.float64)
    if percentiles.shape != scale.shape or len(percentiles) < 2:
        raise ValueError(f"percentiles and scale must be two sequences of the same length >= 2, got "
                         f"{len(percentiles)} and {len(scale)}")
    if np.any(np.diff(percentiles) <= 0) or np.any(np.diff(scale) <= 0) or percentiles[0] < 0 or percentiles[-1] > 100:
        raise ValueError("percentiles (within [0, 100]) and scale must be strictly increasing")
    landmarks = np.percentile(image[mask].astype(np.float64), percentiles)
    span = landmarks[-1] - landmarks[0]
    if not span > 0:
        raise ValueError(f"no contrast inside the head (percentiles {percentiles[0]:g} and {percentiles[-1]:g} are "
                         f"both {landmarks[0]:g})")
    # ties between inner landmarks: a step of 1e-9 of the span per landmark keeps np.interp's abscissae increasing
    landmarks = np.maximum.accumulate(landmarks + np.arange(len(landmarks)) * 1e-9 * span)
    return np.interp(image.astype(np.float64), landmarks, scale).astype(np.float32)


def head_window(image: np.ndarray) -> tuple[int, int, int]:
    """``(top, left, side)`` of the square the head preprocessings crop from ``image`` (in its pixels), so that a
    position in the raw slice can be found in the network's input (pixel ``(i, j)`` of a ``size`` input is centred on
    ``(top + (i + 0.5) * side / size, left + (j + 0.5) * side / size)``)."""
    return square_head_window(head_mask(_as_finite_2d(image)), HEAD_CROP_MARGIN)


def _head_crop(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The head's square crop of ``image`` and of its mask (:func:`head_mask`, :func:`square_head_window`)."""
    image = _as_finite_2d(image)
    mask = head_mask(image)
    top, left, side = square_head_window(mask, HEAD_CROP_MARGIN)
    return (extract_window(image, top, left, side, side, fill=image.min()),
            extract_window(mask, top, left, side, side, fill=False))


def preprocess_head(image: np.ndarray, size: int) -> np.ndarray:
    """Raw 2-D intensities to a [0, 1] ``size`` x ``size`` input framed and scaled by the head.

    :func:`head_mask`, :func:`crop_to_head` (the mask cropped alike), :func:`standardise_in_head`
    with :data:`HEAD_PERCENTILES`, then :func:`resize`; :data:`HEAD_NORMALISATION` says it in words.
    Raises ``ValueError`` when no head is found (as :func:`preprocess_minmax` does for a constant image).
    """
    cropped, cropped_mask = _head_crop(image)
    return resize(standardise_in_head(cropped, cropped_mask, *HEAD_PERCENTILES), size)


def preprocess_head_landmarks(image: np.ndarray, size: int) -> np.ndarray:
    """:func:`preprocess_head` with :func:`standardise_landmarks_in_head` in place of the two-percentile scaling;
    :data:`HEAD_LANDMARKS_NORMALISATION` says it in words."""
    cropped, cropped_mask = _head_crop(image)
    return resize(standardise_landmarks_in_head(cropped, cropped_mask), size)


#: Preprocessing by name: ``fn(raw_image, size) -> float32 [size, size] in [0, 1]``.
PREPROCESSING = {"minmax": preprocess_minmax, "head": preprocess_head, "head_landmarks": preprocess_head_landmarks}
#: What each preprocessing does, in words: written beside a trained model and into its ONNX export, and
#: compared on loading, so that a model is never fed images prepared by a changed function.
DESCRIPTIONS = {"minmax": INTENSITY_NORMALISATION, "head": HEAD_NORMALISATION,
                "head_landmarks": HEAD_LANDMARKS_NORMALISATION}
#: The preprocessing of models whose records predate the choice (they were all trained with min-max scaling).
LEGACY_PREPROCESS = "minmax"


def preprocessing_by_name(name: str):
    """The preprocessing function called ``name`` in :data:`PREPROCESSING`."""
    try:
        return PREPROCESSING[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown preprocessing {name!r}; valid names: {', '.join(sorted(PREPROCESSING))}") from None


def check_preprocess(name: str, description: str | None = None, source: str = "the model") -> str:
    """``name`` if this library has a preprocessing of that name that matches ``description`` (when given).

    ``ValueError`` otherwise, naming ``source``: a model trained with a preprocessing this
    library does not have, or has changed since, would see images prepared differently from training.
    """
    preprocessing_by_name(name)
    if description is not None and description != DESCRIPTIONS[name]:
        raise ValueError(f"{source} was prepared with preprocessing {name!r} described as {description!r}; this "
                         f"library's {name!r} is {DESCRIPTIONS[name]!r}: results would not reproduce training")
    return name


def preprocess_for_description(description: str, source: str = "the model") -> str:
    """The name of the preprocessing described exactly by ``description`` (records that carry no name)."""
    for name, text in DESCRIPTIONS.items():
        if text == description:
            return name
    raise ValueError(f"{source} was prepared with a preprocessing this library does not have ({description!r}); "
                     f"known: {', '.join(f'{n}: {t!r}' for n, t in DESCRIPTIONS.items())}")
