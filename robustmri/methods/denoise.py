"""Denoise: a known-sigma non-local-means front end on every image, then plain training.

Each image's noise sigma is estimated from its own background (:func:`robustmri.data.noise_level.estimate_sigma`
on the image's border, under the training noise law), so a clean image (sigma-hat about 0) is left as it is
and a noisy one is filtered for its own level. The filter (``denoise_filter``):

- ``nlm``: scikit-image's non-local means (``fast_mode``), given sigma-hat, with h = :data:`H_PER_SIGMA` x sigma-hat,
  the starting point scikit-image's ``denoise_nl_means`` documents for ``fast_mode`` with a known sigma (Buades,
  Coll, Morel 2005 and 2011 for the algorithm); fixed before any measurement, not tuned. Patches of
  :data:`PATCH_SIZE` px searched within :data:`PATCH_DISTANCE` px: at 64 px a head is about 50 px wide, so scikit-
  image's defaults (7 px patches, 11 px search) would compare patches a seventh of the head across and search
  half of it. Rician noise gets the unbiased form of Manjon et al. 2008 (Wiest-Daessle et al. 2008): the same
  weights average the squared magnitudes, whose expectation is A^2 + 2 sigma^2, and
  ``sqrt(max(NLM(x^2) - 2 sigma^2, 0))`` removes the bias (:func:`nlm_denoise`).
- ``blur``: the control. A Gaussian blur of width :data:`MATCHED_BLUR_WIDTH` [noise] x sigma-hat / :data:`MATCH_SIGMA`
  px (Rician: with NLM's bias correction): widened with the estimated noise as NLM's h is (none on a clean image),
  its width at the training level chosen so that its mean PSNR gain on clean validation slices with synthetic noise
  comes as close to NLM's as a blur can (``scripts/measure_denoise.py``, :func:`match_blur_width`; no width reaches
  it, see :data:`MATCHED_BLUR_WIDTH`). It tells whether NLM's edge-preserving averaging matters, or any smoothing
  about as strong would do.

:func:`denoise_protocol` filters the training, validation and test splits and every test variant alike;
the classifier is then trained exactly as the naive baseline. :func:`psnr_gain` and :func:`measure` are the
measurement on clean validation slices the choice of the control's width rests on.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time

import numpy as np
from scipy.ndimage import gaussian_filter
from skimage.restoration import denoise_nl_means

from robustmri.data.noise import apply_noise
from robustmri.data.noise_level import ESTIMABLE, image_sigma
from robustmri.data.protocol import ProtocolData
from robustmri.methods import Method
from robustmri.outputs import write_json

logger = logging.getLogger(__name__)

SUMMARY_FILE = "denoise_summary.json"

METHOD = Method(name="denoise", title="Denoise: non-local means at each image's own noise level (Rician "
                "bias-corrected) on every image, then training", order=12, families=("noisy images",),
                summary=SUMMARY_FILE,
                reference="Buades, Coll, Morel, CVPR 2005 (NLM); Manjon et al., MRI 2008 (Rician bias correction)")

#: The filters of ``denoise_filter``: the method and its control.
FILTERS = ("nlm", "blur")
#: NLM's h per unit of sigma: scikit-image's documented starting point for ``fast_mode=True`` with sigma given.
H_PER_SIGMA = 0.8
#: NLM patch side and search distance in pixels, for 64 px slices (see the module's docstring).
PATCH_SIZE = 5
PATCH_DISTANCE = 6
#: The noise level the control's width is matched at: the protocol's training sigma.
MATCH_SIGMA = 32.0 / 255.0
#: The control's blur width (Gaussian sd, px) at sigma-hat = MATCH_SIGMA, matched in mean PSNR gain to NLM on the
#: 180 clean validation slices of the figshare set at 64 px (head preprocessing, tuning seed 100) with synthetic
#: noise at MATCH_SIGMA: ``python scripts/measure_denoise.py --dataset_dir DATA --out OUT`` (its
#: ``matched_blur_width``). No blur width reaches NLM's gain there (best blur +4.11 dB against NLM's +4.52 dB,
#: Gaussian; +5.34 against +6.37, Rician), so these are the widths of the blur's highest gain: the closest match.
MATCHED_BLUR_WIDTH = {"gaussian": 0.688, "rician": 0.699}


def nlm_denoise(image: np.ndarray, sigma: float, noise: str) -> np.ndarray:
    """Non-local means of a 2-D image in [0, 1] with known noise ``sigma``; float32 in [0, 1].

    ``gaussian``: scikit-image's NLM with h = H_PER_SIGMA * sigma. ``rician``: the weights NLM computes on the
    magnitude average its square, then ``sqrt(max(. - 2 sigma^2, 0))``. scikit-image averages the patch distance
    over channels and averages each channel with the same weights, so the squares ride as a second channel scaled
    by 1e-4: their share of the distance is 1e-8 of the magnitude's, and h and sigma are divided by sqrt(2) to undo
    the averaging over two channels (a test checks the weights equal the single-channel ones). sigma = 0: a copy.
    """
    _check_noise(noise)
    image = np.asarray(image, dtype=np.float64)
    if sigma < 0:
        raise ValueError(f"nlm_denoise: sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return image.astype(np.float32)
    h = H_PER_SIGMA * sigma
    if noise == "gaussian":
        out = denoise_nl_means(image, PATCH_SIZE, PATCH_DISTANCE, h, fast_mode=True, sigma=sigma,
                               preserve_range=True)
    else:
        scale = 1e-4
        both = denoise_nl_means(np.stack([image, scale * image ** 2], axis=-1), PATCH_SIZE, PATCH_DISTANCE,
                                h / math.sqrt(2.0), fast_mode=True, sigma=sigma / math.sqrt(2.0),
                                preserve_range=True, channel_axis=-1)
        out = np.sqrt(np.maximum(both[..., 1] / scale - 2.0 * sigma ** 2, 0.0))
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def blur(image: np.ndarray, sigma: float, noise: str, width: float | None = None) -> np.ndarray:
    """The control: Gaussian blur of sd ``width`` x sigma / MATCH_SIGMA px (``width``: MATCHED_BLUR_WIDTH [noise]
    unless given); float32 in [0, 1]. sigma = 0: a copy.

    ``rician``: as NLM, with the blur's fixed weights in place of NLM's: ``sqrt(max(blur(x^2) - 2 sigma^2, 0))``.
    Without the bias correction no blur comes near NLM's gain (on the validation slices at 32/255: +1.7 dB at
    best against +6.4), since most of Rician noise's error is the raised background, which no smoothing lowers.
    """
    _check_noise(noise)
    width = MATCHED_BLUR_WIDTH[noise] if width is None else float(width)
    if width < 0 or sigma < 0:
        raise ValueError(f"blur: width and sigma must be >= 0, got {width} and {sigma}")
    image = np.asarray(image, dtype=np.float64)
    scaled = width * sigma / MATCH_SIGMA
    if noise == "rician":
        squares = gaussian_filter(image ** 2, scaled, mode="reflect") if scaled > 0 else image ** 2
        out = np.sqrt(np.maximum(squares - 2.0 * sigma ** 2, 0.0))
    else:
        out = gaussian_filter(image, scaled, mode="reflect") if scaled > 0 else image
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def denoise_image(image: np.ndarray, noise: str, filter: str = "nlm", blur_width: float | None = None
                  ) -> tuple[np.ndarray, float]:
    """(filtered image, sigma-hat) for a 2-D image in [0, 1]: its sigma estimated on its border, then ``filter``."""
    check_filter(filter)
    sigma = image_sigma(image, noise)
    if filter == "nlm":
        return nlm_denoise(image, sigma, noise), sigma
    return blur(image, sigma, noise, blur_width), sigma


def check_filter(filter: str) -> None:
    if filter not in FILTERS:
        raise ValueError(f"denoise_filter must be one of {FILTERS}, got {filter!r}")


def _check_noise(noise: str) -> None:
    if noise not in ESTIMABLE:
        raise ValueError(f"denoise needs the training noise law to estimate each image's sigma: noise must be one "
                         f"of {ESTIMABLE}, got {noise!r}")


def psnr(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """PSNR in dB of each image [..., H, W] against its reference, peak 1 (images in [0, 1]); inf where equal."""
    error = np.mean((np.asarray(image, np.float64) - np.asarray(reference, np.float64)) ** 2, axis=(-2, -1))
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(1.0 / error)


def psnr_gain(clean: np.ndarray, noisy: np.ndarray, denoised: np.ndarray) -> float:
    """Mean over images [..., H, W] of PSNR(denoised, clean) - PSNR(noisy, clean), in dB."""
    if not np.shape(clean) == np.shape(noisy) == np.shape(denoised):
        raise ValueError(f"psnr_gain: shapes differ: {np.shape(clean)}, {np.shape(noisy)}, {np.shape(denoised)}")
    return float(np.mean(psnr(denoised, clean) - psnr(noisy, clean)))


# -- the front end of a run ------------------------------------------------------------------------


def denoise_protocol(data: ProtocolData, output_dir: str, noise: str, filter: str = "nlm",
                     blur_width: float | None = None) -> ProtocolData:
    """Every image of ``data`` (each split and every test variant) filtered alike; ``data`` unchanged.

    An image found in several splits or variants (the same noise realisation of a slice) is filtered once. Writes
    ``denoise_summary.json`` into ``output_dir``: the filter and its parameters, seconds per image and the mean
    sigma-hat of each split.
    """
    if not isinstance(data, ProtocolData):
        raise TypeError(f"data must be a robustmri.data.protocol.ProtocolData, got {type(data).__name__}")
    check_filter(filter)
    _check_noise(noise)
    done: dict[bytes, tuple[np.ndarray, float]] = {}
    sigmas: dict[str, list[float]] = {}
    start = time.perf_counter()

    def filtered(name: str, items: list[dict]) -> list[dict]:
        out = []
        for item in items:
            image = np.asarray(item["image"], dtype=np.float32)
            if image.ndim != 3 or image.shape[0] != 1:
                raise ValueError(f"denoise: expected images of shape [1, H, W], got {image.shape}")
            key = hashlib.sha1(image.tobytes()).digest() + repr(image.shape).encode()
            if key not in done:
                result, sigma = denoise_image(image[0], noise, filter, blur_width)
                done[key] = (result[None], sigma)
            result, sigma = done[key]
            sigmas.setdefault(name, []).append(sigma)
            out.append({**item, "image": result.copy()})
        return out

    result = data.with_front_end(filtered)
    seconds = time.perf_counter() - start
    width = MATCHED_BLUR_WIDTH[noise] if blur_width is None else float(blur_width)
    parameters = ({"patch_size": PATCH_SIZE, "patch_distance": PATCH_DISTANCE, "h_per_sigma": H_PER_SIGMA,
                   "fast_mode": True, "rician_bias_correction": noise == "rician"} if filter == "nlm" else
                  {"width_at_match_sigma": width, "match_sigma": MATCH_SIGMA})
    summary = {"filter": filter, "noise": noise, "parameters": parameters, "n_filtered": len(done),
               "n_items": {name: len(values) for name, values in sigmas.items()},
               "seconds": seconds, "seconds_per_image": seconds / max(1, len(done)),
               "mean_sigma_hat": {name: float(np.mean(values)) for name, values in sigmas.items()}}
    write_json(os.path.join(output_dir, SUMMARY_FILE), summary)
    logger.info("denoise (%s): %d images in %.1f s; mean sigma-hat %s", filter, len(done), seconds,
                {name: round(value * 255, 1) for name, value in summary["mean_sigma_hat"].items()})
    return result


# -- the measurement on clean validation slices -----------------------------------------------------


def add_noise(clean: np.ndarray, noise: str, sigma: float, seed: int) -> np.ndarray:
    """Each clean image [N, H, W] with its own noise draw (generator seeded by (seed, index, sigma in 1/255))."""
    return np.stack([apply_noise(image, noise, sigma, np.random.default_rng([seed, k, int(round(sigma * 255))]))
                     for k, image in enumerate(clean)]).astype(np.float32)


def match_blur_width(clean: np.ndarray, noisy: np.ndarray, sigmas: np.ndarray, noise: str, target_gain: float,
                     upper: float = 4.0, steps: int = 40) -> dict:
    """The blur width (at MATCH_SIGMA) whose mean PSNR gain on (clean, noisy) equals ``target_gain``.

    A blur's gain rises with its width to a peak and falls beyond (over-smoothing), so the search finds the peak
    (golden section on [0, ``upper``]) and then the smaller width with the target gain (bisection below the peak):
    the least smoothing that gains as much. A target above the peak cannot be matched: the peak width is returned
    with ``matched`` False.
    """
    def gain(width: float) -> float:
        blurred = np.stack([blur(image, sigma, noise, width) for image, sigma in zip(noisy, sigmas)])
        return psnr_gain(clean, noisy, blurred)

    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    low, high = 0.0, float(upper)
    for _ in range(steps):
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        if gain(a) < gain(b):
            low = a
        else:
            high = b
    peak = (low + high) / 2.0
    peak_gain = gain(peak)
    if peak_gain < target_gain:
        return {"width": peak, "gain": peak_gain, "peak_width": peak, "peak_gain": peak_gain, "matched": False}
    if gain(0.0) >= target_gain:  # (the Rician form's bias correction alone gains something)
        return {"width": 0.0, "gain": gain(0.0), "peak_width": peak, "peak_gain": peak_gain, "matched": True}
    low, high = 0.0, peak
    for _ in range(steps):
        middle = (low + high) / 2.0
        low, high = (middle, high) if gain(middle) < target_gain else (low, middle)
    width = (low + high) / 2.0
    return {"width": width, "gain": gain(width), "peak_width": peak, "peak_gain": peak_gain, "matched": True}


def measure(clean: np.ndarray, noises=("gaussian", "rician"), sigmas=(16 / 255, 32 / 255, 64 / 255),
            seed: int = 100, blur_widths: dict | None = None) -> dict:
    """PSNR of clean images [N, H, W] with synthetic noise: noisy, NLM-denoised and blurred (control), each
    against the clean image, and the error of the per-image sigma estimate. The control's width is matched to
    NLM's gain at MATCH_SIGMA (:func:`match_blur_width`) unless ``blur_widths`` fixes it per noise. Rows with
    sigma 0 say how much each filter changes the clean images themselves."""
    clean = np.asarray(clean, dtype=np.float32)
    rows, matched = [], {}
    for noise in noises:
        runs = {sigma: _denoised(clean, noise, sigma, seed) for sigma in sorted({*sigmas, MATCH_SIGMA})}
        if blur_widths:
            matched[noise] = {"width": float(blur_widths[noise]), "matched": None}
        else:
            noisy, estimated, denoised, _ = runs[MATCH_SIGMA]
            matched[noise] = match_blur_width(clean, noisy, estimated, noise, psnr_gain(clean, noisy, denoised))
        width = matched[noise]["width"]
        for sigma in sorted(sigmas):
            noisy, estimated, denoised, nlm_s = runs[sigma]
            blurred = np.stack([blur(image, s, noise, width) for image, s in zip(noisy, estimated)])
            rows.append({"noise": noise, "sigma_255": round(sigma * 255, 3), "n": len(clean),
                         "psnr_noisy": float(np.mean(psnr(noisy, clean))),
                         "psnr_nlm": float(np.mean(psnr(denoised, clean))),
                         "psnr_blur": float(np.mean(psnr(blurred, clean))),
                         "gain_nlm": psnr_gain(clean, noisy, denoised), "gain_blur": psnr_gain(clean, noisy, blurred),
                         "blur_width": width, "sigma_hat_mean_255": float(np.mean(estimated) * 255),
                         "sigma_hat_bias_255": float(np.mean(estimated - sigma) * 255),
                         "sigma_hat_mean_abs_rel_error": float(np.mean(np.abs(estimated - sigma)) / sigma),
                         "nlm_ms_per_image": nlm_s * 1000})
        _, estimated, denoised, _ = _denoised(clean, noise, 0.0, seed)
        blurred = np.stack([blur(image, s, noise, width) for image, s in zip(clean, estimated)])
        rows.append({"noise": noise, "sigma_255": 0.0, "n": len(clean), "blur_width": width,
                     "sigma_hat_mean_255": float(np.mean(estimated) * 255),
                     "share_sigma_hat_zero": float(np.mean(estimated == 0)),
                     "nlm_mean_abs_change_255": float(np.mean(np.abs(denoised - clean)) * 255),
                     "blur_mean_abs_change_255": float(np.mean(np.abs(blurred - clean)) * 255)})
    return {"rows": rows, "matched_blur_width": matched, "match_sigma_255": MATCH_SIGMA * 255, "seed": int(seed),
            "nlm": {"patch_size": PATCH_SIZE, "patch_distance": PATCH_DISTANCE, "h_per_sigma": H_PER_SIGMA,
                    "fast_mode": True}}


def _denoised(clean: np.ndarray, noise: str, sigma: float, seed: int):
    """(noisy, sigma-hat per image, NLM-denoised, seconds per image) for one noise level."""
    noisy = add_noise(clean, noise, sigma, seed) if sigma > 0 else clean
    start = time.perf_counter()
    estimated = np.array([image_sigma(image, noise) for image in noisy])
    denoised = np.stack([nlm_denoise(image, s, noise) for image, s in zip(noisy, estimated)])
    return noisy, estimated, denoised, (time.perf_counter() - start) / len(clean)


def markdown(result: dict) -> str:
    """The measurement as markdown: the PSNR table, then what each filter does to the clean images."""
    lines = ["| noise | sigma (/255) | n | PSNR noisy | PSNR NLM | PSNR blur | gain NLM | gain blur | blur width "
             "(px at 32/255) | mean sigma-hat (/255) | sigma-hat mean abs rel. error | NLM ms/image |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    noisy = [row for row in result["rows"] if row["sigma_255"] > 0]
    for row in noisy:
        lines.append(f"| {row['noise']} | {row['sigma_255']:g} | {row['n']} | {row['psnr_noisy']:.2f} | "
                     f"{row['psnr_nlm']:.2f} | {row['psnr_blur']:.2f} | {row['gain_nlm']:+.2f} | "
                     f"{row['gain_blur']:+.2f} | {row['blur_width']:.3f} | {row['sigma_hat_mean_255']:.2f} | "
                     f"{row['sigma_hat_mean_abs_rel_error']:.3f} | {row['nlm_ms_per_image']:.1f} |")
    lines += ["", "| clean images, sigma-hat under | n | mean sigma-hat (/255) | share sigma-hat = 0 | NLM mean "
              "abs change (/255) | blur mean abs change (/255) |", "| --- | --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        if row["sigma_255"] == 0:
            lines.append(f"| {row['noise']} | {row['n']} | {row['sigma_hat_mean_255']:.3f} | "
                         f"{row['share_sigma_hat_zero']:.3f} | {row['nlm_mean_abs_change_255']:.3f} | "
                         f"{row['blur_mean_abs_change_255']:.3f} |")
    return "\n".join(lines)
