"""What the honest shift bench measures beyond accuracy: site calibration and abstention, per shift.

For a trained model and one seed's validation and test splits re-rendered under every shift
(:func:`robustmri.bench.shifts.shifted_test_sets`), two measurements treat each shift as a site:

- :func:`calibrated_by_shift`: the site calibration of the bundle's ``calibrating`` run
  (:func:`robustmri.deploy.calibration.calibrate_network`: BatchNorm statistics, then the abstention
  refitted as the product's ``site_refit`` says, from the model's own state beside the checkpoint) done on the
  shift's *validation* renderings, used as that
  site's unlabelled images (their labels are never read), then the calibrated model on the shift's
  *test* renderings: its accuracy, and the share of those slices the calibrated threshold accepts
  with the accuracy on them. The ``none`` shift (the clean re-rendering) is calibration at home.
  Test-time BatchNorm adaptation is the same first step, so this is also that lever's measurement.
- :func:`abstention_by_shift`: every abstention score of :data:`robustmri.abstention.scores.SCORES`
  fitted on the training split (the combination's reference on the home validation split), and its
  AURC on the home splits and on every shifted rendering (:func:`robustmri.bench.abstention.score_sets`);
  the score the rule of :func:`robustmri.bench.abstention.summarise` chooses on the shifted
  validation renderings is recorded with it, so the choice can be counted over seeds.

Both start from the checkpoint's own weights for every shift; the network is left with them.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import softmax

from robustmri.abstention.fit import item_arrays
from robustmri.abstention.mahalanobis import network_outputs
from robustmri.abstention.scores import SCORES
from robustmri.abstention.state import load_state
from robustmri.bench.abstention import score_sets, summarise
from robustmri.bench.shifts import REFERENCE, _cell, _mean_accuracy_by_seed
from robustmri.bench.stats import _table, mde_cell, paired_difference
from robustmri.data.shift_families import SEVERITIES
from robustmri.deploy.calibration import calibrate_network
from robustmri.engine.checkpoint import load_weights
from robustmri.evaluation.metrics import classification_report


def calibrated_by_shift(network: torch.nn.Module, checkpoint: str, validation: dict[str, list[dict]],
                        test: dict[str, list[dict]], class_names, seed: int = 0) -> tuple[dict[str, dict], dict]:
    """Per shift in both ``validation`` and ``test`` (``{shift: items}``): the model ``checkpoint`` calibrated on
    the shift's validation images (labels unread), on its test images: ``{shift: {accuracy, balanced_accuracy,
    n, calibration_images, accepted, accepted_accuracy}}`` (``accepted``: the share of test slices whose
    calibrated abstention score is at most the calibrated threshold; ``accepted_accuracy`` None when none is),
    and ``{shift: reason}`` for the shifts that could not be calibrated (fewer than 2 validation images, no test
    slice, or a calibration refused, e.g. no class predicted for enough images to fit the abstention)."""
    device = next(network.parameters()).device
    home = load_state(checkpoint)  # the model's own abstention, which the product's site refit keeps parts of
    results, skipped = {}, {}
    try:
        for shift, calibration_items in validation.items():
            if len(calibration_items) < 2 or not test.get(shift):
                skipped[shift] = (f"{len(calibration_items)} validation and {len(test.get(shift, []))} test "
                                  "slices: BatchNorm statistics need 2 images, and the test at least one")
                continue
            load_weights(network, checkpoint, device)
            images, _ = item_arrays(calibration_items)  # the site's images; their labels are not read
            try:
                fit = calibrate_network(network, torch.from_numpy(images), len(class_names), seed=seed, home=home)
            except ValueError as err:  # one shift the calibration refuses must not lose the others
                skipped[shift] = str(err)
                continue
            test_images, labels = item_arrays(test[shift])
            features, logits = network_outputs(network, test_images)
            report = classification_report(labels, softmax(logits, axis=1), class_names)
            accepted = fit["detector"].score(features) <= fit["threshold"]
            correct = logits.argmax(1) == labels
            results[shift] = {"accuracy": report["accuracy"], "balanced_accuracy": report["balanced_accuracy"],
                              "n": report["n"], "calibration_images": int(len(images)),
                              "accepted": float(accepted.mean()),
                              "accepted_accuracy": float(correct[accepted].mean()) if accepted.any() else None}
    finally:
        load_weights(network, checkpoint, device)
    return results, skipped


def abstention_by_shift(network: torch.nn.Module, checkpoint: str, train: list[dict], home: dict[str, list[dict]],
                        shifted: dict[str, dict[str, list[dict]]], scores=tuple(SCORES)) -> dict:
    """Every score's AURC at home and under every shift: ``{"sets": {set: row}, "choice": score name}``.

    ``train``: the training split's items (the scores' fit); ``home``: ``{"validation": items, "test": items}``
    as evaluated; ``shifted``: ``{"validation" | "test": {shift: items}}``. Rows as
    :func:`robustmri.bench.abstention.score_sets` makes them (n, accuracy, oracle AURC, per score AURC, excess
    AURC, risk at 95 % coverage); sets are named ``validation``, ``test`` and ``<split> / <shift>``."""
    device = next(network.parameters()).device
    load_weights(network, checkpoint, device)
    sets = {}
    for split, items in home.items():
        images, labels = item_arrays(items)
        sets[split] = {"split": split, "shift": None, "images": images, "labels": labels}
    for split, by_shift in shifted.items():
        for shift, items in by_shift.items():
            if items:
                images, labels = item_arrays(items)
                sets[f"{split} / {shift}"] = {"split": split, "shift": shift, "images": images, "labels": labels}
    rows, _ = score_sets(network, sets, item_arrays(train), scores, progress=False)
    _, choice = summarise(rows)
    return {"sets": rows, "choice": choice["score"], "chosen_by": choice["by"]}


# --- tables -------------------------------------------------------------------------------------

CALIBRATED = "calibrated_by_shift"
ABSTENTION = "abstention_by_shift"


def _groups(shifts: dict, rendered: set) -> list[tuple[str, list[str]]]:
    groups = [(f"`{REFERENCE}` (home)", [REFERENCE])] if REFERENCE in rendered else []
    for severity in SEVERITIES:
        names = [name for name, shift in shifts.items() if shift.severity == severity and name in rendered]
        if names:
            groups.append((f"{severity} (mean of {len(names)})", names))
    return groups


def _mean_by_seed(runs: list[dict], method: str, noise: str, names: list[str], field: str) -> dict[int, float]:
    """Per seed, ``field`` of the calibrated results (%) averaged over ``names``; None values are skipped."""
    by_seed = {}
    for run in runs:
        if run["method"] == method and run["noise"] == noise and run.get(CALIBRATED):
            values = [run[CALIBRATED][name][field] for name in names if name in run[CALIBRATED]]
            values = [v for v in values if v is not None]
            if values:
                by_seed[int(run["seed"])] = 100.0 * float(np.mean(values))
    return by_seed


def calibration_tables(runs: list[dict], shifts: dict) -> str:
    """Markdown: each configuration calibrated on every shift's validation renderings, on its test renderings.

    Per configuration and group of shifts (home, then each severity, averaged per seed): accuracy without and
    with calibration (mean over seeds), the paired difference calibrated − not (mean [95 % CI] k/n seeds where
    calibration scored higher, and the design's minimum detectable effect at 80 % power), the share of the
    shifted test slices the calibrated threshold accepts, and the accuracy on them."""
    runs = [r for r in runs if r.get(CALIBRATED)]
    if not runs:
        return "No run has site-calibration results."
    rendered = set.intersection(*(set(r[CALIBRATED]) for r in runs))
    rows = []
    for noise in dict.fromkeys(r["noise"] for r in runs):
        for method in dict.fromkeys(r["method"] for r in runs if r["noise"] == noise):
            for label, names in _groups(shifts, rendered):
                before = _mean_accuracy_by_seed(runs, method, noise, names, "test_by_shift")
                after = _mean_accuracy_by_seed(runs, method, noise, names, CALIBRATED)
                difference = paired_difference(after, before)
                accepted = _mean_by_seed(runs, method, noise, names, "accepted")
                accepted_accuracy = _mean_by_seed(runs, method, noise, names, "accepted_accuracy")
                rows.append([f"`{method}`", noise, label,
                             f"{np.mean(list(before.values())):.1f}" if before else "–",
                             f"{np.mean(list(after.values())):.1f}" if after else "–",
                             _cell(difference), mde_cell(difference),
                             f"{np.mean(list(accepted.values())):.1f}" if accepted else "–",
                             f"{np.mean(list(accepted_accuracy.values())):.1f}" if accepted_accuracy else "–"])
    return ("Site calibration (BatchNorm statistics and the abstention threshold from each shift's validation "
            "renderings, labels unread), on that shift's test renderings: accuracy %, mean over seeds; calibrated "
            "− not, points: mean [95 % CI] k/n seeds where calibration scored higher; MDE: the smallest "
            "difference this design detects at 80 % power; accepted: share of the test renderings the calibrated "
            "threshold accepts (target 95 %), and the accuracy on them.\n\n"
            + _table(["configuration", "noise", "shifts", "not calibrated", "calibrated", "calibrated − not", "MDE",
                      "accepted %", "accuracy accepted %"], rows))


def _aurc_by_seed(runs: list[dict], method: str, noise: str, score: str, split: str,
                  shifted: bool) -> dict[int, float]:
    """Per seed, the score's AURC (%) on the home ``split``, or averaged over its shifted renderings (``none`` out)."""
    by_seed = {}
    for run in runs:
        if run["method"] != method or run["noise"] != noise or not run.get(ABSTENTION):
            continue
        sets = run[ABSTENTION]["sets"]
        if shifted:
            values = [row["scores"][score]["aurc"] for row in sets.values()
                      if row["split"] == split and row["shift"] not in (None, REFERENCE) and score in row["scores"]]
        else:
            values = [sets[split]["scores"][score]["aurc"]] if score in sets.get(split, {}).get("scores", {}) else []
        if values:
            by_seed[int(run["seed"])] = 100.0 * float(np.mean(values))
    return by_seed


def abstention_tables(runs: list[dict], baseline: str = "mahalanobis") -> str:
    """Markdown: every abstention score's AURC at home and under the shifts, and how often the rule chose it.

    Per configuration and score: AURC % on the home test split and averaged over the shifted test renderings
    (mean over seeds; lower is better), the paired difference ``baseline`` − score on the shifted test
    renderings (mean [95 % CI] k/n seeds where the score's AURC was lower, and the minimum detectable effect),
    and in how many seeds the rule (lowest mean AURC over the shifted *validation* renderings) chose it."""
    runs = [r for r in runs if r.get(ABSTENTION)]
    if not runs:
        return "No run has abstention results."
    rows = []
    for noise in dict.fromkeys(r["noise"] for r in runs):
        for method in dict.fromkeys(r["method"] for r in runs if r["noise"] == noise):
            mine = [r for r in runs if r["method"] == method and r["noise"] == noise]
            scores = list(next(iter(mine[0][ABSTENTION]["sets"].values()))["scores"])
            reference = _aurc_by_seed(runs, method, noise, baseline, "test", True)
            for score in scores:
                home = _aurc_by_seed(runs, method, noise, score, "test", False)
                shifted = _aurc_by_seed(runs, method, noise, score, "test", True)
                difference = paired_difference(reference, shifted)
                chosen = sum(r[ABSTENTION]["choice"] == score for r in mine)
                rows.append([f"`{method}`", noise, f"`{score}`",
                             f"{np.mean(list(home.values())):.2f}" if home else "–",
                             f"{np.mean(list(shifted.values())):.2f}" if shifted else "–",
                             "" if score == baseline else _cell(difference),
                             "" if score == baseline else mde_cell(difference), f"{chosen}/{len(mine)}"])
    return (f"Abstention scores by risk-coverage (AURC %, lower is better; mean over seeds) on the home test split "
            f"and averaged over the shifted test renderings; {baseline} − score on the shifted test renderings, "
            "points: mean [95 % CI] k/n seeds where the score's AURC was lower, and the design's minimum detectable "
            "effect; chosen: seeds in which the rule (lowest mean AURC over the shifted validation renderings) "
            "chose the score.\n\n"
            + _table(["configuration", "noise", "score", "home test", "shifted test", f"{baseline} − score", "MDE",
                      "chosen"], rows))


__all__ = ["abstention_by_shift", "abstention_tables", "calibrated_by_shift", "calibration_tables"]
