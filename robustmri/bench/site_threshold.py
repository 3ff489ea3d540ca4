"""Does a site-calibrated abstention threshold accept the share of the site's images it promises?

Site calibration (:mod:`robustmri.deploy.calibration`) adapts BatchNorm statistics to a site's unlabelled
slices, then refits the Mahalanobis abstention so that ``target_acceptance`` (95 %) of the site's ordinary
images are accepted. How much it refits is :data:`~robustmri.deploy.calibration.SITE_REFITS`: ``full`` (class
means and tied covariance from the site's images), ``means`` (class means only, the model's own covariance
kept) or ``threshold`` (the model's own detector kept, only the threshold set). The more is fitted on a few
hundred images, the more the site's own images look familiar and new images of the same site do not.

For a trained model and its validation and test splits rendered under every shift of the honest shift bench
(:func:`robustmri.bench.shifts.shifted_test_sets`, each shift a site), every refit is applied to:

- **halves** (a choice may use these): each shift's validation renderings split by patient group into two
  halves (a seeded permutation of the groups, :func:`split_by_group`); calibrated on one half, the other half
  is checked, then the other way round;
- **test**: calibrated on the shift's validation renderings, checked on its test renderings (patients the
  calibration never saw).

Per check: ``accepted`` (the share of the checked slices whose calibrated score is at most the calibrated
threshold), ``right_and_accepted`` (accepted and classified right: an abstention counts as not right),
``selective_risk`` (the error among the accepted; None when none is) and ``other_contrast_accepted`` (the share
of the public slices of another contrast, :func:`robustmri.bench.tumour_free.nibabel_volume_slices`, that the
calibrated model accepts). BatchNorm adaptation is the same for every refit, so accuracy does not depend on it.
The labels of the calibration images are never read.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from robustmri.abstention.fit import item_arrays
from robustmri.abstention.mahalanobis import network_outputs
from robustmri.abstention.state import AbstentionState
from robustmri.deploy.calibration import MIN_CLASS_IMAGES, SITE_REFITS, calibrate_network
from robustmri.engine.checkpoint import load_weights

#: The check sets of one shift: calibrated on the first, checked on the second.
CHECKS = ("half_a", "half_b", "test")


def split_by_group(items: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    """Two halves of ``items`` by patient group (``group``): the groups in a permutation seeded by ``seed``, the
    first half of them (rounded down) in the first half. A patient is never in both."""
    groups = sorted({int(item["group"]) for item in items})
    if len(groups) < 2:
        raise ValueError(f"splitting by patient needs at least 2 patient groups, got {len(groups)}")
    order = np.random.default_rng(seed).permutation(len(groups))
    first = {groups[i] for i in order[:len(groups) // 2]}
    return ([item for item in items if int(item["group"]) in first],
            [item for item in items if int(item["group"]) not in first])


def _check(network, fit: dict, images: np.ndarray, labels: np.ndarray | None) -> dict:
    features, logits = network_outputs(network, images)
    accepted = fit["detector"].score(features) <= fit["threshold"]
    result = {"n": int(len(images)), "accepted": float(accepted.mean())}
    if labels is not None:
        right = logits.argmax(1) == labels
        result.update(accuracy=float(right.mean()), right_and_accepted=float((right & accepted).mean()),
                      selective_risk=float(1.0 - right[accepted].mean()) if accepted.any() else None)
    return result


def site_threshold_checks(network: torch.nn.Module, checkpoint: str, home: AbstentionState,
                          validation: dict[str, list[dict]], test: dict[str, list[dict]], other_contrast: np.ndarray,
                          num_classes: int, refits=tuple(SITE_REFITS), seed: int = 0,
                          min_class_images: int = MIN_CLASS_IMAGES, progress: bool = True) -> dict:
    """``{shift: {check: {refit: result}}}`` (module docstring) for every shift in both ``validation`` and ``test``
    (``{shift: items}``, the model's own preparation), and ``{shift: reason}`` of the checks a calibration refused.

    ``home``: the model's own abstention state (the Mahalanobis score); ``other_contrast``: prepared slices of
    another contrast [M, 1, S, S]; ``seed``: the halves' permutation and the calibration's batch order;
    ``min_class_images``: as the calibration's. The network is left with the checkpoint's weights."""
    if home.score != "mahalanobis":
        raise ValueError(f"this measurement applies the Mahalanobis score; the model's state holds {home.score!r}")
    device = next(network.parameters()).device
    results, refused = {}, {}
    shifts = [shift for shift in validation if test.get(shift)]
    try:
        for shift in tqdm(shifts, desc="site thresholds", unit="shift", disable=not progress, leave=False):
            half_a, half_b = split_by_group(validation[shift], seed)
            pairs = {"half_a": (half_b, half_a), "half_b": (half_a, half_b), "test": (validation[shift], test[shift])}
            results[shift] = {}
            for check, (calibration, checked) in pairs.items():
                images, _ = item_arrays(calibration)  # the site's images; their labels are not read
                checked_images, labels = item_arrays(checked)
                results[shift][check] = {}
                for refit in refits:
                    load_weights(network, checkpoint, device)
                    try:
                        fit = calibrate_network(network, torch.from_numpy(images), num_classes,
                                                min_class_images=min_class_images, seed=seed, refit=refit, home=home)
                    except ValueError as err:  # one refused calibration must not lose the others
                        refused[f"{shift} / {check} / {refit}"] = str(err)
                        continue
                    result = _check(network, fit, checked_images, labels)
                    result["other_contrast_accepted"] = _check(network, fit, other_contrast, None)["accepted"]
                    result["calibration_images"] = int(len(images))
                    results[shift][check][refit] = result
    finally:
        load_weights(network, checkpoint, device)
    return {"shifts": results, "refused": refused}


def summary(checks: list[dict], shifts: list[str], field: str, check_names, refit: str) -> float | None:
    """The mean of ``field`` over ``shifts`` and ``check_names`` of one model's checks (None values skipped)."""
    values = [record[field] for entry in checks for shift in shifts if shift in entry["shifts"]
              for check in check_names if refit in entry["shifts"][shift].get(check, {})
              for record in [entry["shifts"][shift][check][refit]] if record.get(field) is not None]
    return float(np.mean(values)) if values else None


__all__ = ["CHECKS", "site_threshold_checks", "split_by_group", "summary"]
