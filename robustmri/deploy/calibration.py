"""Site calibration from unlabelled images: ``model_site.pt``, its abstention state and its record.

A model trained at one hospital meets another one's scanners. Without labels two things can be
re-estimated on that site's own slices (the bundle's ``calibrating`` run id, ``configs/calibrate.json``):

1. **BatchNorm statistics** (:func:`adapt_batchnorm`): every BatchNorm layer's running mean and
   variance are reset and recomputed from the site images as a cumulative average over batches
   (momentum None; BatchNorm layers alone in train mode, so dropout and the like stay off; no
   gradients; the images in a seeded random order), as ``torch.optim.swa_utils.update_bn`` does.
   Weights and biases are not touched. ``num_batches_tracked`` ends as the number of calibration
   batches (what the cumulative average counted), and each layer's momentum is put back.
2. **The abstention state** (:func:`fit_site_abstention`), as ``site_refit`` says (:data:`SITE_REFITS`).
   The product's ``threshold`` keeps the model's own Mahalanobis class means and tied covariance
   (:mod:`robustmri.abstention.mahalanobis`, fitted on its training split) and sets only the threshold: the
   score that accepts ``target_acceptance`` of the site images on the *adapted* network. Nothing is fitted
   on the site images, so the share holds best for the site's new patients (a pre-registered choice on the
   honest shift bench, ``docs/results.md``). ``means`` refits the class means on the adapted network's features
   with the adapted model's predicted classes as pseudo-labels and keeps the covariance; ``full`` refits
   means and covariance. A class predicted for fewer than ``min_class_images`` site images gets no centre
   (its few images still count in the threshold): a mean of a handful of slices is noise. These two set
   the threshold without in-sample optimism by :data:`CROSS_FIT_FOLDS`-fold cross-fitting
   (:data:`CROSS_FIT_RULE`): each image is scored by a detector fitted on the other folds, the threshold is
   the target quantile of these out-of-fold scores, and the detector written is refitted on all the images.
   The site keeps the model's abstention score (``abstention_score``): for ``max_softmax`` or ``energy``,
   which have nothing to fit, only the threshold is set, the target quantile of the site images' scores on
   the adapted network (:data:`QUANTILE_RULE`). A combination of scores
   (:class:`~robustmri.abstention.scores.CdfMean`) ranks each component on the site's own images, as the
   home state ranks on held-out validation slices: its Mahalanobis part as ``site_refit`` says, ranked on
   its held-out scores, a part with nothing to fit on its scores of every site image, and the threshold is
   the target quantile of the combined held-out score (:data:`COMBINATION_RULE`). Ranks need no labels.

:func:`calibrate_site` does both and writes ``model_site.pt`` (a plain ``state_dict``, atomically)
beside the source checkpoint or in ``output_dir``, its ``model_site_abstention.pt``
(:func:`robustmri.abstention.save_state`) and the calibration record in ``model_metadata.json``
(:func:`robustmri.engine.model_metadata.read_calibration` documents where). The source checkpoint
is never overwritten, and fewer than :data:`MIN_SITE_IMAGES` readable images are refused.

What it cannot do: learn anything that needs labels (the weights, the classes' boundaries), or
tell a tumour-free slice from a tumour slice. Whatever the folder holds defines the site's
"ordinary" images: tumour-free slices in it teach the abstention to accept tumour-free slices.
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import io
import logging
import os

import numpy as np
import torch
from torch import nn

from robustmri.abstention import AbstentionState, load_state, save_state
from robustmri.abstention.fit import detector_of
from robustmri.abstention.mahalanobis import (
    RIDGE,
    TARGET_ACCEPTANCE,
    MahalanobisDetector,
    calibrate_threshold,
    network_outputs,
)
from robustmri.abstention.scores import SCORES, CdfMean, Mahalanobis, build_score
from robustmri.abstention.state import abstention_path
from robustmri.data.transforms import ERROR_KEY
from robustmri.engine.checkpoint import load_weights
from robustmri.engine.model_metadata import (
    CALIBRATION_KEY,
    CALIBRATIONS_KEY,
    METADATA_FILE,
    TRAINING_DATA_FILE,
    code_version,
    file_sha256,
    metadata_path,
)
from robustmri.influence.adapter import unwrap
from robustmri.outputs import read_json, write_bytes, write_json

logger = logging.getLogger(__name__)

#: The calibrated checkpoint's file name (its abstention state: ``model_site_abstention.pt``).
SITE_CHECKPOINT = "model_site.pt"
#: Fewest readable site images calibration accepts: BatchNorm statistics of a handful of slices are noise, and the
#: 95 % quantile of 100 out-of-fold scores already has a binomial standard error of about 2 points.
MIN_SITE_IMAGES = 100
#: Fewest site images a class must be predicted for to get a centre of its own in the Mahalanobis score.
MIN_CLASS_IMAGES = 10
#: Folds of the cross-fitted threshold.
CROSS_FIT_FOLDS = 5
#: The "site images" kind of the abstention state's ``fitted_on`` / ``calibrated_on``.
SITE_IMAGES = "site images"
#: How the digest of the site images is computed (written beside it).
INPUT_DIGEST_RULE = ("sha256 of the newline-joined, sorted list of the sha256 (hex) of each readable input file's "
                     "bytes: no paths, independent of names and order")
CROSS_FIT_RULE = (f"{CROSS_FIT_FOLDS}-fold cross-fitting: the images are split into folds (by their folder when the "
                  f"inputs span at least {CROSS_FIT_FOLDS} folders, e.g. one per patient or series, else image by "
                  "image; a seeded permutation); each image is scored by a detector fitted on the other folds; the "
                  "threshold is the smallest score that accepts target_acceptance of these out-of-fold scores; the "
                  "detector written is refitted on all the images")
#: How site calibration refits the Mahalanobis score (``site_refit``), by name: what each keeps of the model's own
#: state (fitted on its training split) and how its threshold is set.
SITE_REFITS = {
    "full": ("class means and tied covariance refitted on the site images with the adapted model's predicted classes "
             "as pseudo-labels; threshold by " + CROSS_FIT_RULE),
    "means": ("class means refitted on the site images with the adapted model's predicted classes as pseudo-labels; "
              "the tied covariance of the model's own state (fitted on its training split) kept; threshold by "
              + CROSS_FIT_RULE),
    "threshold": ("class means and tied covariance of the model's own state (fitted on its training split) kept; "
                  "the threshold is the smallest score that accepts target_acceptance of the site images' scores on "
                  "the adapted network (nothing is fitted on them, so no fold is needed)"),
}
#: The product's site refit (``site_refit``).
DEFAULT_SITE_REFIT = "threshold"
#: The threshold rule of a score with nothing to fit (max_softmax, energy): no fold is needed.
QUANTILE_RULE = ("the score has nothing to fit, so the threshold is the smallest score that accepts target_acceptance "
                 "of the site images' scores on the adapted network")
#: The threshold rule of a combination of scores (:class:`~robustmri.abstention.scores.CdfMean`).
COMBINATION_RULE = (f"each component ranked on the site images: the Mahalanobis part refitted with pseudo-labels and "
                    f"its empirical CDF taken on its {CROSS_FIT_FOLDS}-fold out-of-fold scores (as in its own "
                    "cross-fitting), a part with nothing to fit on its scores of every site image; the threshold is the "
                    "smallest combined out-of-fold score that accepts target_acceptance of the site images")
#: The abstention scores site calibration refits (the state's score is kept): every registered score.
CALIBRATED_SCORES = tuple(SCORES)

BATCHNORM_RULE = ("running mean and variance reset and recomputed as the cumulative average over the calibration "
                  "batches (the images in a seeded random order) of each batch's statistics (momentum None, "
                  "BatchNorm layers in train mode, no gradients); weights and biases unchanged; "
                  "num_batches_tracked = the number of batches")


def batchnorm_layers(network: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer of ``network`` that keeps running statistics."""
    return [module for module in unwrap(network).modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats]


@torch.no_grad()
def adapt_batchnorm(network: nn.Module, images: torch.Tensor, batch_size: int = 64) -> int:
    """Recompute every BatchNorm layer's running statistics from ``images`` [N, C, H, W] (module docstring, 1).

    The images are run in batches of ``batch_size`` (a last batch of one image, which has no
    variance, joins the one before). The network ends in eval mode. Returns the number of batches
    run: 0 when the network has no BatchNorm layer (it is left unchanged).
    """
    layers = batchnorm_layers(network)
    if not layers:
        return 0
    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 for batch statistics, got {batch_size}")
    if len(images) < 2:
        raise ValueError(f"BatchNorm statistics need at least 2 images, got {len(images)}")
    bounds = [[start, min(start + batch_size, len(images))] for start in range(0, len(images), batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < 2:
        last = bounds.pop()
        bounds[-1][1] = last[1]
    momenta = [layer.momentum for layer in layers]
    device = next(unwrap(network).parameters()).device
    network.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average: batch k is weighted 1/k
        layer.train()
    try:
        for start, end in bounds:
            network(images[start:end].to(device))
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        network.eval()
    return len(bounds)


def _fit(features: np.ndarray, labels: np.ndarray, num_classes: int, min_class_images: int, ridge: float,
         home: MahalanobisDetector | None = None) -> tuple[MahalanobisDetector, list[int]]:
    """The detector with a centre for each class of at least ``min_class_images`` pseudo-labels (and those classes);
    the tied covariance is pooled over those classes' images, or, given ``home``, is the model's own (its precision
    factor and ridge kept: only the centres are refitted)."""
    counts = np.bincount(labels, minlength=num_classes)
    kept = [c for c in range(num_classes) if counts[c] >= min_class_images]
    if not kept:
        raise ValueError(f"no class was predicted for {min_class_images} or more site images (counts "
                         f"{counts.tolist()}): too few images to fit the abstention")
    rows = np.isin(labels, kept)
    remapped = np.searchsorted(np.asarray(kept), labels[rows])
    if home is not None:
        means = np.stack([features[labels == c].mean(axis=0) for c in kept])
        return MahalanobisDetector(means=means, precision_factor=home.precision_factor, ridge=home.ridge,
                                   n_train=int(rows.sum())), kept
    return MahalanobisDetector.fit(features[rows], remapped, len(kept), ridge), kept


def check_site_refit(refit: str) -> None:
    """Refuse, before any work, a refit that is not one of :data:`SITE_REFITS`."""
    if refit not in SITE_REFITS:
        raise ValueError(f"unknown site_refit {refit!r}; valid: {', '.join(SITE_REFITS)}")


def fold_assignment(groups: list[str], folds: int = CROSS_FIT_FOLDS, seed: int = 0) -> np.ndarray:
    """Fold [N] of each image: by group when there are at least ``folds`` distinct groups, else image by image;
    groups (or images) are dealt round-robin in a seeded random order."""
    if folds < 2:
        raise ValueError(f"cross-fitting needs at least 2 folds, got {folds}")
    keys = list(groups) if len(set(groups)) >= folds else list(range(len(groups)))
    unique = sorted(set(keys))
    order = np.random.default_rng(seed).permutation(len(unique))
    fold_of = {unique[index]: position % folds for position, index in enumerate(order)}
    return np.asarray([fold_of[key] for key in keys], dtype=np.int64)


def fit_site_abstention(features: np.ndarray, pseudo_labels: np.ndarray, num_classes: int, groups: list[str],
                        target_acceptance: float = TARGET_ACCEPTANCE, min_class_images: int = MIN_CLASS_IMAGES,
                        folds: int = CROSS_FIT_FOLDS, seed: int = 0, ridge: float = RIDGE, refit: str = "full",
                        home: MahalanobisDetector | None = None) -> dict:
    """The Mahalanobis detector refitted on site features [N, d] with pseudo-labels [N] as ``refit`` says
    (:data:`SITE_REFITS`; ``home``: the model's own detector, which ``means`` and ``threshold`` keep parts of), and
    its threshold (module docstring, 2): ``{"detector", "classes", "threshold", "acceptance", "out_of_fold_scores",
    "folds", "fold_groups", "rule"}``; ``acceptance`` is the share of the held-out scores accepted (``threshold``:
    of every site image's score, nothing being fitted)."""
    check_site_refit(refit)
    if refit != "full" and home is None:
        raise ValueError(f"site_refit {refit!r} keeps parts of the model's own Mahalanobis state: none was given")
    features = np.asarray(features, dtype=np.float64)
    pseudo_labels = np.asarray(pseudo_labels, dtype=np.int64).reshape(-1)
    if refit == "threshold":
        scores = home.score(features)
        threshold, acceptance = calibrate_threshold(scores, target_acceptance)
        return {"detector": home, "classes": list(range(len(home.means))), "threshold": threshold,
                "acceptance": acceptance, "out_of_fold_scores": scores, "folds": 0, "fold_groups": None,
                "rule": SITE_REFITS[refit]}
    kept_home = home if refit == "means" else None
    fold = fold_assignment(groups, folds, seed)
    scores = np.empty(len(features))
    for k in range(folds):
        held_out = fold == k
        if not held_out.any():
            continue
        detector, _ = _fit(features[~held_out], pseudo_labels[~held_out], num_classes, min_class_images, ridge,
                           kept_home)
        scores[held_out] = detector.score(features[held_out])
    threshold, acceptance = calibrate_threshold(scores, target_acceptance)
    detector, kept = _fit(features, pseudo_labels, num_classes, min_class_images, ridge, kept_home)
    return {"detector": detector, "classes": kept, "threshold": threshold, "acceptance": acceptance,
            "out_of_fold_scores": scores, "folds": folds,
            "fold_groups": "folder" if len(set(groups)) >= folds else "image", "rule": SITE_REFITS[refit]}


def fit_site_combination(strategy: CdfMean, features: np.ndarray, logits: np.ndarray, pseudo_labels: np.ndarray,
                         num_classes: int, groups: list[str], target_acceptance: float = TARGET_ACCEPTANCE,
                         min_class_images: int = MIN_CLASS_IMAGES, folds: int = CROSS_FIT_FOLDS, seed: int = 0,
                         ridge: float = RIDGE, refit: str = "full", home: MahalanobisDetector | None = None) -> dict:
    """A combination of scores refitted on site outputs (:data:`COMBINATION_RULE`; its Mahalanobis part as ``refit``
    says, with ``home`` the model's own, :func:`fit_site_abstention`): the state's ``arrays`` as
    :class:`~robustmri.abstention.scores.CdfMean` lays them out (each component's parameters and its
    ``cdf_reference``), the threshold and out-of-fold acceptance, and what :func:`fit_site_abstention` reports
    for its Mahalanobis part (``classes``, ``fold_groups``; none without one)."""
    logits = np.asarray(logits, dtype=np.float64)
    arrays, held_out_scores, fit = {}, [], {"detector": None, "classes": [], "fold_groups": None}
    for component in strategy.components:
        if isinstance(component, Mahalanobis):
            fit = fit_site_abstention(features, pseudo_labels, num_classes, groups, target_acceptance,
                                      min_class_images, folds, seed, ridge, refit, home)
            own = {"means": fit["detector"].means, "precision_factor": fit["detector"].precision_factor}
            scores = fit["out_of_fold_scores"]
        elif component.fit(features, logits, pseudo_labels) == {}:  # nothing to fit: every image is held out
            own, scores = {}, component.score({}, features, logits)
        else:
            raise ValueError(f"site calibration cannot refit the {component.name!r} part of {strategy.name!r}")
        arrays.update({f"{component.name}.{key}": value for key, value in own.items()})
        arrays[f"{component.name}.cdf_reference"] = np.sort(scores)
        held_out_scores.append(scores)
    combined = strategy.combine(held_out_scores, [arrays[f"{c.name}.cdf_reference"] for c in strategy.components])
    threshold, acceptance = calibrate_threshold(combined, target_acceptance)
    return {**fit, "threshold": threshold, "acceptance": acceptance, "out_of_fold_scores": combined,
            "arrays": arrays, "settings": {"ridge": float(home.ridge if home is not None else ridge)},
            "rule": (COMBINATION_RULE if refit == "full"
                     else f"{COMBINATION_RULE}; its Mahalanobis part: {SITE_REFITS[refit]}")}


def inputs_digest(files: list[str]) -> str:
    """:data:`INPUT_DIGEST_RULE` of ``files``."""
    return hashlib.sha256("\n".join(sorted(file_sha256(f) for f in files)).encode()).hexdigest()


def read_site_images(dataloader) -> tuple[torch.Tensor, list[str], list[dict]]:
    """``(images [N, 1, S, S], files, unreadable)`` from the file-inference data loader (``LoadPreprocessd`` with
    ``on_error="mark"``): unreadable files are ``{"file", "error"}``, not fatal here."""
    images, files, unreadable = [], [], []
    for batch in dataloader:
        errors = batch.get(ERROR_KEY) or [""] * len(batch["file"])
        for image, file, error in zip(batch["image"], batch["file"], errors):
            if error:
                unreadable.append({"file": file, "error": error})
            else:
                images.append(torch.as_tensor(image).float())
                files.append(file)
    return (torch.stack(images) if images else torch.empty(0)), files, unreadable


def _summarise_unreadable(unreadable: list[dict], total: int) -> None:
    if not unreadable:
        return
    reasons = collections.Counter(item["error"].split(" (")[0] for item in unreadable)  # the details name the file
    logger.warning("%d of %d input file(s) could not be read and are left out: %s", len(unreadable), total,
                   "; ".join(f"{n} x {reason}" for reason, n in reasons.most_common()))
    for item in unreadable:
        logger.info("not used: %s (%s)", item["file"], item["error"])


def _state_dict_bytes(network: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in unwrap(network).state_dict().items()}, buffer)
    return buffer.getvalue()


def _without_calibrations(content: dict) -> dict:
    return {k: v for k, v in content.items() if k not in (CALIBRATION_KEY, CALIBRATIONS_KEY)}


def check_output_folder(source_checkpoint: str, site_checkpoint: str) -> None:
    """Refuse a folder other than the source's that holds another model's ``model_metadata.json`` (one that
    differs from the source's in more than its calibrations): writing there would mix two models."""
    source_meta, site_meta = metadata_path(source_checkpoint), metadata_path(site_checkpoint)
    if os.path.abspath(source_meta) == os.path.abspath(site_meta) or not os.path.isfile(site_meta):
        return
    if _without_calibrations(read_json(site_meta)) != _without_calibrations(read_json(source_meta)):
        raise FileExistsError(f"{os.path.dirname(site_meta)} holds another model's {METADATA_FILE}: choose an empty "
                              "output_dir")


def write_site_metadata(source_checkpoint: str, site_checkpoint: str, record: dict) -> str:
    """Record the calibration in ``model_metadata.json`` (:func:`robustmri.engine.model_metadata.read_calibration`).

    Beside the source: ``calibrations[<file name>] = record`` in its metadata. In another folder: a copy
    of the source's metadata (without its calibrations) with ``calibration = record``, and of its
    training-data record, so that evaluation reads the data the model was trained on; a folder that
    holds another model's metadata is refused.
    """
    source_meta, site_meta = metadata_path(source_checkpoint), metadata_path(site_checkpoint)
    content = read_json(source_meta)
    if os.path.abspath(source_meta) == os.path.abspath(site_meta):
        content.setdefault(CALIBRATIONS_KEY, {})[os.path.basename(site_checkpoint)] = record
        return write_json(site_meta, content)
    check_output_folder(source_checkpoint, site_checkpoint)
    training_data = os.path.join(os.path.dirname(source_meta), TRAINING_DATA_FILE)
    if os.path.isfile(training_data):
        write_json(os.path.join(os.path.dirname(site_meta), TRAINING_DATA_FILE), read_json(training_data))
    return write_json(site_meta, {**_without_calibrations(content), CALIBRATION_KEY: record})


def check_calibrated_score(score: str, checkpoint_name: str = "the checkpoint") -> None:
    """Refuse, before any work, a score site calibration cannot refit (:data:`CALIBRATED_SCORES`)."""
    if score not in CALIBRATED_SCORES:
        raise ValueError(f"{checkpoint_name}'s abstention score {score!r} is not one site calibration refits "
                         f"({', '.join(CALIBRATED_SCORES)})")


def calibrate_network(network: nn.Module, images: torch.Tensor, num_classes: int, groups: list[str] | None = None,
                      target_acceptance: float = TARGET_ACCEPTANCE, min_class_images: int = MIN_CLASS_IMAGES,
                      batch_size: int = 64, seed: int = 0, score: str = "mahalanobis", refit: str = DEFAULT_SITE_REFIT,
                      home: AbstentionState | None = None) -> dict:
    """Calibrate ``network`` in place to site images [N, 1, S, S] held in memory, prepared as the model was trained
    (module docstring: BatchNorm statistics, then the abstention fitted on the adapted network).

    ``groups`` [N] (e.g. each image's folder) keep images together in the cross-fitting folds; None:
    image by image. ``score``: the abstention score to refit (:data:`CALIBRATED_SCORES`; the source state's).
    ``refit``: how its Mahalanobis part is refitted (:data:`SITE_REFITS`); ``home``: the model's own state, which
    every ``refit`` but ``full`` keeps parts of.
    Returns :func:`fit_site_abstention`'s result (for a score with nothing to fit: its threshold and acceptance,
    :data:`QUANTILE_RULE`) with ``score``, ``arrays`` and ``settings`` (the new state's), ``pseudo_labels`` [N],
    ``batches`` and ``batchnorm_layers``. What :func:`calibrate_site` does to files, for callers that
    hold the images (a benchmark's renderings).
    """
    check_calibrated_score(score)
    check_site_refit(refit)
    strategy = build_score(score)
    has_mahalanobis = isinstance(strategy, Mahalanobis) or (
        isinstance(strategy, CdfMean) and any(isinstance(c, Mahalanobis) for c in strategy.components))
    kept = None
    if has_mahalanobis and refit != "full":
        if home is None or home.score != score:
            raise ValueError(f"site_refit {refit!r} keeps parts of the model's own {score!r} abstention state, and "
                             f"{'none was found' if home is None else 'it holds ' + repr(home.score)}: fit it first "
                             "(evaluation or export fits it), or choose site_refit 'full'")
        kept = detector_of(home)
    images = torch.as_tensor(images).float()
    # files come sorted by path, often one patient's slices after another: batches in path order would each hold
    # one patient, and the average of their variances would miss the variation between patients
    shuffled = images[torch.from_numpy(np.random.default_rng(seed).permutation(len(images)))]
    batches = adapt_batchnorm(network, shuffled, batch_size)
    features, logits = network_outputs(network, images.numpy(), batch_size)
    predicted = logits.argmax(1)
    groups = list(groups) if groups is not None else [""] * len(images)
    if isinstance(strategy, CdfMean):
        fit = fit_site_combination(strategy, features, logits, predicted, num_classes, groups, target_acceptance,
                                   min_class_images, seed=seed, refit=refit, home=kept)
    elif score == "mahalanobis":
        fit = fit_site_abstention(features, predicted, num_classes, groups, target_acceptance, min_class_images,
                                  seed=seed, refit=refit, home=kept)
        fit.update(arrays={"means": fit["detector"].means, "precision_factor": fit["detector"].precision_factor},
                   settings={"ridge": fit["detector"].ridge})
    else:
        threshold, acceptance = calibrate_threshold(strategy.score({}, features, logits), target_acceptance)
        fit = {"detector": None, "classes": [], "threshold": threshold, "acceptance": acceptance,
               "fold_groups": None, "arrays": {}, "settings": {"ridge": RIDGE}, "rule": QUANTILE_RULE}
    return {**fit, "score": score, "refit": refit if has_mahalanobis else None, "pseudo_labels": predicted,
            "batches": batches, "batchnorm_layers": len(batchnorm_layers(network))}


#: What each site refit adapts of the Mahalanobis score, in words (the record's ``adapted``).
REFITTED = {"full": "Mahalanobis class means, tied covariance", "means": "Mahalanobis class means",
            "threshold": "nothing of the Mahalanobis score itself"}


def _adapted_abstention(score: str, refit: str = "full") -> str:
    """What calibration refitted of the abstention score called ``score``, in words (the record's ``adapted``)."""
    if score == "mahalanobis":
        return f"abstention: {REFITTED[refit]}, threshold"
    if isinstance(build_score(score), CdfMean):
        return (f"abstention: the {score} score's components ranked on the site images ({REFITTED[refit]} "
                "refitted where it has that part), threshold")
    return f"abstention: the {score} score's threshold (it has nothing else to fit)"


def site_checkpoint_path(checkpoint: str, output_dir: str | None = None) -> str:
    """Where :func:`calibrate_site` writes: ``model_site.pt`` in ``output_dir``, or beside ``checkpoint``."""
    folder = output_dir if output_dir else os.path.dirname(os.path.abspath(checkpoint))
    return os.path.join(folder, SITE_CHECKPOINT)


def calibrate_site(network: nn.Module, checkpoint: str, dataloader, class_names, output_dir: str | None = None,
                   target_acceptance: float = TARGET_ACCEPTANCE, min_images: int = MIN_SITE_IMAGES,
                   min_class_images: int = MIN_CLASS_IMAGES, batch_size: int = 64, seed: int = 0,
                   site_refit: str = DEFAULT_SITE_REFIT, abstention: AbstentionState | None = None) -> dict:
    """Calibrate ``checkpoint`` to a site's unlabelled images (module docstring); the calibration record.

    ``network``: the configured network (``checkpoint`` is loaded into it); ``dataloader``: file
    inference's (items ``{"image", "file", "error"}``); ``output_dir``: where ``model_site.pt`` goes
    (None or "": beside ``checkpoint``); ``site_refit``: how much of the model's Mahalanobis abstention is
    refitted (:data:`SITE_REFITS`; all but ``full`` need the model's own abstention state); ``abstention``: that
    state when the caller has it (the bundle's ``@abstention``, which loads it from beside the checkpoint or fits
    it on the training data), else the one beside ``checkpoint`` is read.
    """
    check_site_refit(site_refit)
    checkpoint = os.fspath(checkpoint)
    site = site_checkpoint_path(checkpoint, output_dir)
    if os.path.isfile(checkpoint) and os.path.exists(site) and os.path.samefile(site, checkpoint):
        raise ValueError(f"{checkpoint} would be overwritten by the calibration's output: calibrate the source "
                         "checkpoint or pass another output_dir")
    if not 0.0 < target_acceptance <= 1.0:
        raise ValueError(f"target_acceptance must be in (0, 1], got {target_acceptance}")
    load_weights(network, checkpoint, next(unwrap(network).parameters()).device)  # names a missing checkpoint
    if not os.path.isfile(metadata_path(checkpoint)):
        raise FileNotFoundError(f"no {METADATA_FILE} beside {checkpoint}: calibration needs the record of how it was "
                                "trained (input size, preprocessing)")
    check_output_folder(checkpoint, site)  # before anything is written there
    source_sha = file_sha256(checkpoint)
    source_state = abstention if abstention is not None else load_state(checkpoint, checkpoint_sha256=source_sha)
    if source_state is not None and source_state.checkpoint_sha256 != source_sha:
        raise ValueError(f"the abstention state given was fitted for other weights than {os.path.basename(checkpoint)}")
    score = source_state.score if source_state is not None else "mahalanobis"  # the site keeps the model's score
    if source_state is None and site_refit != "full":
        raise FileNotFoundError(
            f"{os.path.basename(checkpoint)} has no abstention state "
            f"({os.path.basename(abstention_path(checkpoint))}), "
            f"which site_refit {site_refit!r} keeps parts of: copy it from where the model was trained, let evaluation "
            "or export fit it, or choose site_refit 'full'")
    check_calibrated_score(score, os.path.basename(checkpoint))

    images, files, unreadable = read_site_images(dataloader)
    total = len(files) + len(unreadable)
    _summarise_unreadable(unreadable, total)
    if not files:
        raise ValueError(f"none of the {total} input file(s) could be read: nothing to calibrate on")
    if len(files) < min_images:
        raise ValueError(f"{len(files)} readable site image(s), fewer than the {min_images} calibration needs "
                         "(BatchNorm statistics from a handful of slices are noise)")

    fit = calibrate_network(network, images, len(class_names), [os.path.dirname(f) for f in files],
                            target_acceptance, min_class_images, batch_size, seed, score=score, refit=site_refit,
                            home=source_state)

    write_bytes(site, _state_dict_bytes(network))
    site_sha = file_sha256(site)
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    digest = inputs_digest(files)
    source = {"kind": SITE_IMAGES, "n": len(files), "sha256": digest, "date": today}
    state = AbstentionState(score=fit["score"], arrays=fit["arrays"],
                            threshold=fit["threshold"], target_acceptance=float(target_acceptance),
                            acceptance=fit["acceptance"], checkpoint_sha256=site_sha, fitted_on=dict(source),
                            calibrated_on=dict(source), settings=fit["settings"])
    state_file = save_state(state, site)
    counts = np.bincount(fit["pseudo_labels"], minlength=len(class_names))
    record = {
        "file": os.path.basename(site), "sha256": site_sha, "date": today,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source_checkpoint": {"file": os.path.basename(checkpoint), "sha256": source_sha},
        "images": {"n": len(files), "n_unreadable": len(unreadable), "sha256": digest,
                   "digest_rule": INPUT_DIGEST_RULE},
        "adapted": ["BatchNorm running statistics", _adapted_abstention(score, fit["refit"] or "full")],
        "not_adapted": "every weight and bias",
        "batchnorm": {"layers": fit["batchnorm_layers"], "batches": fit["batches"], "batch_size": int(batch_size),
                      "rule": BATCHNORM_RULE},
        "abstention": {"file": os.path.basename(state_file), "score": state.score, "threshold": state.threshold,
                       "target_acceptance": state.target_acceptance, "held_out_acceptance": state.acceptance,
                       "site_refit": fit["refit"], "rule": fit["rule"], "fold_groups": fit["fold_groups"],
                       "pseudo_labels": {str(name): int(n) for name, n in zip(class_names, counts)},
                       "classes_with_centre": [str(class_names[c]) for c in fit["classes"]],
                       "min_class_images": int(min_class_images)},
        "code": code_version(),
    }
    write_site_metadata(checkpoint, site, record)
    logger.info("calibrated %s on %d site image(s) (%d unreadable): %d BatchNorm layer(s) adapted, abstention "
                "threshold %.4g accepting %.1f %% of the site images out of fold (target %.0f %%); pseudo-labels %s "
                "-> %s", os.path.basename(checkpoint), len(files), len(unreadable), fit["batchnorm_layers"],
                state.threshold, 100 * state.acceptance, 100 * target_acceptance, record["abstention"]["pseudo_labels"],
                site)
    return record


__all__ = ["BATCHNORM_RULE", "CALIBRATED_SCORES", "COMBINATION_RULE", "CROSS_FIT_FOLDS", "CROSS_FIT_RULE",
           "DEFAULT_SITE_REFIT", "INPUT_DIGEST_RULE", "MIN_CLASS_IMAGES", "MIN_SITE_IMAGES", "QUANTILE_RULE",
           "REFITTED", "SITE_CHECKPOINT", "SITE_IMAGES", "SITE_REFITS", "adapt_batchnorm", "batchnorm_layers",
           "calibrate_network", "calibrate_site", "check_calibrated_score", "check_output_folder", "check_site_refit",
           "fit_site_abstention", "fit_site_combination", "fold_assignment", "inputs_digest", "read_site_images",
           "site_checkpoint_path", "write_site_metadata"]
