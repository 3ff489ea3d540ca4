"""Shift families for an honest site-shift bench: each shift tagged with its family and severity.

The first site-shift bench (:data:`robustmri.data.site_shift.SHIFTS`) tested the training
augmentation against itself: its intensity and rotation shifts lie inside the augmentation's
ranges and families, its blur and downsampling act at the native size (sub-pixel once the slice
is resized to the training size) and its framing is built with the head detector that the head
preprocessing uses to undo it. Here every shift carries

- its **family**: a family of :data:`robustmri.data.augmentation.FAMILIES` (``framing``,
  ``rotation``, ``resolution``, ``blur``, ``bias_field``, ``intensity_curve``) or one the
  augmentation does not have (:data:`NEW_FAMILIES`: ``noise``, ``artefact``, ``tissue_contrast``);
- its **severity**: ``in-range`` (inside the default augmentation's range for that family),
  ``out-of-range`` (same family, beyond it) or ``new family``, with the parameters that decide
  it (:attr:`FamilyShift.measures`, in the augmentation's own units and at the TRAINING size).
  :func:`severity_under` recomputes the severity from a :class:`SiteShiftAugmentation`'s ranges,
  and a test holds the tags to the defaults: widening the augmentation without re-tagging fails it.

The default augmentation's ranges (fields of :class:`SiteShiftAugmentation`) and the shifts on each side:

================  =====================================================  =======================  ======================
family            augmentation field: default range                      in-range                 out-of-range
================  =====================================================  =======================  ======================
framing           ``scale`` U[0.85, 1.15], ``aspect`` log-U[0.8, 1.25]   frame_pad_0.1 (0.91),    fov_loose (0.63-0.71),
                                                                         frame_crop_0.9 (1.11)    frame_pad_wide (0.82,
                                                                                                  aspect 1.5), skull_cut
                                                                                                  (1.67)
rotation          ``rotation_degrees`` 10: U[-10, 10] degrees            rotate_10                rotate_20
intensity_curve   ``gamma`` log-U[0.67, 1.5], ``contrast`` U[0.7, 1.3]   gamma_0.7, gamma_1.5     gamma_0.5, gamma_2
bias_field        ``bias_amplitude`` 0.2: amplitude U[0, 0.2]            bias_field (0.2)         bias_0.4
blur              ``blur_sigma`` U[0, 1] training px                     blur_0.8px               blur_2px
resolution        ``downsample`` U[1, 2]                                 downsample_1.5x          downsample_3x
================  =====================================================  =======================  ======================

New families: ``gibbs_ringing`` and ``motion`` (artefact), ``tissue_contrast``, ``rician_0.05`` and
``rician_0.2`` (noise). The first bench's framing built on the head detector (``fov_tight``,
``non_square_*``) is not here: the head preprocessing undoes it by construction.

Sizes and noise levels are stated as the network sees them, at the training size ``size`` after the
preprocessing ``preprocess`` (:func:`training_geometry`): a length of ``S`` training pixels is
``S * side / size`` raw pixels, ``side`` the raw square the preprocessing resizes (the head
preprocessing's window around the head, the product's; min-max's whole frame), and a noise sigma is a
fraction of the raw intensity span that the preprocessing maps to [0, 1] (the head's 1st-99th
percentiles; min-max's range), as the training noise is. Only this sizing reads the head detector; where
it finds no head the head preprocessing cannot prepare the slice either. Rendered once for the head
preprocessing, a blur of 2 px is about 2 px at its input; min-max, resizing the larger frame, sees it
smaller by the head window's share of the frame.

Framing here never looks at the intensities: every window and padding is defined on the image
frame (its shape and a random offset), so it is independent of
:func:`robustmri.data.preprocessing.head_mask` by construction; the head preprocessing may or may
not undo it, which is what the bench measures. Cropping that cuts the skull (``skull_cut``) is a
window too small to hold the head.

Every shift is ``fn(image, rng) -> image`` on the RAW slice, as those of
:mod:`robustmri.data.site_shift`: finite float32, raw intensity units, deterministic for the
generator's state; a constant image is refused. :func:`family_shifts` builds them for a training
size; the bench seeds each with ``[slice id, stream]`` (:attr:`FamilyShift.stream`, a digest of the
name, so adding a shift does not change the others' draws).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image

from robustmri.data.augmentation import FAMILIES, SiteShiftAugmentation
from robustmri.data.preprocessing import (
    DEFAULT_PREPROCESS,
    HEAD_CROP_MARGIN,
    HEAD_PERCENTILES,
    PREPROCESSING,
    head_mask,
    square_head_window,
)
from robustmri.data.site_shift import _check, _range, bias, bias_field, fov_loose, gamma, identity, rotate

#: The unshifted reference.
REFERENCE = "none"
#: Severities, in the order the bench reports them.
IN_RANGE, OUT_OF_RANGE, NEW_FAMILY = "in-range", "out-of-range", "new family"
SEVERITIES = (IN_RANGE, OUT_OF_RANGE, NEW_FAMILY)
#: Families of real-world shifts that the training augmentation does not have. The training images of the
#: noisy protocol do carry Gaussian noise (robustmri.data.noise), but no augmentation draws it.
NEW_FAMILIES = ("noise", "artefact", "tissue_contrast")

#: Share of the training size's k-space lines kept along each axis by ``gibbs_ringing``: 0.6 is a resolution
#: loss of 1 / 0.6 = 1.67 at the training size, inside the augmentation's downsampling range, so what the shift
#: adds is the ringing of a sharp truncation, not a coarser image.
GIBBS_KEPT = 0.6
#: Translation of the head during ``motion``, training pixels.
MOTION_TRANSLATION = 3.0
#: Share of the phase-encode lines acquired before the head moved, uniform.
MOTION_ONSET = (0.55, 0.75)
#: Number of intensity bands of ``tissue_contrast`` (cut at the foreground's quantiles).
TISSUE_BANDS = 3
#: Exponent of each band's curve, log-uniform.
TISSUE_EXPONENT = (0.5, 2.0)
#: Each band's share of the output range is its input share times a factor, log-uniform, then renormalised.
TISSUE_WIDTH_FACTOR = (0.5, 2.0)
#: Pixels above this fraction of the raw range (from the minimum) are the foreground whose quantiles cut the bands.
TISSUE_FOREGROUND = 0.05
#: Rician noise levels: sigma per training pixel in units of the network's input. The noisy protocol trains with
#: Gaussian noise of sigma 32/255 = 0.125 on the prepared images: these are a lower and a higher level.
RICIAN_SIGMAS = (0.05, 0.2)
#: ``skull_cut`` keeps a square window of this share of the frame's shorter side: a zoom of 1 / 0.6 = 1.67.
SKULL_CUT_KEEP = 0.6


def training_geometry(image: np.ndarray, size: int, preprocess: str) -> tuple[float, float]:
    """``(raw pixels per training pixel, raw intensity per unit of the network's input)`` of ``image`` prepared
    by ``preprocess`` at ``size``: the head preprocessing's square window and 1st-99th percentiles of the head
    (:func:`robustmri.data.preprocessing.preprocess_head`), or min-max's whole frame and range."""
    if preprocess not in PREPROCESSING:
        raise ValueError(f"unknown preprocessing {preprocess!r}; valid: {', '.join(PREPROCESSING)}")
    image = _check(image)
    if preprocess == "minmax":
        low, high = _range(image)
        return max(image.shape) / float(size), high - low
    mask = head_mask(image)
    _, _, side = square_head_window(mask, HEAD_CROP_MARGIN)
    low, high = np.percentile(image[mask].astype(np.float64), HEAD_PERCENTILES)
    if not high > low:
        raise ValueError("no contrast inside the head")
    return side / float(size), float(high - low)


# ---------------------------------------------------------------------- framing on the frame


def frame_crop(keep: float, centred: bool = False):
    """A square window of ``keep`` times the frame's shorter side, at a uniformly random position inside the
    frame or ``centred``.

    Resized to the training size, the content is enlarged by ``1 / keep`` (the augmentation's ``scale``); a
    random position also moves it, which the augmentation never does. The rule reads the frame's shape
    only, never its intensities."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must lie in (0, 1], got {keep!r}")

    def shift(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        image = _check(image)
        side = max(1, int(round(keep * min(image.shape))))
        if centred:
            top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
        else:
            top = int(rng.integers(0, image.shape[0] - side + 1))
            left = int(rng.integers(0, image.shape[1] - side + 1))
        return np.array(image[top:top + side, left:left + side], dtype=np.float32)

    where = "centred" if centred else "at a random position"
    shift.__name__ = f"frame_crop_{keep:g}"
    shift.__doc__ = f"A square window of {keep:g} of the frame's shorter side, {where} (zoom {1 / keep:.2f})."
    return shift


def frame_pad(rows: float, cols: float, centred: bool = False):
    """Background (the slice's minimum) added around the frame: ``rows`` and ``cols`` times its height and width
    in all, split at random between the two ends of each axis, or evenly when ``centred``.

    Resized to the square training size, the frame of ``(1 + rows) H x (1 + cols) W`` shows the content at
    ``scale = 1 / sqrt((1 + rows)(1 + cols))`` and ``aspect = (1 + cols) / (1 + rows)`` of the augmentation's
    terms (a square slice). The rule reads the frame's shape only."""
    if rows < 0 or cols < 0:
        raise ValueError(f"padding must be >= 0, got rows={rows!r}, cols={cols!r}")

    def shift(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        image = _check(image)
        pads = []
        for fraction, length in zip((rows, cols), image.shape):
            total = int(round(fraction * length))
            before = total // 2 if centred else int(round(rng.uniform(0.0, 1.0) * total))
            pads.append((before, total - before))
        return np.pad(image, pads, constant_values=float(image.min()))

    shift.__name__ = f"frame_pad_{rows:g}_{cols:g}"
    shift.__doc__ = f"Background padding of {rows:g} of the height and {cols:g} of the width around the frame."
    return shift


def frame_pad_scale(rows: float, cols: float) -> tuple[float, float]:
    """The augmentation's ``(scale, aspect)`` of :func:`frame_pad` on a square slice."""
    return 1.0 / math.sqrt((1.0 + rows) * (1.0 + cols)), (1.0 + cols) / (1.0 + rows)


# ---------------------------------------------------------------------- resolution, at the training size


def blur_at(sigma: float, size: int, preprocess: str = DEFAULT_PREPROCESS):
    """A Gaussian blur of ``sigma`` pixels at the training size (:func:`training_geometry`)."""

    def shift(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        from scipy import ndimage

        image = _check(image)
        native = sigma * training_geometry(image, size, preprocess)[0]
        return ndimage.gaussian_filter(image.astype(np.float64), sigma=native, mode="nearest").astype(np.float32)

    shift.__name__ = f"blur_{sigma:g}px"
    shift.__doc__ = f"Gaussian blur of sigma {sigma:g} px at the training size."
    return shift


def downsample_at(factor: float, size: int, preprocess: str = DEFAULT_PREPROCESS):
    """Resolution lost by ``factor`` at the training size: the slice reduced (bilinear, antialiased) by
    ``factor`` training pixels a pixel (:func:`training_geometry`), then enlarged back to its own shape (bilinear)."""
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor!r}")

    def shift(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        image = _check(image)
        height, width = image.shape
        step = factor * training_geometry(image, size, preprocess)[0]
        small = Image.fromarray(image).resize((max(1, round(width / step)), max(1, round(height / step))),
                                              Image.BILINEAR)
        return np.asarray(small.resize((width, height), Image.BILINEAR), dtype=np.float32)

    shift.__name__ = f"downsample_{factor:g}x"
    shift.__doc__ = f"Resolution lost by {factor:g} at the training size (down, then back up, bilinear)."
    return shift


# ---------------------------------------------------------------------- artefacts (k-space)


def kept_band(length: int, cycles: int) -> np.ndarray:
    """Whether each of ``length`` DFT frequencies (numpy's order) lies within ``|k| <= cycles`` per field of view."""
    frequencies = np.fft.fftfreq(length) * length
    return np.abs(frequencies) <= cycles


def gibbs_ringing(size: int, preprocess: str = DEFAULT_PREPROCESS, kept: float = GIBBS_KEPT):
    """Gibbs ringing: k-space truncated to ``kept`` of the training size's lines along each axis.

    An MR image is the inverse Fourier transform of the k-space lines acquired; acquiring fewer
    lines and reconstructing without a window cuts the spectrum sharply, which convolves the image
    with a sinc and draws ripples parallel to every sharp edge (the skull, the ventricles). An axis of
    ``L`` raw pixels spans ``L / p`` training pixels (``p`` of :func:`training_geometry`); the band
    ``|k| <= floor(kept * L / (2 p))`` cycles per field of view keeps ``kept`` of them and is symmetric, so
    the truncated image of a real slice is real; it is returned as it is (a magnitude
    reconstruction would fold the undershoots below the background up again)."""

    def shift(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        image = _check(image)
        pixel = training_geometry(image, size, preprocess)[0]
        rows, cols = (kept_band(length, int(math.floor(kept * length / (2.0 * pixel)))) for length in image.shape)
        spectrum = np.fft.fft2(image.astype(np.float64))
        band = np.outer(rows, cols)
        return np.fft.ifft2(spectrum * band).real.astype(np.float32)

    shift.__name__ = "gibbs_ringing"
    return shift


def motion_kspace(image: np.ndarray, rng: np.random.Generator, size: int, preprocess: str = DEFAULT_PREPROCESS,
                  translation: float = MOTION_TRANSLATION) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """The k-space of ``image - min`` acquired while the head moved: ``(kspace, corrupted rows, (dy, dx))``.

    Phase encoding runs along the rows (axis 0), one k-space row per repetition, in order from the
    lowest frequency to the highest (sequential ordering). After a share ``MOTION_ONSET`` of the rows
    the head is translated by ``translation`` training pixels in a random direction (rounded to whole
    raw pixels ``(dy, dx)``); the rows acquired after that carry the shift theorem's linear phase
    ``exp(-2 pi i (ky dy / H + kx dx / W))``, the earlier ones are untouched."""
    image = _check(image)
    height, width = image.shape
    onset = rng.uniform(*MOTION_ONSET)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    length = translation * training_geometry(image, size, preprocess)[0]
    dy, dx = int(round(length * math.sin(angle))), int(round(length * math.cos(angle)))
    if dy == 0 and dx == 0:
        dx = 1
    ky = np.fft.fftfreq(height) * height  # cycles per field of view, numpy's order
    kx = np.fft.fftfreq(width) * width
    order = np.argsort(np.argsort(ky, kind="stable"), kind="stable")  # acquisition rank of each row
    corrupted = order >= int(math.ceil(onset * height))
    spectrum = np.fft.fft2(image.astype(np.float64) - float(image.min()))
    phase = np.exp(-2j * math.pi * (ky[corrupted, None] * dy / height + kx[None, :] * dx / width))
    spectrum[corrupted] *= phase
    return spectrum, corrupted, (dy, dx)


def motion(size: int, preprocess: str = DEFAULT_PREPROCESS):
    """Motion during the acquisition: the k-space rows acquired after the head moved carry the phase of the
    translation (:func:`motion_kspace`), and the magnitude image shows the ghosts and blurring this makes."""

    def shift(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        image = _check(image)
        spectrum, _, _ = motion_kspace(image, rng, size, preprocess)
        return (float(image.min()) + np.abs(np.fft.ifft2(spectrum))).astype(np.float32)

    shift.__name__ = "motion"
    return shift


# ---------------------------------------------------------------------- intensities


def tissue_curve(image: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The parameters of ``tissue_contrast`` on ``image``, on its min-max scaled intensities ``u``:
    ``edges`` (band edges in ``u``: 0, the foreground's quantiles, 1), ``outputs`` (where each edge goes),
    ``exponents`` (one per band)."""
    image = _check(image)
    low, high = _range(image)
    unit = (image.astype(np.float64) - low) / (high - low)
    foreground = unit[unit > TISSUE_FOREGROUND]
    if foreground.size < TISSUE_BANDS:
        foreground = unit.ravel()
    inner = np.quantile(foreground, np.arange(1, TISSUE_BANDS) / TISSUE_BANDS)
    edges = np.concatenate([[0.0], inner, [1.0]])
    if np.any(np.diff(edges) <= 0):  # too few levels for the bands: cut the range evenly instead
        edges = np.linspace(0.0, 1.0, TISSUE_BANDS + 1)
    log_uniform = lambda pair, n: np.exp(rng.uniform(math.log(pair[0]), math.log(pair[1]), n))  # noqa: E731
    widths = np.diff(edges) * log_uniform(TISSUE_WIDTH_FACTOR, TISSUE_BANDS)
    outputs = np.concatenate([[0.0], np.cumsum(widths / widths.sum())])
    outputs[-1] = 1.0
    return {"edges": edges, "outputs": outputs, "exponents": log_uniform(TISSUE_EXPONENT, TISSUE_BANDS)}


def tissue_contrast(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A different contrast curve per tissue: another site's sequence timing (TR, TE, flip angle) changes the
    contrast between tissues, not one curve for the whole slice.

    The min-max scaled intensities are cut into :data:`TISSUE_BANDS` bands at the foreground's
    quantiles (foreground: above :data:`TISSUE_FOREGROUND`), roughly background and CSF, grey and
    white matter, the brightest tissue; each band is stretched or squeezed to a new share of the range and
    mapped by its own power curve ``t -> t ** g`` (``t`` the position within the band), continuous at
    the edges and increasing, so the order of intensities is kept but the contrast within and between
    tissues changes (:func:`tissue_curve`). Back in the slice's raw range."""
    image = _check(image)
    low, high = _range(image)
    params = tissue_curve(image, rng)
    edges, outputs, exponents = params["edges"], params["outputs"], params["exponents"]
    unit = (image.astype(np.float64) - low) / (high - low)
    band = np.clip(np.searchsorted(edges, unit, side="right") - 1, 0, TISSUE_BANDS - 1)
    position = np.clip((unit - edges[band]) / (edges[band + 1] - edges[band]), 0.0, 1.0)
    mapped = outputs[band] + (outputs[band + 1] - outputs[band]) * position ** exponents[band]
    return (low + (high - low) * mapped).astype(np.float32)


def rician(sigma: float, size: int, preprocess: str = DEFAULT_PREPROCESS):
    """Rician noise of ``sigma`` per training pixel, in units of the network's input (:func:`training_geometry`:
    the intensity span the preprocessing maps to [0, 1]), as the training noise is stated.

    A magnitude image is ``|x + n_re + i n_im|`` with independent Gaussian noise of the same sigma in
    both channels: Rician, about Gaussian where the signal is well above sigma, a Rayleigh floor of mean
    ``sigma * sqrt(pi / 2)`` in the background. So that the level holds at the training size (white noise at
    the raw resolution would be averaged away by the resize), the slice is reduced to the training pixels'
    grid (bilinear, antialiased), the noise is added there to ``image - min``, and the result is enlarged
    back to the slice's shape (bilinear)."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")

    def shift(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        image = _check(image)
        low = float(image.min())
        height, width = image.shape
        pixel, unit = training_geometry(image, size, preprocess)
        grid = (max(1, round(width / pixel)), max(1, round(height / pixel)))
        small = np.asarray(Image.fromarray((image - low).astype(np.float32)).resize(grid, Image.BILINEAR),
                           dtype=np.float64)
        level = sigma * unit
        noisy = np.hypot(small + level * rng.standard_normal(small.shape), level * rng.standard_normal(small.shape))
        back = Image.fromarray(noisy.astype(np.float32)).resize((width, height), Image.BILINEAR)
        return (low + np.asarray(back, dtype=np.float64)).astype(np.float32)

    shift.__name__ = f"rician_{sigma:g}"
    return shift


# ---------------------------------------------------------------------- the catalogue


@dataclasses.dataclass(frozen=True)
class FamilyShift:
    """One shift of the bench: ``render(raw, rng) -> raw``, its family and severity.

    ``measures``: for a family the augmentation has, the shift's parameters in the augmentation's
    units at the training size, ``{field of SiteShiftAugmentation: (low, high)}`` (the range it
    spans over slices and draws); :func:`severity_under` decides the severity from them."""

    name: str
    family: str
    severity: str
    render: Callable[[np.ndarray, np.random.Generator], np.ndarray]
    description: str
    measures: dict = dataclasses.field(default_factory=dict)

    @property
    def stream(self) -> int:
        """The shift's seed stream: a digest of its name, stable when shifts are added or reordered."""
        return zlib.crc32(self.name.encode())


def _augmentation_range(augmentation: SiteShiftAugmentation, field: str) -> tuple[float, float]:
    value = getattr(augmentation, field)
    if field in ("rotation_degrees", "bias_amplitude"):  # drawn in [-d, d] and [0, a]
        return (-float(value), float(value)) if field == "rotation_degrees" else (0.0, float(value))
    low, high = value
    if field in ("blur_sigma", "downsample"):  # 0 and 1 are the identity: the range covers everything milder
        low = 0.0 if field == "blur_sigma" else 1.0
    return float(low), float(high)


def severity_under(shift: FamilyShift, augmentation: SiteShiftAugmentation | None = None) -> str:
    """The severity of ``shift`` against ``augmentation``'s ranges (default: the product's).

    ``new family`` for a family the augmentation lacks or excludes; ``in-range`` when every measure
    lies inside the augmentation's range for it; ``out-of-range`` when one lies wholly outside.
    A measure that straddles an edge has no severity: ``ValueError`` (render two shifts instead)."""
    augmentation = augmentation or SiteShiftAugmentation()
    if shift.family not in FAMILIES or shift.family in augmentation.exclude:
        return NEW_FAMILY
    if not shift.measures:
        raise ValueError(f"{shift.name}: a shift of the augmentation's family {shift.family!r} needs its measures")
    inside = []
    for field, (low, high) in shift.measures.items():
        a, b = _augmentation_range(augmentation, field)
        if a <= low and high <= b:
            inside.append(True)
        elif high < a or low > b:
            inside.append(False)
        else:
            raise ValueError(f"{shift.name}: {field} spans [{low:g}, {high:g}], across the edge of the "
                             f"augmentation's [{a:g}, {b:g}]")
    return IN_RANGE if all(inside) else OUT_OF_RANGE


@functools.lru_cache(maxsize=8)
def family_shifts(size: int, preprocess: str = DEFAULT_PREPROCESS) -> dict[str, FamilyShift]:
    """The bench's shifts for the training size ``size`` and the preprocessing ``preprocess`` that prepares
    their renderings (which sets the training pixel, :func:`training_geometry`), by name (``none`` first)."""
    size = int(size)
    if size < 8:
        raise ValueError(f"size must be at least 8 training pixels, got {size}")
    if preprocess not in PREPROCESSING:
        raise ValueError(f"unknown preprocessing {preprocess!r}; valid: {', '.join(PREPROCESSING)}")
    loose = frame_pad_scale(0.4, 0.4), frame_pad_scale(0.6, 0.6)
    wide = frame_pad_scale(0.0, 0.5)
    snug = frame_pad_scale(0.1, 0.1)
    shifts = [
        FamilyShift(REFERENCE, "none", "reference", identity, "the slice itself"),
        # framing: windows and padding on the frame, never on the intensities
        FamilyShift("frame_pad_0.1", "framing", IN_RANGE, frame_pad(0.1, 0.1, centred=True),
                    "background padding of 10 % of each side, centred",
                    {"scale": (snug[0], snug[0]), "aspect": (1.0, 1.0)}),
        FamilyShift("frame_crop_0.9", "framing", IN_RANGE, frame_crop(0.9, centred=True),
                    "a centred square window of 90 % of the frame", {"scale": (1 / 0.9, 1 / 0.9),
                                                                        "aspect": (1.0, 1.0)}),
        FamilyShift("fov_loose", "framing", OUT_OF_RANGE, fov_loose, "background padding of 40 to 60 % of each side",
                    {"scale": (loose[1][0], loose[0][0]), "aspect": (1.0, 1.0)}),
        FamilyShift("frame_pad_wide", "framing", OUT_OF_RANGE, frame_pad(0.0, 0.5),
                    "background padding of 50 % of the width: a wide, non-square frame",
                    {"scale": (wide[0], wide[0]), "aspect": (wide[1], wide[1])}),
        FamilyShift("skull_cut", "framing", OUT_OF_RANGE, frame_crop(SKULL_CUT_KEEP),
                    f"a square window of {SKULL_CUT_KEEP:g} of the frame at random: cuts the skull",
                    {"scale": (1 / SKULL_CUT_KEEP, 1 / SKULL_CUT_KEEP), "aspect": (1.0, 1.0)}),
        # rotation
        FamilyShift("rotate_10", "rotation", IN_RANGE, rotate(10.0), "10 degrees", {"rotation_degrees": (10.0, 10.0)}),
        FamilyShift("rotate_20", "rotation", OUT_OF_RANGE, rotate(20.0), "20 degrees",
                    {"rotation_degrees": (20.0, 20.0)}),
        # intensity curve (min-max and the head's percentile scaling both undo a linear change: contrast_low's
        # factor at the network's input is 1)
        FamilyShift("gamma_0.7", "intensity_curve", IN_RANGE, gamma(0.7), "gamma 0.7", {"gamma": (0.7, 0.7)}),
        FamilyShift("gamma_1.5", "intensity_curve", IN_RANGE, gamma(1.5), "gamma 1.5", {"gamma": (1.5, 1.5)}),
        FamilyShift("gamma_0.5", "intensity_curve", OUT_OF_RANGE, gamma(0.5), "gamma 0.5", {"gamma": (0.5, 0.5)}),
        FamilyShift("gamma_2", "intensity_curve", OUT_OF_RANGE, gamma(2.0), "gamma 2", {"gamma": (2.0, 2.0)}),
        # bias field (over the head's box, as site_shift.bias_field: a rendering parameter, not undone by a crop)
        FamilyShift("bias_field", "bias_field", IN_RANGE, bias_field, "+-20 % within the head",
                    {"bias_amplitude": (0.2, 0.2)}),
        FamilyShift("bias_0.4", "bias_field", OUT_OF_RANGE, bias(0.4), "+-40 % within the head",
                    {"bias_amplitude": (0.4, 0.4)}),
        # blur and resolution at the training size
        FamilyShift("blur_0.8px", "blur", IN_RANGE, blur_at(0.8, size, preprocess), "sigma 0.8 px at the training size",
                    {"blur_sigma": (0.8, 0.8)}),
        FamilyShift("blur_2px", "blur", OUT_OF_RANGE, blur_at(2.0, size, preprocess), "sigma 2 px at the training size",
                    {"blur_sigma": (2.0, 2.0)}),
        FamilyShift("downsample_1.5x", "resolution", IN_RANGE, downsample_at(1.5, size, preprocess),
                    "resolution / 1.5 at the training size", {"downsample": (1.5, 1.5)}),
        FamilyShift("downsample_3x", "resolution", OUT_OF_RANGE, downsample_at(3.0, size, preprocess),
                    "resolution / 3 at the training size", {"downsample": (3.0, 3.0)}),
        # families the augmentation does not have
        FamilyShift("gibbs_ringing", "artefact", NEW_FAMILY, gibbs_ringing(size, preprocess),
                    f"k-space truncated to {GIBBS_KEPT:g} of the training size's lines"),
        FamilyShift("motion", "artefact", NEW_FAMILY, motion(size, preprocess),
                    f"a {MOTION_TRANSLATION:g} px translation after {MOTION_ONSET[0]:g} to {MOTION_ONSET[1]:g} of "
                    "the phase-encode lines"),
        FamilyShift("tissue_contrast", "tissue_contrast", NEW_FAMILY, tissue_contrast,
                    f"{TISSUE_BANDS} intensity bands, each with its own curve"),
        *(FamilyShift(f"rician_{sigma:g}", "noise", NEW_FAMILY, rician(sigma, size, preprocess),
                      f"Rician noise, sigma {sigma:g} of the input's range per training pixel")
          for sigma in RICIAN_SIGMAS),
    ]
    return {shift.name: shift for shift in shifts}


def render_family_shift(image: np.ndarray, name: str, size: int, seed,
                        preprocess: str = DEFAULT_PREPROCESS) -> np.ndarray:
    """The raw slice ``image`` under the shift ``name`` of :func:`family_shifts` for ``size`` and ``preprocess``,
    drawn with ``numpy.random.default_rng(seed)``; ``ValueError`` naming the valid shifts for an unknown name."""
    shifts = family_shifts(size, preprocess)
    if name not in shifts:
        raise ValueError(f"unknown shift {name!r}; valid names: {', '.join(shifts)}")
    return shifts[name].render(_check(image), np.random.default_rng(seed))


def family_examples_figure(image: np.ndarray, path, size: int, preprocess: str = "head", seed: int = 0):
    """Write one PNG of ``image`` under every shift of :func:`family_shifts` as the network sees it: prepared by
    ``preprocess`` at the training size ``size`` (window [0, 1]); titles: name, family, severity. Returns the path."""
    from pathlib import Path

    from robustmri.data.preprocessing import preprocessing_by_name
    from robustmri.outputs import image_grid

    prepare = preprocessing_by_name(preprocess)
    shifts = family_shifts(size, preprocess)
    panels = [prepare(render_family_shift(image, name, size, [seed, shift.stream], preprocess), size)
              for name, shift in shifts.items()]
    titles = [f"{name}\n{shift.family}, {shift.severity}" for name, shift in shifts.items()]
    image_grid(panels, titles, path, ncols=6, suptitle=f"shift families as the network sees them ({preprocess}, "
               f"{size} px, seed {seed})", vmin=0.0, vmax=1.0, title_fontsize=8, panel_size=(2.6, 2.9))
    return Path(path)
