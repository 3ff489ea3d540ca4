"""Classify DICOM series: scan -> select -> order -> decode -> normalise -> batched ONNX inference
-> series-level result -> JSON report and DICOM SR per series, plus a run summary.

Aggregation rule (:data:`AGGREGATION_RULE`): the series' class probabilities are the mean of
its assessable slices' probabilities; the series class is their argmax. The per-slice table is kept.

Out-of-distribution abstention (:mod:`robustmri.deploy.ood`): the model must carry its detector
(a model without one is refused with :class:`~robustmri.deploy.onnx_runtime.ModelMetadataError`).
Each slice gets its ``ood_score`` (higher = more out of distribution) and ``assessable`` (score at
or below the model's threshold); a not-assessable slice does not vote. A series with more than the
model's share of not-assessable slices (``ood_series_max_not_assessable`` in its metadata, 50 % by
default) gets no tumour class: its status is ``"abstained"``, with the reason in words in the
report and in the SR (which is still written and says that no tumour type is issued).

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
from collections import Counter

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
from robustmri.deploy.series_rule import SeriesRule, rule_of_model
from robustmri.options import as_flag
from robustmri.outputs import write_json

logger = logging.getLogger(__name__)

AGGREGATION_RULE = ("mean of the slice probabilities over every assessable slice of the series (out-of-distribution "
                    "score at or below the model's threshold); the series class is the class of highest mean "
                    "probability")
#: Slice statuses of the slices the model was run on (the SR's evidence): voting, or not assessable.
EXAMINED = ("classified", "not_assessable")
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

    Every slice run through the model gets ``ood_score`` and ``assessable``; a not-assessable slice
    has status ``"not_assessable"`` (its probabilities kept for audit, no class) and does not vote.
    When more than the model's share (``ood_series_max_not_assessable``) of those slices are not
    assessable, the record's status is ``"abstained"``: ``result["class"]`` and
    ``result["probabilities"]`` are None and ``result["abstention_reason"]`` says why. A model
    without a detector raises :class:`~robustmri.deploy.onnx_runtime.ModelMetadataError`.
    """
    detector = classifier.require_detector()
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
               "sop_instance_uid": image.sop_instance_uid, "frame": image.frame, "file": image.path}
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
    outputs = [classifier.predict_with_scores(batch[i:i + batch_size]) for i in range(0, len(batch), batch_size)]
    probabilities = np.concatenate([p for p, _ in outputs])
    scores = np.concatenate([s for _, s in outputs])
    infer_s = time.perf_counter() - start
    assessable = classifier.is_assessable(scores)
    names = classifier.class_names
    for row, p, score, ok in zip(used, probabilities, scores, assessable):
        row.update(status="classified" if ok else "not_assessable", ood_score=float(score), assessable=bool(ok),
                   probabilities={name: float(v) for name, v in zip(names, p)})
        if ok:
            row["class"] = names[int(p.argmax())]
    n_not_assessable = int((~assessable).sum())
    voting = [row for row in used if row["assessable"]]
    counts = {"n_slices": len(rows), "n_assessed": len(used), "n_not_assessable": n_not_assessable,
              "n_classified": len(voting), "n_failed": len(errors), "n_excluded": len(rows) - len(used) - len(errors)}
    ood = {"threshold": detector["threshold"], "target_acceptance": detector["target_acceptance"],
           "series_max_not_assessable": detector["series_max_not_assessable"],
           "abstention_rule": detector["abstention_rule"],
           "not_assessable_share": n_not_assessable / len(used)}
    if n_not_assessable / len(used) > detector["series_max_not_assessable"]:
        status = "abstained"
        result = {"class": None, "probabilities": None, **counts, "n_agreeing": None,
                  "abstention_reason": abstention_reason(n_not_assessable, len(used), detector)}
    else:
        status = "classified"
        mean = probabilities[assessable].mean(axis=0)
        label = names[int(mean.argmax())]
        result = {"class": label, "probabilities": {name: float(v) for name, v in zip(names, mean)},
                  "aggregation": AGGREGATION_RULE, **counts,
                  "n_agreeing": int(sum(row["class"] == label for row in voting))}
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


def abstention_reason(n_not_assessable: int, n_assessed: int, detector: dict) -> str:
    """Why a series gets no tumour class, in words (report and SR)."""
    return (f"{n_not_assessable} of {n_assessed} slice(s) ({n_not_assessable / n_assessed:.0%}) are not assessable: "
            f"their out-of-distribution score is above the model's threshold {detector['threshold']:.4g} (set to "
            f"accept {detector['target_acceptance']:.0%} of in-distribution validation slices), so the model cannot "
            f"vouch for them; the rule allows at most {detector['series_max_not_assessable']:.0%} per series")


def sr_text(record: dict, model: dict) -> tuple[str, list[str]]:
    """The SR's finding sentence and its method lines (an abstained series: no tumour type, and why)."""
    result = record["result"]
    label = result["class"]
    if record.get("status") == "abstained":
        finding = f"No tumour type is issued for this series: {result['abstention_reason']}."
    else:
        finding = (f"Predicted tumour type: {label} (mean probability {result['probabilities'][label]:.2f} over "
                   f"{result['n_classified']} assessable slice(s); {result['n_agreeing']} of them predict {label} on "
                   "their own).")
    if model.get("demo_model"):
        finding = f"{DEMO_MODEL_NOTICE}. {finding}"
    details = [] if record.get("complete", True) else [
        f"INCOMPLETE SERIES, classified only because incomplete series were allowed: {record['incomplete_reason']}."]
    if label is not None:
        details += [
            "Probabilities: " + ", ".join(f"{name} {p:.3f}" for name, p in result["probabilities"].items()) + ".",
            f"Aggregation: {AGGREGATION_RULE}."]
    ood = record.get("out_of_distribution")
    if ood:
        details.append(f"Out-of-distribution check: {result['n_not_assessable']} of {result['n_assessed']} slice(s) "
                       f"not assessable (score above {ood['threshold']:.4g}, the threshold accepting "
                       f"{ood['target_acceptance']:.0%} of in-distribution validation slices); rule: "
                       f"{ood['abstention_rule']}.")
    details += [
        f"Slices: {result['n_slices']} in the series, {result['n_classified']} classified, "
        f"{result.get('n_not_assessable', 0)} not assessable, "
        f"{result['n_failed']} unreadable, {result['n_excluded']} excluded (no contrast).",
        f"Slice order: {record['ordering']}.",
        model_line(model),
        f"Preprocessing: RescaleSlope/Intercept, then {model.get('intensity_normalisation')} to "
        f"{model.get('spatial_size')} x {model.get('spatial_size')}.",
    ]
    return finding, details


OUTPUTS = ("study", "series")
#: Exit statuses of a run (``summary["status"]``): at least one result / nothing to report / unusable input.
STATUS_OK, STATUS_NO_RESULT, STATUS_NO_INPUT = "ok", "no_result", "no_input"


class DicomInputError(FileNotFoundError):
    """The input is missing or holds no files; ``summary.json`` says so (status ``no_input``)."""


def infer_dicom(inputs, classifier, output_dir: str | os.PathLike, selection: SeriesSelection | None = None,
                batch_size: int = 32, on_slice_error: str = "fail", write_sr_files: bool = True,
                progress: bool = True, allow_incomplete: bool = False, output: str = "study",
                series_rule: SeriesRule | dict | str | None = None, include_paths: bool = False,
                allow_demo_model: bool = False) -> dict:
    """Classify the studies (or series) under ``inputs`` (folders or files); write reports; return the summary.

    ``output="study"`` (default): per study, the series that match the model's training domain
    (``series_rule``; None: the rule in the model's metadata, see :mod:`robustmri.deploy.series_rule`)
    are ranked and the best one that gives a result is the study's answer: one
    ``<StudyInstanceUID>.json`` and one ``<StudyInstanceUID>.sr.dcm``, naming the series used and
    every other series of the study as not used, with the reason. ``output="series"``: every
    matching series gets its own ``<SeriesInstanceUID>.json`` and ``.sr.dcm``. For the run,
    ``summary.json``: every study and series with its outcome; skipped files counted by reason.

    A refused SeriesInstanceUID (files disagreeing on patient, study, modality or geometry) or a
    study whose series disagree on PatientID is never classified. An incomplete series gives no
    result unless ``allow_incomplete``. Outputs name series by UID and ordinal number only: no
    file or folder names, no free text from the headers, unless ``include_paths`` (local debugging)
    adds the file paths. A missing or empty input raises :class:`DicomInputError` after writing
    ``summary.json`` with status ``no_input``. A demo model (trained on the embedded synthetic set)
    is refused unless ``allow_demo_model``; then every report, the summary and the SR say DEMO MODEL.
    """
    model = classifier.describe()
    check_demo_model(model, allow_demo_model)
    total_start = time.perf_counter()
    allow_incomplete = as_flag(allow_incomplete, "allow_incomplete")  # '--allow_incomplete false' is text
    include_paths = as_flag(include_paths, "include_paths")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    classifier.require_detector()  # a model that cannot vouch for its inputs is refused before any work
    output_dir = os.fspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    rule, rule_source = _resolve_rule(series_rule, classifier)
    base = {"output": output, "model": model, "provider": model["provider"],
            "series_rule": {"source": rule_source, **rule.to_dict()}, "not_for_clinical_use": True}
    problem = input_problem(inputs)
    if problem is None:
        try:
            scan = scan_folders(inputs, progress=progress)
        except FileNotFoundError:  # removed while scanning
            problem = input_problem(inputs) or "no files under the input folder(s)"
    if problem is not None:
        write_no_input_summary(output_dir, problem, inputs, include_paths, base)
        raise DicomInputError(f"{problem}; status in {os.path.join(output_dir, 'summary.json')}")
    redact = Redactor(scan.identifiers)
    selected, rejected = select_series(scan.series, selection)
    rejected_reason = {id(s): reason for s, reason in rejected}
    skipped_files = list(scan.skipped_files)
    # every file of a refused SeriesInstanceUID is listed as not used, with the series' reason
    skipped_files += [SkippedFile(path, f"not used: {s.refusal}") for s, _ in rejected if s.refusal
                      for path in s.files]
    studies = _group_studies(scan.series)
    records, study_entries, series_entries = [], [], []
    from tqdm.auto import tqdm  # a bar over the studies on an interactive terminal (this module avoids torch)

    bar = tqdm(studies, desc="DICOM studies", unit="study", leave=False,
               disable=None if progress and len(studies) > 1 else True)
    for ordinal, (study_uid, members) in enumerate(bar, start=1):
        entry = {"study_instance_uid": study_uid, "ordinal": ordinal, "status": STATUS_NO_RESULT, "reason": None,
                 "series": []}
        patient_problem = _study_patient_problem(members)
        candidates, outcome = [], {}
        for number, series in enumerate(members, start=1):
            reason = (series.refusal or patient_problem or rejected_reason.get(id(series)))
            assessment = None
            if reason is None:
                assessment = rule.assess(series.header, len(series.slices))
                reason = None if assessment.matches else f"not {rule.name}: {assessment.reason}"
            outcome[id(series)] = {"series_instance_uid": series.series_instance_uid, "ordinal": number,
                                   "series_number": _series_number(series), "modality": series.modality,
                                   "n_files": len(series.files), "used": False, "reason": reason,
                                   "evidence": list(assessment.evidence) if assessment and assessment.matches else []}
            if reason is None:
                candidates.append((series, assessment, _series_number(series) or 0, series.series_instance_uid))
        ranked = SeriesRule.rank(candidates)
        chosen = None
        for series in ranked:
            if output == "study" and chosen is not None:
                outcome[id(series)]["reason"] = (f"not used: series {outcome[id(chosen)]['ordinal']} of the study was "
                                                 "chosen (ranked first by the series rule)")
                continue
            record, rows, reason = _classify(series, classifier, batch_size, on_slice_error, allow_incomplete)
            skipped_files += [SkippedFile(row["file"], row["reason"]) for row in rows if row.get("status") == "error"]
            series.release()  # its decoded pixel data: memory follows the largest series, not the run
            if record is None:
                outcome[id(series)]["reason"] = reason
                continue
            # an abstention is the series' result: the study's answer is "no tumour type", not the next series
            outcome[id(series)].update(used=True, reason=None, abstained=record["status"] == "abstained")
            chosen = series
            records.append((series, record, entry))
        entry["series"] = [outcome[id(s)] for s in members]
        used = [s for s in members if outcome[id(s)]["used"]]
        if used:
            entry.update(status="classified" if output == "study" else "series_classified", reason=None,
                         series_used=[outcome[id(s)]["series_instance_uid"] for s in used])
            abstained = [outcome[id(s)]["ordinal"] for s in used if outcome[id(s)]["abstained"]]
            if abstained and len(abstained) == len(used):
                entry.update(status="abstained", reason="no tumour type: the model cannot vouch for series "
                             + ", ".join(map(str, abstained)) + " (too many slices not assessable)")
        else:
            entry["reason"] = (patient_problem or
                               (f"no series of the study matches the series rule ({rule.name})" if not ranked
                                else "no matching series could be classified: " +
                                "; ".join(f"series {outcome[id(s)]['ordinal']}: {outcome[id(s)]['reason']}"
                                          for s in ranked)))
        study_entries.append(entry)
        series_entries += entry["series"]
    classified = []
    for series, record, study in records:
        stem = os.path.join(output_dir, study["study_instance_uid"] if output == "study"
                            else series.series_instance_uid)
        record = _minimal(record, include_paths)
        record["study"] = {"study_instance_uid": study["study_instance_uid"], "ordinal": study["ordinal"],
                           "series": study["series"]}
        record["series_rule"] = base["series_rule"]
        record["model"] = model
        record["not_for_clinical_use"] = True
        if write_sr_files:
            finding, details = sr_text(record, model)
            details = details + _study_lines(record, rule, rule_source, output)
            references = [(s.sop_class_uid, s.sop_instance_uid, s.frame)
                          for s, row in zip(series.slices, record["slices"]) if row.get("status") in EXAMINED]
            write_sr(stem + ".sr.dcm", series.header, series.series_instance_uid, references, finding, details)
            record["sr_file"] = os.path.basename(stem) + ".sr.dcm"
            record["sr_series_description"] = SERIES_DESCRIPTION
            study.setdefault("sr_files", []).append(record["sr_file"])
        record["report_file"] = os.path.basename(stem) + ".json"
        study.setdefault("report_files", []).append(record["report_file"])
        record = _redacted(record, redact)
        write_json(stem + ".json", record)
        classified.append(record)
        result = record.get("result") or {}
        logger.info("study %d, series %s: %s -> %s", study["ordinal"], series.series_instance_uid,
                    result.get("class") or record.get("status"), record["report_file"])
    counts = Counter(redact(item.reason) for item in skipped_files)
    skipped_summary = [{"reason": reason, "count": n} for reason, n in counts.most_common()]
    if include_paths:
        for item in skipped_summary:
            item["files"] = [f.path for f in skipped_files if redact(f.reason) == item["reason"]]
    summary = {
        "status": STATUS_OK if classified else STATUS_NO_RESULT,
        "reason": None if classified else "no study gave a result; each study's reason is in 'studies'",
        "output": output,
        "n_inputs": len(as_path_list(inputs)),
        "n_files": scan.n_files,
        "n_studies": len(study_entries),
        "n_series_found": len(scan.series),
        "n_series_classified": sum(r.get("status", "classified") == "classified" for r in classified),
        "n_series_abstained": sum(r.get("status") == "abstained" for r in classified),
        "n_slices_not_assessable": sum((r.get("result") or {}).get("n_not_assessable", 0) for r in classified),
        "n_files_skipped": len(skipped_files),
        "provider": model["provider"],
        "model": model,
        "series_rule": base["series_rule"],
        "aggregation": AGGREGATION_RULE,
        "grouping_policy": GROUPING_POLICY,
        "study_policy": STUDY_POLICY,
        "allow_incomplete": allow_incomplete,
        "studies": _redacted(study_entries, redact),
        "series": [_summary_entry(r) for r in classified],
        "skipped_series": _redacted([s for s in series_entries if not s["used"]], redact),
        "skipped_files": skipped_summary,
        "seconds": round(time.perf_counter() - total_start, 4),
        "not_for_clinical_use": True,
    }
    if include_paths:
        summary["inputs"] = [os.path.abspath(p) for p in as_path_list(inputs)]
    write_json(os.path.join(output_dir, "summary.json"), summary)
    for item in skipped_summary:  # one line per reason, with a count
        logger.warning("skipped %d file(s): %s", item["count"], item["reason"])
    for item in summary["skipped_series"]:
        logger.info("series %s (%s, %d file(s)) not used: %s", item["series_instance_uid"], item["modality"] or "?",
                    item["n_files"], item["reason"])
    logger.info("%d file(s), %d study(ies), %d series; %d result(s) (%d abstained) on %s; %d series not used, "
                "%d file(s) skipped -> %s", scan.n_files, len(study_entries), len(scan.series), len(classified),
                summary["n_series_abstained"], model["provider"],
                len(summary["skipped_series"]), len(skipped_files), output_dir)
    return summary


def _summary_entry(record: dict) -> dict:
    """A series' line in ``summary.json``: its outcome, class and probability (None when it abstained), files."""
    result = record.get("result") or {}
    label = result.get("class")
    return {"series_instance_uid": record["series_instance_uid"], "study_instance_uid": record["study_instance_uid"],
            "status": record.get("status", "classified"), "class": label,
            "probability": (result.get("probabilities") or {}).get(label),
            "abstention_reason": result.get("abstention_reason"), "n_slices": result.get("n_classified"),
            "n_not_assessable": result.get("n_not_assessable"), "complete": record.get("complete"),
            "incomplete_reason": record.get("incomplete_reason"), "report_file": record["report_file"],
            "sr_file": record.get("sr_file")}


def input_problem(inputs) -> str | None:
    """Why ``inputs`` cannot be classified at all (a path not found, no file under them), or None; no paths in it."""
    paths = as_path_list(inputs)
    if not paths:
        return "no input given"
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        return f"{len(missing)} input path(s) not found"
    for path in paths:
        if os.path.isfile(path) or any(names for _, _, names in os.walk(path)):
            return None
    return "no files under the input folder(s)"


def write_no_input_summary(output_dir, reason: str, inputs=(), include_paths: bool = False,
                           extra: dict | None = None) -> str:
    """``summary.json`` of a run that could not start (status ``no_input``); its path."""
    summary = {"status": STATUS_NO_INPUT, "reason": reason, **(extra or {}), "n_series_classified": 0,
               "not_for_clinical_use": True}
    if include_paths:
        summary["inputs"] = [os.path.abspath(p) for p in as_path_list(inputs)]
    os.makedirs(os.fspath(output_dir), exist_ok=True)
    path = os.path.join(os.fspath(output_dir), "summary.json")
    write_json(path, summary)
    return path


STUDY_POLICY = (
    "Series are grouped into studies by StudyInstanceUID; a study whose series disagree on PatientID is refused "
    "whole. Per study, the series that pass the selection and match the series rule are ranked (most evidence, "
    "then most slices, then highest SeriesNumber); with output 'study' the first that gives a result is the "
    "study's answer and every other series is listed as not used with the reason; with output 'series' every "
    "matching series gets its own result."
)


def _resolve_rule(series_rule, classifier) -> tuple[SeriesRule, str]:
    """The rule to apply and where it came from; an operator's rule that differs from the model's is named so."""
    model_rule, model_source = rule_of_model(getattr(classifier, "metadata", {}) or {})
    if series_rule is None:
        return model_rule, model_source
    if isinstance(series_rule, str):
        rule = SeriesRule.from_json(series_rule)
    elif isinstance(series_rule, dict):
        rule = SeriesRule.from_dict(series_rule)
    elif isinstance(series_rule, SeriesRule):
        rule = series_rule
    else:
        raise TypeError(f"series_rule must be a SeriesRule, a dict, JSON text or None, got {type(series_rule).__name__}")
    if rule == model_rule:
        return rule, "the operator's configuration (the same as " + model_source + ")"
    logger.warning("the series rule given differs from %s: series are chosen by the operator's rule", model_source)
    return rule, "the operator's configuration, which DIFFERS from " + model_source


def _group_studies(series: list[DicomSeries]) -> list[tuple[str, list[DicomSeries]]]:
    """Series by StudyInstanceUID (refused series with no single study under ''), each ordered by SeriesNumber, UID."""
    studies: dict[str, list[DicomSeries]] = {}
    for item in series:
        studies.setdefault(item.study_instance_uid, []).append(item)
    for members in studies.values():
        members.sort(key=lambda s: (_series_number(s) is None, _series_number(s) or 0, s.series_instance_uid))
    return sorted(studies.items(), key=lambda kv: (kv[0] == "", kv[0]))


def _series_number(series: DicomSeries) -> int | None:
    try:
        value = series.header.get("SeriesNumber", None)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _study_patient_problem(members: list[DicomSeries]) -> str | None:
    ids = Counter(s.slices[0].attribute("PatientID") for s in members if not s.refusal and s.slices)
    if len(ids) > 1:
        return (f"refused: the series of this StudyInstanceUID disagree on PatientID ({len(ids)} values: "
                f"{' + '.join(str(n) for _, n in ids.most_common())} series); series of different patients are "
                "never merged, none is used")
    return None


def _classify(series, classifier, batch_size, on_slice_error, allow_incomplete):
    """(record, slice rows, reason): the series' record, or None and the reason it gave no result."""
    try:
        record = classify_series(series, classifier, batch_size, on_slice_error, allow_incomplete)
    except SeriesNotClassified as err:
        return None, err.slice_rows, err.reason
    return record, record["slices"], None


def _minimal(record: dict, include_paths: bool) -> dict:
    """The record without free text from the headers, and without file names unless ``include_paths``."""
    record = dict(record)
    record.pop("series_description", None)
    if not include_paths:
        record["slices"] = [{k: v for k, v in row.items() if k != "file"} for row in record["slices"]]
    return record


def _study_lines(record: dict, rule: SeriesRule, rule_source: str, output: str) -> list[str]:
    """SR lines naming the series used and every other series of the study with the reason it was not used."""
    study = record["study"]
    used = next(s for s in study["series"] if s["series_instance_uid"] == record["series_instance_uid"])
    lines = [f"Series used: series {used['ordinal']} of the study, SeriesInstanceUID {used['series_instance_uid']}"
             f"{'' if used['series_number'] is None else ', SeriesNumber ' + str(used['series_number'])}; chosen by "
             f"the series rule '{rule.name}' ({rule_source}): {', '.join(used['evidence']) or 'matches'}."]
    others = [s for s in study["series"] if s["series_instance_uid"] != record["series_instance_uid"]]
    if output == "study":
        for s in others:
            lines.append(f"Not used: series {s['ordinal']}, SeriesInstanceUID {s['series_instance_uid']}: {s['reason']}.")
    elif others:
        lines.append(f"This report covers one series; the study has {len(others)} other series (see their reports "
                     "and the run summary).")
    return lines


#: Fields that carry text from outside (paths, reasons, descriptions): the ones redaction looks at.
#: UIDs, hashes and numbers are left alone (a short numeric PatientID could occur inside a hash).
FREE_TEXT_FIELDS = ("file", "files", "reason", "incomplete_reason", "sr_file", "report_file", "series_description")


def _redacted(value, redact: Redactor):
    if isinstance(value, dict):
        return {k: (([redact(x) for x in v] if isinstance(v, list) else redact(v)) if k in FREE_TEXT_FIELDS
                    else _redacted(v, redact)) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v, redact) for v in value]
    return value
