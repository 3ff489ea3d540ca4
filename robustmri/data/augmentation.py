"""Site-shift augmentation for training: another hospital's framing and exposure, drawn per sample.

A model trained on one site's slices fails on another's that frame the head differently
(field of view, non-square crops, rotation), resolve it differently (blur, lower
resolution) or expose it differently (intensity curve, contrast, a coil's bias field).
:class:`SiteShiftAugmentation` applies random versions of those changes to a batch of
PREPROCESSED training images (``[N, C, H, W]`` in [0, 1], background about 0) as batch-level
torch operations, so the training set covers them.

Like the flips of :class:`robustmri.data.in_memory.InMemoryDataset`, the randomness of a sample
is a function of ``(seed, epoch, sample id)`` only: its parameters are drawn from
``numpy.random.default_rng([seed, epoch, id, 7919])`` (a stream distinct from the flips'), so a
sample's augmented image does not depend on the batch it is drawn in nor on the draw order.

Each sample is augmented in an epoch with probability ``prob``; an augmented sample then
takes each component with probability ``component_prob``, so the shifts do not all pile up
at once. The components, in the order they are applied:

1. geometry, one ``affine_grid`` + ``grid_sample`` (bilinear, zeros outside): rotation,
   isotropic zoom (``scale``) and anisotropic stretch (``aspect``, a non-square crop resized
   to the square);
2. ``downsample``: bilinear down (antialiased) by the factor, then bilinear back up;
3. ``blur``: separable Gaussian blur (edges replicated);
4. ``bias``: a smooth multiplicative field ``1 + a * poly``, ``poly`` a random quadratic of
   position scaled to ``|poly| <= 1`` over the image;
5. ``contrast``: ``m + c * (x - m)`` about the mean ``m`` of the foreground (pixels above
   :data:`FOREGROUND`), then clipped to [0, 1];
6. ``gamma``: ``x -> x ** g``.

MR acquisition components (``mr_prob``, off by default; a lever of the shift bench, not the
product's augmentation until it is measured), drawn from their own stream
``default_rng([seed, epoch, id, 7927])`` so that every site-shift component of every sample
keeps its value whether they are on or not, and applied after the six above, each with
probability ``component_prob`` in a sample drawn with probability ``mr_prob``:

7. ``ringing``: Gibbs ringing, the magnitude of the image with k-space truncated to a central
   share ``ringing_kept`` along the rows, the columns or both;
8. ``ghosting``: motion ghosts, every ``period``-th k-space line along one axis (``period`` 4 to 8:
   ghosts of about 1 / period of the image's intensity) taken from the image translated by
   ``ghosting_shift`` of its side along that axis, the magnitude;
9. ``tissue_curve``: a different contrast per tissue, a random increasing piecewise-linear
   curve through :data:`TISSUE_KNOTS` sorted uniform knots, blended with the identity by
   ``tissue_strength``;
10. ``noise``: Rician noise of sigma ``noise_sigma`` (the magnitude of the image plus complex
    Gaussian noise).

An augmented sample is clipped to [0, 1] at the end; a sample left alone comes back
bit-identical.

The components group into families (:data:`FAMILIES`), the unit a site-shift bench tests:
``exclude`` switches whole families off (training "the augmentation minus the family tested",
the bench's leave-one-family-out). An excluded component is still drawn and then dropped, so
every other component of every sample takes exactly the values it takes without ``exclude``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

#: Salt of the augmentation's random stream, distinct from the flips' ``[seed, epoch, id]``.
STREAM = 7919
#: Pixels above this intensity are the foreground whose mean anchors the contrast change.
FOREGROUND = 0.05
#: The components, in the order they are applied (geometry counts three: rotation, scale, aspect).
COMPONENTS = ("rotation", "scale", "aspect", "downsample", "blur", "bias", "contrast", "gamma")
#: Families of components, by the name a shift of that family carries (robustmri.data.shift_catalog); ``exclude``
#: takes these names.
FAMILIES = {"framing": ("scale", "aspect"), "rotation": ("rotation",), "resolution": ("downsample",),
            "blur": ("blur",), "bias_field": ("bias",), "intensity_curve": ("contrast", "gamma")}
#: Salt of the translation's stream (``translation``): its own, so that switching it on moves no other draw.
TRANSLATION_STREAM = 7933
#: Number of coefficients of the bias field's quadratic (x, y, x^2, y^2, xy).
BIAS_TERMS = 5
#: Salt of the MR acquisition components' stream (``mr_prob``), distinct from the site shifts'.
MR_STREAM = 7927
#: The MR acquisition components, in the order they are applied (after :data:`COMPONENTS`).
MR_COMPONENTS = ("ringing", "ghosting", "tissue_curve", "noise")
#: Their families, named as the shift bench's new families (robustmri.data.shift_families.NEW_FAMILIES).
MR_FAMILIES = {"artefact": ("ringing", "ghosting"), "tissue_contrast": ("tissue_curve",), "noise": ("noise",)}
#: Inner knots of the ``tissue_curve`` component.
TISSUE_KNOTS = 4
#: Smallest and largest period of the ``ghosting`` lines (uniform integers): every 2nd line would make two
#: half-intensity copies, far beyond an ordinary motion artefact.
GHOSTING_PERIODS = (4, 8)


def _pair(name: str, value, low_bound: float, *, inclusive: bool, upper: float | None = None) -> tuple[float, float]:
    """``value`` as a (low, high) tuple of finite floats above ``low_bound`` (or equal when inclusive)."""
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (low, high) pair of numbers, got {value!r}") from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low > high:
        raise ValueError(f"{name} must have low <= high, got {value!r}")
    if (low < low_bound) if inclusive else (low <= low_bound):
        relation = ">=" if inclusive else ">"
        raise ValueError(f"{name} must be {relation} {low_bound:g}, got {value!r}")
    if upper is not None and high > upper:
        raise ValueError(f"{name} must be <= {upper:g}, got {value!r}")
    return low, high


def check_exclude(value) -> tuple[str, ...]:
    """``value`` (None, a family name, a comma-separated string of them or a sequence) as a tuple of
    :data:`FAMILIES` names in their canonical order; ``ValueError`` naming the valid ones otherwise."""
    if value is None:
        return ()
    names = [part.strip() for part in value.split(",")] if isinstance(value, str) else list(value)
    names = [name for name in names if name != ""]
    valid = {**FAMILIES, **MR_FAMILIES}
    unknown = [name for name in names if not isinstance(name, str) or name not in valid]
    if unknown:
        raise ValueError(f"augment_exclude: unknown augmentation famil{'y' if len(unknown) == 1 else 'ies'} "
                         f"{', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")
    return tuple(family for family in valid if family in names)


def _bounded(name: str, value, upper: float, interval: str, closed: bool = True) -> float:
    """``value`` as a float in [0, upper] (``closed``) or [0, upper); ``ValueError`` naming ``name`` and ``interval``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}") from None
    if not (0.0 <= number <= upper if closed else 0.0 <= number < upper):
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return number


def _unit(name: str, value) -> float:
    return _bounded(name, value, 1.0, "[0, 1]")


@dataclasses.dataclass(frozen=True)
class SiteShiftAugmentation:
    """Random site shifts of preprocessed training images, drawn from ``(seed, epoch, sample id)``.

    Ranges are ``(low, high)`` pairs (lists are accepted, as a JSON config writes them); a
    degenerate range at the identity (``gamma=(1, 1)``, ``rotation_degrees=0``,
    ``bias_amplitude=0``...) switches its component off.
    """

    #: Probability that a sample is augmented at all in an epoch (0: off, every batch as without it).
    prob: float = 0.5
    #: Probability that an augmented sample takes each component (drawn per component).
    component_prob: float = 0.5
    #: Gamma exponent ``g`` of ``x -> x ** g``, log-uniform (below 1: brighter).
    gamma: tuple[float, float] = (0.67, 1.5)
    #: Contrast factor ``c`` of ``m + c * (x - m)`` about the foreground mean ``m``, uniform.
    contrast: tuple[float, float] = (0.7, 1.3)
    #: Largest relative change of the bias field; the field's amplitude is uniform in [0, this].
    bias_amplitude: float = 0.2
    #: Isotropic zoom, uniform: below 1 the head looks smaller (looser field of view), above 1 larger.
    scale: tuple[float, float] = (0.85, 1.15)
    #: Width / height ratio of the (area-preserving) crop resized to the square, log-uniform.
    aspect: tuple[float, float] = (0.8, 1.25)
    #: Largest shift of the content along each axis, a share of the image side, uniform in [-this, this] per axis
    #: (family ``framing``; 0: off, the default). Drawn from its own stream for the augmented samples.
    translation: float = 0.0
    #: Largest in-plane rotation, degrees; the angle is uniform in [-this, this] (positive: counter-clockwise).
    rotation_degrees: float = 10.0
    #: Gaussian blur sigma in pixels, uniform.
    blur_sigma: tuple[float, float] = (0.0, 1.0)
    #: Resolution loss: down by this factor, then back up (bilinear), uniform; 1 is the identity.
    downsample: tuple[float, float] = (1.0, 2.0)
    #: Families of :data:`FAMILIES` or :data:`MR_FAMILIES` never applied (a name, a comma-separated string or a
    #: list; empty: none).
    exclude: tuple[str, ...] = ()
    #: Probability that a sample takes the MR acquisition components at all in an epoch (0: off).
    mr_prob: float = 0.0
    #: Share of k-space kept along each truncated axis by ``ringing``, uniform.
    ringing_kept: tuple[float, float] = (0.5, 0.9)
    #: Translation of the ghosting copy, as a share of the image side, uniform (sign drawn too).
    ghosting_shift: tuple[float, float] = (0.02, 0.06)
    #: Blend of the random tissue curve with the identity (0: identity, 1: the curve), uniform.
    tissue_strength: tuple[float, float] = (0.1, 0.5)
    #: Sigma of the Rician noise, image units, uniform.
    noise_sigma: tuple[float, float] = (0.0, 0.08)

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        set_("prob", _unit("prob", self.prob))
        set_("component_prob", _unit("component_prob", self.component_prob))
        set_("gamma", _pair("gamma", self.gamma, 0.0, inclusive=False))
        set_("contrast", _pair("contrast", self.contrast, 0.0, inclusive=False))
        set_("scale", _pair("scale", self.scale, 0.0, inclusive=False))
        set_("aspect", _pair("aspect", self.aspect, 0.0, inclusive=False))
        set_("blur_sigma", _pair("blur_sigma", self.blur_sigma, 0.0, inclusive=True, upper=20.0))
        set_("downsample", _pair("downsample", self.downsample, 1.0, inclusive=True, upper=16.0))
        set_("bias_amplitude", _bounded("bias_amplitude", self.bias_amplitude, 1.0, "[0, 1)", closed=False))
        set_("rotation_degrees", _bounded("rotation_degrees", self.rotation_degrees, 180.0, "[0, 180]"))
        set_("translation", _bounded("translation", self.translation, 0.5, "[0, 0.5] (a share of the image side)"))
        set_("exclude", check_exclude(self.exclude))
        set_("mr_prob", _unit("mr_prob", self.mr_prob))
        set_("ringing_kept", _pair("ringing_kept", self.ringing_kept, 0.0, inclusive=False, upper=1.0))
        set_("ghosting_shift", _pair("ghosting_shift", self.ghosting_shift, 0.0, inclusive=True, upper=0.5))
        set_("tissue_strength", _pair("tissue_strength", self.tissue_strength, 0.0, inclusive=True, upper=1.0))
        set_("noise_sigma", _pair("noise_sigma", self.noise_sigma, 0.0, inclusive=True, upper=1.0))

    # ------------------------------------------------------------------ parameters

    def draw(self, seed: int, epoch: int, ids: Sequence[int]) -> dict[str, np.ndarray]:
        """Per-sample parameters for ``ids``, each drawn from ``default_rng([seed, epoch, id, 7919])``.

        Returns arrays of length ``N = len(ids)``: ``augmented`` (bool), ``rotation`` (degrees),
        ``scale``, ``aspect``, ``shift`` (``[N, 2]``: the content's shift right and down, shares of the
        width and height; from its own stream, see ``translation``), ``downsample``, ``blur_sigma``, ``bias_amplitude``,
        ``bias_coefficients`` (``[N, 5]``), ``contrast``, ``gamma``. A component a sample does not
        take holds its identity value (0 degrees, factors 1, sigma 0, amplitude 0), so
        :meth:`apply` leaves it out. Every sample consumes the same draws whatever it takes.
        """
        n = len(ids)
        params = {
            "augmented": np.zeros(n, dtype=bool),
            "rotation": np.zeros(n),
            "scale": np.ones(n),
            "aspect": np.ones(n),
            "shift": np.zeros((n, 2)),
            "downsample": np.ones(n),
            "blur_sigma": np.zeros(n),
            "bias_amplitude": np.zeros(n),
            "bias_coefficients": np.zeros((n, BIAS_TERMS)),
            "contrast": np.ones(n),
            "gamma": np.ones(n),
            **_mr_identity(n),
        }
        if self.mr_prob > 0.0:
            self._draw_mr(params, seed, epoch, ids)
        if self.prob == 0.0:
            return params
        log_uniform = lambda rng, pair: math.exp(rng.uniform(math.log(pair[0]), math.log(pair[1])))  # noqa: E731
        for row, sample in enumerate(ids):
            rng = np.random.default_rng([int(seed), int(epoch), int(sample), STREAM])
            augmented = rng.random() < self.prob
            takes = dict(zip(COMPONENTS, (rng.random(len(COMPONENTS)) < self.component_prob) & augmented))
            for family in self.exclude:  # after the draw, so that the other components' values do not move
                takes.update(dict.fromkeys(FAMILIES.get(family, ()), False))
            values = {
                "rotation": rng.uniform(-self.rotation_degrees, self.rotation_degrees),
                "scale": rng.uniform(*self.scale),
                "aspect": log_uniform(rng, self.aspect),
                "downsample": rng.uniform(*self.downsample),
                "blur_sigma": rng.uniform(*self.blur_sigma),
                "bias_amplitude": rng.uniform(0.0, self.bias_amplitude),
                "contrast": rng.uniform(*self.contrast),
                "gamma": log_uniform(rng, self.gamma),
            }
            coefficients = rng.normal(size=BIAS_TERMS)
            params["augmented"][row] = augmented
            for component, key in zip(COMPONENTS, ("rotation", "scale", "aspect", "downsample", "blur_sigma",
                                                   "bias_amplitude", "contrast", "gamma")):
                if takes[component]:
                    params[key][row] = values[key]
            if takes["bias"]:
                params["bias_coefficients"][row] = coefficients
        if self.translation > 0.0 and "framing" not in self.exclude:
            for row, sample in enumerate(ids):
                rng = np.random.default_rng([int(seed), int(epoch), int(sample), TRANSLATION_STREAM])
                take, shift = rng.random() < self.component_prob, rng.uniform(-self.translation, self.translation, 2)
                if take and params["augmented"][row]:
                    params["shift"][row] = shift
        return params

    def _draw_mr(self, params: dict, seed: int, epoch: int, ids: Sequence[int]) -> None:
        """The MR acquisition components of :meth:`draw`, from their own stream, into ``params``."""
        excluded = {component for family in self.exclude for component in MR_FAMILIES.get(family, ())}
        for row, sample in enumerate(ids):
            rng = np.random.default_rng([int(seed), int(epoch), int(sample), MR_STREAM])
            augmented = rng.random() < self.mr_prob
            takes = {name: bool(take) and augmented and name not in excluded
                     for name, take in zip(MR_COMPONENTS, rng.random(len(MR_COMPONENTS)) < self.component_prob)}
            kept, ringing_axis = rng.uniform(*self.ringing_kept), int(rng.integers(3))
            shift = rng.uniform(*self.ghosting_shift) * (1.0 if rng.random() < 0.5 else -1.0)
            period, ghosting_axis = int(rng.integers(GHOSTING_PERIODS[0], GHOSTING_PERIODS[1] + 1)), int(rng.integers(2))
            knots, strength = np.sort(rng.uniform(size=TISSUE_KNOTS)), rng.uniform(*self.tissue_strength)
            sigma, noise_seed = rng.uniform(*self.noise_sigma), int(rng.integers(2**31 - 1))
            params["augmented"][row] |= augmented
            if takes["ringing"]:
                params["ringing_kept"][row], params["ringing_axis"][row] = kept, ringing_axis
            if takes["ghosting"]:
                params["ghosting_shift"][row], params["ghosting_period"][row] = shift, period
                params["ghosting_axis"][row] = ghosting_axis
            if takes["tissue_curve"]:
                params["tissue_strength"][row], params["tissue_knots"][row] = strength, knots
            if takes["noise"]:
                params["noise_sigma"][row], params["noise_seed"][row] = sigma, noise_seed

    # ------------------------------------------------------------------ application

    def apply(self, images: torch.Tensor, params: dict) -> torch.Tensor:
        """``images`` ``[N, C, H, W]`` under the per-sample ``params`` of :meth:`draw`.

        Returns a new tensor of the same shape and dtype; each component touches only the samples
        whose parameter differs from its identity value, augmented samples are clipped to [0, 1]
        and the others come back bit-identical.
        """
        if images.ndim != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
        n = images.shape[0]
        for key, value in params.items():
            if len(value) != n:
                raise ValueError(f"params[{key!r}] has {len(value)} rows for {n} images")
        out = images.clone()
        as_tensor = lambda key: torch.as_tensor(np.asarray(params[key], dtype=np.float64))  # noqa: E731
        rotation, scale, aspect = as_tensor("rotation"), as_tensor("scale"), as_tensor("aspect")
        shift = as_tensor("shift").reshape(n, 2)
        downsample, sigma = as_tensor("downsample"), as_tensor("blur_sigma")
        amplitude, contrast, gamma = as_tensor("bias_amplitude"), as_tensor("contrast"), as_tensor("gamma")
        coefficients = torch.as_tensor(np.asarray(params["bias_coefficients"], dtype=np.float64)).reshape(n, -1)
        touched = torch.zeros(n, dtype=torch.bool)

        geometry = (rotation != 0) | (scale != 1) | (aspect != 1) | (shift != 0).any(1)
        if geometry.any():
            rows = geometry.nonzero().flatten()
            out[rows] = _affine(out[rows], rotation[rows], scale[rows], aspect[rows], shift[rows])
            touched |= geometry
        for row in (downsample > 1).nonzero().flatten().tolist():
            out[row] = _downsample(out[row], float(downsample[row]))
            touched[row] = True
        for row in (sigma > 0).nonzero().flatten().tolist():
            out[row] = _blur(out[row], float(sigma[row]))
            touched[row] = True
        bias = amplitude > 0
        if bias.any():
            rows = bias.nonzero().flatten()
            out[rows] = out[rows] * bias_field(coefficients[rows], amplitude[rows], out.shape[-2:]).to(out.dtype)
            touched |= bias
        changed = contrast != 1
        if changed.any():
            rows = changed.nonzero().flatten()
            out[rows] = _contrast(out[rows].clamp(0.0, 1.0), contrast[rows])
            touched |= changed
        changed = gamma != 1
        if changed.any():
            rows = changed.nonzero().flatten()
            out[rows] = out[rows].clamp(0.0, 1.0) ** gamma[rows].to(out.dtype).view(-1, 1, 1, 1)
            touched |= changed
        touched |= _apply_mr(out, params)
        if touched.any():
            out[touched] = out[touched].clamp(0.0, 1.0)
        return out

    def __call__(self, images: torch.Tensor, seed: int, epoch: int, ids: Sequence[int]) -> torch.Tensor:
        """``apply(images, draw(seed, epoch, ids))``; ``images`` itself when ``prob`` and ``mr_prob`` are 0."""
        if self.prob == 0.0 and self.mr_prob == 0.0:
            return images
        return self.apply(images, self.draw(seed, epoch, ids))

    def describe(self) -> dict:
        """The settings as a JSON-ready dict (ranges as lists), for logs and run metadata."""
        settings = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return {"name": "site_shift", "stream": STREAM, "components": list(COMPONENTS), "mr_stream": MR_STREAM,
                "mr_components": list(MR_COMPONENTS),
                **{key: list(value) if isinstance(value, tuple) else value for key, value in settings.items()}}


# ---------------------------------------------------------------------- components


def _affine(images: torch.Tensor, degrees: torch.Tensor, scale: torch.Tensor, aspect: torch.Tensor,
            shift: torch.Tensor | None = None) -> torch.Tensor:
    """Rotation (counter-clockwise as displayed, about the centre) of a crop of relative width
    ``sqrt(aspect) / scale`` and height ``1 / (sqrt(aspect) * scale)`` resized to the whole image, then
    the content moved by ``shift`` ``[N, 2]`` (right, down; shares of the width and height): one
    ``affine_grid`` + bilinear ``grid_sample``, zeros outside the image."""
    height, width = images.shape[-2:]
    angle = torch.deg2rad(degrees)
    cos, sin = torch.cos(angle), torch.sin(angle)
    crop_w, crop_h = aspect.sqrt() / scale, 1.0 / (aspect.sqrt() * scale)
    # Output (x, y) in normalized coordinates -> input: crop, then undo the rotation in pixel units
    # (normalized x spans width / 2 pixels per unit, y height / 2; rows point down the display).
    theta = torch.zeros(len(images), 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = cos * crop_w
    theta[:, 0, 1] = -sin * crop_h * height / width
    theta[:, 1, 0] = sin * crop_w * width / height
    theta[:, 1, 1] = cos * crop_h
    if shift is not None:  # the output at x shows the input at x - shift; normalized coordinates span 2 per side
        theta[:, 0, 2] = -2.0 * shift[:, 0]
        theta[:, 1, 2] = -2.0 * shift[:, 1]
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _downsample(image: torch.Tensor, factor: float) -> torch.Tensor:
    """One ``[C, H, W]`` image down by ``factor`` (bilinear, antialiased) and back up (bilinear)."""
    height, width = image.shape[-2:]
    size = (max(1, round(height / factor)), max(1, round(width / factor)))
    if size == (height, width):
        return image
    small = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)
    return F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)[0]


def gaussian_kernel(sigma: float, dtype=torch.float32) -> torch.Tensor:
    """A normalised 1-D Gaussian of ``sigma`` pixels, radius ``ceil(3 sigma)`` (at least 1)."""
    radius = max(1, math.ceil(3.0 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (kernel / kernel.sum()).to(dtype)


def _blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """One ``[C, H, W]`` image blurred by a separable Gaussian of ``sigma`` pixels, edges replicated."""
    channels = image.shape[0]
    kernel = gaussian_kernel(sigma, image.dtype)
    radius = (len(kernel) - 1) // 2
    padded = F.pad(image[None], (radius, radius, radius, radius), mode="replicate")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(rows, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)[0]


def bias_field(coefficients: torch.Tensor, amplitude: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Multiplicative fields ``1 + amplitude * poly`` of shape ``[N, 1, H, W]`` (float64).

    ``poly`` is the quadratic ``coefficients . (x, y, x^2, y^2, xy)`` of the pixel centres'
    normalized position (-1 to 1 across the image), centred on its mean over the image and
    divided by its largest magnitude there, so each field lies in ``[1 - amplitude, 1 + amplitude]``.
    """
    height, width = shape
    ys = (2.0 * torch.arange(height, dtype=torch.float64) + 1.0) / height - 1.0
    xs = (2.0 * torch.arange(width, dtype=torch.float64) + 1.0) / width - 1.0
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    terms = torch.stack([x, y, x**2, y**2, x * y])
    poly = torch.einsum("nk,khw->nhw", coefficients.to(torch.float64), terms)
    poly = poly - poly.mean(dim=(-2, -1), keepdim=True)
    peak = poly.abs().amax(dim=(-2, -1), keepdim=True)
    poly = torch.where(peak > 0, poly / peak.clamp_min(1e-12), torch.zeros_like(poly))
    return (1.0 + amplitude.to(torch.float64).view(-1, 1, 1) * poly)[:, None]


def _contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``m + factor * (x - m)`` per sample, ``m`` the mean of its pixels above :data:`FOREGROUND`
    (of all its pixels when none is), clipped to [0, 1]."""
    foreground = images > FOREGROUND
    count = foreground.sum(dim=(1, 2, 3))
    masked_mean = (images * foreground).sum(dim=(1, 2, 3)) / count.clamp_min(1)
    mean = torch.where(count > 0, masked_mean, images.mean(dim=(1, 2, 3))).view(-1, 1, 1, 1)
    return (mean + factor.to(images.dtype).view(-1, 1, 1, 1) * (images - mean)).clamp(0.0, 1.0)


def _mr_identity(n: int) -> dict[str, np.ndarray]:
    """The MR components' parameters at their identity (a component with these values is not applied)."""
    return {"ringing_kept": np.ones(n), "ringing_axis": np.zeros(n, dtype=np.int64), "ghosting_shift": np.zeros(n),
            "ghosting_period": np.zeros(n, dtype=np.int64), "ghosting_axis": np.zeros(n, dtype=np.int64),
            "tissue_strength": np.zeros(n), "tissue_knots": np.zeros((n, TISSUE_KNOTS)),
            "noise_sigma": np.zeros(n), "noise_seed": np.zeros(n, dtype=np.int64)}


def _apply_mr(out: torch.Tensor, params: dict) -> torch.Tensor:
    """Apply the MR components of ``params`` to ``out`` in place; the rows touched (bool [N])."""
    n = out.shape[0]
    touched = torch.zeros(n, dtype=torch.bool)
    if "ringing_kept" not in params:  # parameters drawn before the MR components existed
        return touched
    for row in range(n):
        image = original = out[row]
        if params["ringing_kept"][row] < 1.0:
            image = ringing(image, float(params["ringing_kept"][row]), int(params["ringing_axis"][row]))
        if params["ghosting_shift"][row] != 0.0:
            image = ghosting(image, float(params["ghosting_shift"][row]), int(params["ghosting_period"][row]),
                             int(params["ghosting_axis"][row]))
        if params["tissue_strength"][row] > 0.0:
            image = tissue_curve(image, params["tissue_knots"][row], float(params["tissue_strength"][row]))
        if params["noise_sigma"][row] > 0.0:
            image = rician(image, float(params["noise_sigma"][row]), int(params["noise_seed"][row]))
        if image is not original:
            out[row] = image
            touched[row] = True
    return touched


def _centred_lines(length: int, kept: float) -> torch.Tensor:
    """Bool [length]: the k-space lines (unshifted FFT order) within the central share ``kept`` of frequencies."""
    frequencies = torch.fft.fftfreq(length).abs()  # cycles per pixel, 0 to 0.5
    return frequencies <= 0.5 * kept


def ringing(image: torch.Tensor, kept: float, axis: int) -> torch.Tensor:
    """Gibbs ringing of one ``[C, H, W]`` image: k-space truncated to the central share ``kept`` of frequencies along
    the rows (``axis`` 0), the columns (1) or both (2); the magnitude of the inverse transform."""
    spectrum = torch.fft.fft2(image.double())
    height, width = image.shape[-2:]
    mask = torch.ones(height, width, dtype=torch.bool)
    if axis in (0, 2):
        mask &= _centred_lines(height, kept)[:, None]
    if axis in (1, 2):
        mask &= _centred_lines(width, kept)[None, :]
    return torch.fft.ifft2(spectrum * mask).abs().to(image.dtype)


def ghosting(image: torch.Tensor, shift: float, period: int, axis: int) -> torch.Tensor:
    """Motion ghosts of one ``[C, H, W]`` image: every ``period``-th k-space line along ``axis`` (0: rows, 1:
    columns) acquired while the head sat ``shift`` x the side further along that axis (a phase ramp); the
    magnitude of the inverse transform. Ghost copies appear at multiples of side / period."""
    spectrum = torch.fft.fft2(image.double())
    length = image.shape[-2 + axis]
    frequencies = torch.fft.fftfreq(length, dtype=torch.float64)
    ramp = torch.exp(-2j * math.pi * frequencies * shift * length)
    lines = (torch.arange(length) % period) == 0
    factor = torch.where(lines, ramp, torch.ones_like(ramp))
    factor = factor[:, None] if axis == 0 else factor[None, :]
    return torch.fft.ifft2(spectrum * factor).abs().to(image.dtype)


def tissue_curve(image: torch.Tensor, knots, strength: float) -> torch.Tensor:
    """One image's intensities through the increasing piecewise-linear curve from (0, 0) to (1, 1) through
    ``len(knots)`` evenly spaced abscissae with the sorted ``knots`` as ordinates, blended with the identity by
    ``strength``: each intensity band (tissue) gets its own contrast, the order of intensities is kept."""
    knots = np.sort(np.asarray(knots, dtype=np.float64))
    xs = np.linspace(0.0, 1.0, len(knots) + 2)
    ys = xs + strength * (np.concatenate([[0.0], knots, [1.0]]) - xs)
    values = image.clamp(0.0, 1.0).double().numpy()
    return torch.from_numpy(np.interp(values, xs, ys)).to(image.dtype)


def rician(image: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    """The magnitude of one image plus complex Gaussian noise of ``sigma`` per channel (Rician noise), drawn from
    ``numpy.random.default_rng(seed)``."""
    real, imaginary = np.random.default_rng(seed).standard_normal((2, *image.shape))
    noisy = np.hypot(image.double().numpy() + sigma * real, sigma * imaginary)
    return torch.from_numpy(noisy).to(image.dtype)


# ---------------------------------------------------------------------- picture


def augmentation_examples_figure(image, path: str | os.PathLike, seed: int = 0,
                                 augmentation: SiteShiftAugmentation | None = None, count: int = 11) -> Path:
    """Write one PNG of ``image`` (``[H, W]`` or ``[1, H, W]`` in [0, 1]) and ``count`` augmented draws.

    The draws are those of samples ``0 .. count - 1`` at epoch 0 under ``augmentation`` forced to
    augment every sample (default: :class:`SiteShiftAugmentation` with ``prob=1``; one with ``mr_prob``
    above 0 is forced to ``mr_prob=1`` and keeps its ``prob``, so ``prob=0`` shows the MR components alone);
    each panel's title names the components it took. All panels share the window [0, 1]. Returns the path.
    """
    from robustmri.outputs import image_grid

    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(f"image must be [H, W] or [1, H, W], got shape {np.shape(image)}")
    augmentation = augmentation or SiteShiftAugmentation()
    mr = augmentation.mr_prob > 0
    augmentation = dataclasses.replace(augmentation, **({"mr_prob": 1.0} if mr else {"prob": 1.0}))
    ids = list(range(count))
    params = augmentation.draw(seed, 0, ids)
    batch = torch.from_numpy(np.repeat(array[None, None], count, axis=0))
    shifted = augmentation.apply(batch, params)[:, 0].numpy()
    image_grid([array, *shifted], ["original", *(_summary(params, row) for row in range(count))], path, ncols=4,
               suptitle=f"{'MR acquisition' if mr and augmentation.prob == 0 else 'site-shift'} augmentation "
                        f"(seed {seed}, samples 0-{count - 1}, epoch 0)", vmin=0.0, vmax=1.0,
               title_fontsize=7, panel_size=(3.0, 3.3))
    return Path(path)


def _summary(params: dict, row: int) -> str:
    """The components sample ``row`` takes, e.g. ``rot 4.1, gamma 0.81``."""
    parts = []
    for key, label, identity in (("rotation", "rot", 0.0), ("scale", "scale", 1.0), ("aspect", "aspect", 1.0),
                                 ("downsample", "down", 1.0), ("blur_sigma", "blur", 0.0),
                                 ("bias_amplitude", "bias", 0.0), ("contrast", "contrast", 1.0),
                                 ("gamma", "gamma", 1.0), ("ringing_kept", "ringing", 1.0),
                                 ("ghosting_shift", "ghost", 0.0), ("tissue_strength", "tissue", 0.0),
                                 ("noise_sigma", "noise", 0.0)):
        if key not in params:
            continue
        value = float(params[key][row])
        if value != identity:
            parts.append(f"{label} {value:.2f}")
    if not parts:
        return "no component"
    lines = [", ".join(parts[i:i + 3]) for i in range(0, len(parts), 3)]
    return "\n".join(lines)
