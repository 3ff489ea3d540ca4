"""Classify one DICOM series: order, check completeness, decode, normalise, batched ONNX inference, series result.

Aggregation rule (:data:`AGGREGATION_RULE`): the series' class probabilities are the mean of
its assessable slices' probabilities; the series class is their argmax. The per-slice table is kept.

Out-of-distribution abstention (:mod:`robustmri.deploy.onnx.ood`): the model must carry its detector
(a model without one is refused with :class:`~robustmri.deploy.onnx.trust.ModelMetadataError`).
Each slice gets its ``ood_score`` (higher = more out of distribution) and ``assessable`` (score at
or below the model's threshold); a not-assessable slice does not vote. A series with more than the
model's share of not-assessable slices (``ood_series_max_not_assessable`` in its metadata, 50 % by
default) gets no tumour class: its status is ``"abstained"``, with the reason in words in the
report and in the SR (which is still written and says that no tumour type is issued).
"""

from __future__ import annotations

import time

import numpy as np

from robustmri.data.readers import ImageReadError
from robustmri.deploy.dicom.integrity import completeness_problem, order_slices
from robustmri.deploy.dicom.pixels import slice_pixels
from robustmri.deploy.dicom.series import DicomSeries

AGGREGATION_RULE = ("mean of the slice probabilities over every assessable slice of the series (out-of-distribution "
                    "score at or below the model's threshold); the series class is the class of highest mean "
                    "probability")
#: Slice statuses of the slices the model was run on (the SR's evidence): voting, or not assessable.
EXAMINED = ("classified", "not_assessable")
ON_SLICE_ERROR = ("fail", "skip")


class SeriesNotClassified(Exception):
    def __init__(self, reason: str, slice_rows: list[dict] | None = None):
        super().__init__(reason)
        self.reason = reason
        self.slice_rows = slice_rows or []


def classify_series(series: DicomSeries, classifier, batch_size: int = 32, on_slice_error: str = "fail",
                    allow_incomplete: bool = False) -> dict:
    """Per-slice and series-level result of one selected series (slices ordered in place).

    A refused series (``series.refusal``) is never classified. An incomplete series
    (:func:`~robustmri.deploy.dicom.integrity.completeness_problem`) is not classified unless
    ``allow_incomplete``; then the record has ``"complete": False`` and ``incomplete_reason``.
    A slice that cannot be decoded fails the series (``on_slice_error="fail"``, default: no
    result from an incomplete series) or is left out and counted (``"skip"``). A slice the model's preprocessing
    refuses (constant, e.g. blank padding, or no head found) is always left out, listed as excluded with its
    reason, and does not vote.

    Every slice run through the model gets ``ood_score`` and ``assessable``; a not-assessable slice
    has status ``"not_assessable"`` (its probabilities kept for audit, no class) and does not vote.
    When more than the model's share (``ood_series_max_not_assessable``) of those slices are not
    assessable, the record's status is ``"abstained"``: ``result["class"]`` and
    ``result["probabilities"]`` are None and ``result["abstention_reason"]`` says why. A model
    without a detector raises :class:`~robustmri.deploy.onnx.trust.ModelMetadataError`.
    """
    detector = classifier.require_detector()
    if on_slice_error not in ON_SLICE_ERROR:
        raise ValueError(f"on_slice_error must be one of {ON_SLICE_ERROR}, got {on_slice_error!r}")
    incomplete = _ordered_and_complete(series, allow_incomplete)
    start = time.perf_counter()
    rows, inputs, used = _prepare_slices(series, classifier)
    decode_s = time.perf_counter() - start
    errors = _readable_enough(rows, used, on_slice_error)
    start = time.perf_counter()
    probabilities, scores = _predict(classifier, inputs, batch_size)
    infer_s = time.perf_counter() - start
    assessable = classifier.is_assessable(scores)
    _record_slice_results(used, probabilities, scores, assessable, classifier.class_names)
    status, result, ood = _series_result(rows, used, errors, probabilities, assessable, classifier.class_names,
                                         detector)
    return {
        "series_instance_uid": series.series_instance_uid,
        "study_instance_uid": series.study_instance_uid,
        "modality": series.modality,
        "series_description": series.series_description,
        "status": status,
        "complete": incomplete is None,
        "incomplete_reason": incomplete,
        "result": result,
        "out_of_distribution": ood,
        "ordering": series.ordering,
        "slices": rows,
        "timing_s": {"decode_preprocess": round(decode_s, 4), "inference": round(infer_s, 4)},
    }


def _ordered_and_complete(series: DicomSeries, allow_incomplete: bool) -> str | None:
    """Order the slices; raise SeriesNotClassified for a refused series, or an incomplete one unless allowed.
    Returns why the series is incomplete (None when it is complete)."""
    if series.refusal:
        raise SeriesNotClassified(series.refusal)
    order_slices(series)
    incomplete = completeness_problem(series)
    if incomplete and not allow_incomplete:
        raise SeriesNotClassified(f"incomplete series: {incomplete}; no result from an incomplete series "
                                  "(allow_incomplete classifies it, marked incomplete)")
    return incomplete


def _prepare_slices(series: DicomSeries, classifier) -> tuple[list[dict], list[np.ndarray], list[dict]]:
    """A row per slice, the model inputs of the slices that could be decoded and prepared, and their rows."""
    rows, inputs, used = [], [], []
    for index, image in enumerate(series.slices):
        row = {"index": index, "instance_number": image.instance_number,
               "position_mm": None if image.position_mm is None else round(image.position_mm, 3),
               "sop_instance_uid": image.sop_instance_uid, "frame": image.frame, "file": image.path}
        rows.append(row)
        try:
            inputs.append(classifier.prepare(slice_pixels(image))[0])
        except ImageReadError as err:
            row.update(status="error", reason=err.reason)
            continue
        except ValueError as err:  # constant image, or no head found
            row.update(status="excluded", reason=str(err))
            continue
        used.append(row)
    return rows, inputs, used


def _readable_enough(rows: list[dict], used: list[dict], on_slice_error: str) -> list[dict]:
    """The rows of unreadable slices; SeriesNotClassified when they fail the series or nothing is left to classify."""
    errors = [row for row in rows if row.get("status") == "error"]
    if errors and on_slice_error == "fail":
        raise SeriesNotClassified(f"{len(errors)} of {len(rows)} slice(s) could not be read (e.g. "
                                  f"{errors[0]['reason']}); no result from an incomplete series "
                                  "(on_slice_error='skip' classifies the readable slices)", rows)
    if not used:
        raise SeriesNotClassified(f"none of the {len(rows)} slice(s) could be classified", rows)
    return errors


def _predict(classifier, inputs: list[np.ndarray], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and out-of-distribution scores of the prepared slices, in batches of ``batch_size``."""
    batch = np.stack(inputs)[:, None]
    outputs = [classifier.predict_with_scores(batch[i:i + batch_size]) for i in range(0, len(batch), batch_size)]
    return np.concatenate([p for p, _ in outputs]), np.concatenate([s for _, s in outputs])


def _record_slice_results(used: list[dict], probabilities, scores, assessable, names) -> None:
    """Each examined slice's status, score and probabilities; its class when it is assessable."""
    for row, p, score, ok in zip(used, probabilities, scores, assessable):
        row.update(status="classified" if ok else "not_assessable", ood_score=float(score), assessable=bool(ok),
                   probabilities={name: float(v) for name, v in zip(names, p)})
        if ok:
            row["class"] = names[int(p.argmax())]


def _series_result(rows, used, errors, probabilities, assessable, names, detector: dict) -> tuple[str, dict, dict]:
    """The series' status, its result (class and mean probabilities, or the abstention and why) and its
    out-of-distribution record."""
    n_not_assessable = int((~assessable).sum())
    voting = [row for row in used if row["assessable"]]
    counts = {"n_slices": len(rows), "n_assessed": len(used), "n_not_assessable": n_not_assessable,
              "n_classified": len(voting), "n_failed": len(errors), "n_excluded": len(rows) - len(used) - len(errors)}
    ood = {"threshold": detector["threshold"], "target_acceptance": detector["target_acceptance"],
           "series_max_not_assessable": detector["series_max_not_assessable"],
           "abstention_rule": detector["abstention_rule"],
           "not_assessable_share": n_not_assessable / len(used)}
    if n_not_assessable / len(used) > detector["series_max_not_assessable"]:
        return "abstained", {"class": None, "probabilities": None, **counts, "n_agreeing": None,
                             "abstention_reason": abstention_reason(n_not_assessable, len(used), detector)}, ood
    mean = probabilities[assessable].mean(axis=0)
    label = names[int(mean.argmax())]
    return "classified", {"class": label, "probabilities": {name: float(v) for name, v in zip(names, mean)},
                          "aggregation": AGGREGATION_RULE, **counts,
                          "n_agreeing": int(sum(row["class"] == label for row in voting))}, ood


def abstention_reason(n_not_assessable: int, n_assessed: int, detector: dict) -> str:
    """Why a series gets no tumour class, in words (report and SR)."""
    return (f"{n_not_assessable} of {n_assessed} slice(s) ({n_not_assessable / n_assessed:.0%}) are not assessable: "
            f"their out-of-distribution score is above the model's threshold {detector['threshold']:.4g} (set to "
            f"accept {detector['target_acceptance']:.0%} of in-distribution validation slices), so the model cannot "
            f"vouch for them; the rule allows at most {detector['series_max_not_assessable']:.0%} per series")
