"""Classify DICOM series: scan -> select -> order -> decode -> normalise -> batched ONNX inference
-> series-level result -> JSON report and DICOM SR per series, plus a run summary.

Aggregation rule (:data:`AGGREGATION_RULE`): the series' class probabilities are the mean of
its slices' probabilities; the series class is their argmax. The per-slice table is kept.

Series integrity and completeness (:mod:`robustmri.deploy.dicom_series`): a SeriesInstanceUID
whose files disagree on patient, study, modality or geometry is refused (never classified; each
of its files is listed as not used); an incomplete series (duplicate positions, missing slices)
gives no result unless ``allow_incomplete`` is set, and then its record says ``"complete": false``
with the reason. The refusal on patient, study or modality is never relaxed.

Bad input never aborts other series: unusable files and series are listed with their reason
in ``summary.json`` and in the log. Reports and logs carry no PatientName, PatientID or
PatientBirthDate; file paths that contain one are redacted (:class:`Redactor`).
"""

from __future__ import annotations

import logging
import os
import re
import time

import numpy as np

from robustmri.data.readers import ImageReadError, as_path_list
from robustmri.deploy.dicom_series import (
    GROUPING_POLICY,
    DicomSeries,
    SeriesSelection,
    SkippedFile,
    completeness_problem,
    order_slices,
    scan_folders,
    select_series,
    slice_pixels,
)
from robustmri.deploy.dicom_sr import SERIES_DESCRIPTION, write_sr
from robustmri.deploy.model_trust import DEMO_MODEL_NOTICE, check_demo_model, model_line
from robustmri.outputs import write_json

logger = logging.getLogger(__name__)

AGGREGATION_RULE = ("mean of the slice probabilities over every classified slice of the series; "
                    "the series class is the class of highest mean probability")
ON_SLICE_ERROR = ("fail", "skip")
REDACTED = "[redacted]"


class SeriesNotClassified(Exception):
    def __init__(self, reason: str, slice_rows: list[dict] | None = None):
        super().__init__(reason)
        self.reason = reason
        self.slice_rows = slice_rows or []


class Redactor:
    """Replace patient identifiers in free text such as file paths (``/pacs/DOE^JOHN/...``).

    Case-insensitive, whole words only (not inside a longer run of letters or digits), so that a
    name part such as "Ann" does not eat "annotation".
    """

    def __init__(self, identifiers):
        words = sorted({str(w) for w in identifiers if len(str(w)) >= 3}, key=len, reverse=True)
        alternatives = "|".join(map(re.escape, words))
        self.pattern = (re.compile(f"(?<![A-Za-z0-9])(?:{alternatives})(?![A-Za-z0-9])", re.IGNORECASE)
                        if words else None)

    def __call__(self, text):
        if self.pattern is None or not isinstance(text, str):
            return text
        return self.pattern.sub(REDACTED, text)


def classify_series(series: DicomSeries, classifier, batch_size: int = 32, on_slice_error: str = "fail",
                    allow_incomplete: bool = False) -> dict:
    """Per-slice and series-level result of one selected series (slices ordered in place).

    A refused series (``series.refusal``) is never classified. An incomplete series
    (:func:`~robustmri.deploy.dicom_series.completeness_problem`) is not classified unless
    ``allow_incomplete``; then the record has ``"complete": False`` and ``incomplete_reason``.
    A slice that cannot be decoded fails the series (``on_slice_error="fail"``, default: no
    result from an incomplete series) or is left out and counted (``"skip"``). A constant slice
    (no contrast, e.g. blank padding) is always left out and listed as excluded.
    """
    if on_slice_error not in ON_SLICE_ERROR:
        raise ValueError(f"on_slice_error must be one of {ON_SLICE_ERROR}, got {on_slice_error!r}")
    if series.refusal:
        raise SeriesNotClassified(series.refusal)
    order_slices(series)
    incomplete = completeness_problem(series)
    if incomplete and not allow_incomplete:
        raise SeriesNotClassified(f"incomplete series: {incomplete}; no result from an incomplete series "
                                  "(allow_incomplete classifies it, marked incomplete)")
    start = time.perf_counter()
    rows, inputs, used = [], [], []
    for index, image in enumerate(series.slices):
        row = {"index": index, "instance_number": image.instance_number,
               "position_mm": None if image.position_mm is None else round(image.position_mm, 3),
               "sop_instance_uid": image.sop_instance_uid, "file": image.path}
        rows.append(row)
        try:
            inputs.append(classifier.prepare(slice_pixels(image))[0])
        except ImageReadError as err:
            row.update(status="error", reason=err.reason)
            continue
        except ValueError as err:  # constant image
            row.update(status="excluded", reason=str(err))
            continue
        used.append(row)
    decode_s = time.perf_counter() - start
    errors = [row for row in rows if row.get("status") == "error"]
    if errors and on_slice_error == "fail":
        raise SeriesNotClassified(f"{len(errors)} of {len(rows)} slice(s) could not be read (e.g. "
                                  f"{errors[0]['reason']}); no result from an incomplete series "
                                  "(on_slice_error='skip' classifies the readable slices)", rows)
    if not used:
        raise SeriesNotClassified(f"none of the {len(rows)} slice(s) could be classified", rows)
    start = time.perf_counter()
    batch = np.stack(inputs)[:, None]
    probabilities = np.concatenate([classifier.predict(batch[i:i + batch_size])
                                    for i in range(0, len(batch), batch_size)])
    infer_s = time.perf_counter() - start
    names = classifier.class_names
    for row, p in zip(used, probabilities):
        row.update(status="classified", **{"class": names[int(p.argmax())]},
                   probabilities={name: float(v) for name, v in zip(names, p)})
    mean = probabilities.mean(axis=0)
    label = names[int(mean.argmax())]
    return {
        "series_instance_uid": series.series_instance_uid,
        "study_instance_uid": series.study_instance_uid,
        "modality": series.modality,
        "series_description": series.series_description,
        "status": "classified",
        "complete": incomplete is None,
        "incomplete_reason": incomplete,
        "result": {"class": label, "probabilities": {name: float(v) for name, v in zip(names, mean)},
                   "aggregation": AGGREGATION_RULE,
                   "n_slices": len(rows), "n_classified": len(used),
                   "n_agreeing": int(sum(row["class"] == label for row in used)),
                   "n_failed": len(errors), "n_excluded": len(rows) - len(used) - len(errors)},
        "ordering": series.ordering,
        "slices": rows,
        "timing_s": {"decode_preprocess": round(decode_s, 4), "inference": round(infer_s, 4)},
    }


def sr_text(record: dict, model: dict) -> tuple[str, list[str]]:
    """The SR's finding sentence and its method lines."""
    result = record["result"]
    label = result["class"]
    finding = (f"Predicted tumour type: {label} (mean probability {result['probabilities'][label]:.2f} over "
               f"{result['n_classified']} slice(s); {result['n_agreeing']} of them predict {label} on their own).")
    if model.get("demo_model"):
        finding = f"{DEMO_MODEL_NOTICE}. {finding}"
    details = [] if record.get("complete", True) else [
        f"INCOMPLETE SERIES, classified only because incomplete series were allowed: {record['incomplete_reason']}."]
    details += [
        "Probabilities: " + ", ".join(f"{name} {p:.3f}" for name, p in result["probabilities"].items()) + ".",
        f"Aggregation: {AGGREGATION_RULE}.",
        f"Slices: {result['n_slices']} in the series, {result['n_classified']} classified, "
        f"{result['n_failed']} unreadable, {result['n_excluded']} excluded (no contrast).",
        f"Slice order: {record['ordering']}.",
        model_line(model),
        f"Preprocessing: RescaleSlope/Intercept, then {model.get('intensity_normalisation')} to "
        f"{model.get('spatial_size')} x {model.get('spatial_size')}.",
    ]
    return finding, details


def infer_dicom(inputs, classifier, output_dir: str | os.PathLike, selection: SeriesSelection | None = None,
                batch_size: int = 32, on_slice_error: str = "fail", write_sr_files: bool = True,
                progress: bool = True, allow_incomplete: bool = False, allow_demo_model: bool = False) -> dict:
    """Classify every selected series under ``inputs`` (folders or files); write reports; return the summary.

    Per classified series ``<SeriesInstanceUID>.json`` (per-slice table, series result, model)
    and ``<SeriesInstanceUID>.sr.dcm``; for the run ``summary.json`` (every series and skipped file
    with its reason). A refused SeriesInstanceUID (files disagreeing on patient, study, modality or
    geometry) is among the skipped series and each of its files among the skipped files. An
    incomplete series is skipped with its reason unless ``allow_incomplete`` (default False): then
    it is classified and marked ``"complete": false`` in its report, the summary and the SR.
    A demo model (trained on the embedded synthetic set) is refused unless ``allow_demo_model``;
    then every report, the summary and the SR say DEMO MODEL.
    """
    check_demo_model(classifier.describe(), allow_demo_model)
    total_start = time.perf_counter()
    output_dir = os.fspath(output_dir)
    scan = scan_folders(inputs, progress=progress)
    redact = Redactor(scan.identifiers)
    selected, rejected = select_series(scan.series, selection)
    model = classifier.describe()
    skipped_files = list(scan.skipped_files)
    skipped_series = [_skipped_series(s, reason) for s, reason in rejected]
    # every file of a refused SeriesInstanceUID is listed as not used, with the series' reason
    skipped_files += [SkippedFile(image.path, f"not used: {s.refusal}") for s, _ in rejected if s.refusal
                      for image in s.slices]
    classified = []
    os.makedirs(output_dir, exist_ok=True)
    for series in selected:
        start = time.perf_counter()
        try:
            record = classify_series(series, classifier, batch_size, on_slice_error, allow_incomplete)
        except SeriesNotClassified as err:
            record, rows = None, err.slice_rows
            skipped_series.append(_skipped_series(series, err.reason))
        else:
            rows = record["slices"]
        # unreadable slices are reported whether they failed the series or were left out of it
        skipped_files += [SkippedFile(row["file"], row["reason"]) for row in rows if row.get("status") == "error"]
        if record is None:
            continue
        record["model"] = model
        record["not_for_clinical_use"] = True
        stem = os.path.join(output_dir, series.series_instance_uid)
        if write_sr_files:
            finding, details = sr_text(record, model)
            references = [(s.sop_class_uid, s.sop_instance_uid) for s, row in zip(series.slices, record["slices"])
                          if row["status"] == "classified"]
            record["sr_file"] = write_sr(stem + ".sr.dcm", series.header, series.series_instance_uid, references,
                                         finding, details)
            record["sr_series_description"] = SERIES_DESCRIPTION
        record["report_file"] = stem + ".json"
        record["timing_s"]["series_total"] = round(time.perf_counter() - start, 4)
        record = _redacted(record, redact)
        write_json(stem + ".json", record)
        classified.append(record)
        logger.info("series %s: %s (%d slices) -> %s", series.series_instance_uid, record["result"]["class"],
                    record["result"]["n_classified"], record["report_file"])
    summary = {
        "inputs": [redact(os.path.abspath(p)) for p in as_path_list(inputs)],
        "n_files": scan.n_files,
        "n_series_found": len(scan.series),
        "n_series_classified": len(classified),
        "provider": model["provider"],
        "model": _redacted(model, redact),
        "aggregation": AGGREGATION_RULE,
        "grouping_policy": GROUPING_POLICY,
        "allow_incomplete": allow_incomplete,
        "series": [{"series_instance_uid": r["series_instance_uid"], "class": r["result"]["class"],
                    "probability": r["result"]["probabilities"][r["result"]["class"]],
                    "n_slices": r["result"]["n_classified"], "complete": r["complete"],
                    "incomplete_reason": r["incomplete_reason"], "report_file": r["report_file"],
                    "sr_file": r.get("sr_file")} for r in classified],
        "skipped_series": _redacted(skipped_series, redact),
        "skipped_files": [{"file": redact(item.path), "reason": redact(item.reason)} for item in skipped_files],
        "seconds": round(time.perf_counter() - total_start, 4),
        "not_for_clinical_use": True,
    }
    write_json(os.path.join(output_dir, "summary.json"), summary)
    for item in summary["skipped_files"]:
        logger.warning("skipped file %s: %s", item["file"], item["reason"])
    for item in summary["skipped_series"]:
        logger.warning("skipped series %s (%s, %d file(s)): %s", item["series_instance_uid"], item["modality"] or "?",
                       item["n_files"], item["reason"])
    logger.info("%d file(s), %d series found, %d classified on %s, %d series and %d file(s) skipped -> %s",
                scan.n_files, len(scan.series), len(classified), model["provider"], len(summary["skipped_series"]),
                len(summary["skipped_files"]), output_dir)
    return summary


#: Fields that carry text from outside (paths, reasons, descriptions): the ones redaction looks at.
#: UIDs, hashes and numbers are left alone (a short numeric PatientID could occur inside a hash).
FREE_TEXT_FIELDS = ("file", "reason", "incomplete_reason", "sr_file", "report_file", "series_description")


def _skipped_series(series, reason: str) -> dict:
    return {"series_instance_uid": series.series_instance_uid, "modality": series.modality,
            "n_files": len(series.slices), "reason": reason}


def _redacted(value, redact: Redactor):
    if isinstance(value, dict):
        return {k: (redact(v) if k in FREE_TEXT_FIELDS else _redacted(v, redact)) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v, redact) for v in value]
    return value
