"""Classify DICOM studies: scan -> select -> per study, rank the series that match the series rule and classify
the best one that gives a result -> JSON report and DICOM SR per study (or per series), plus a run summary.

Series integrity and completeness (:mod:`robustmri.deploy.dicom.integrity`): a SeriesInstanceUID
whose files disagree on patient, study, modality or geometry is refused (never classified; each
of its files is listed as not used); an incomplete series (duplicate positions, missing slices)
gives no result unless ``allow_incomplete`` is set, and then its record says ``"complete": false``
with the reason. The refusal on patient, study or modality is never relaxed. How one series is
classified, and when it abstains: :mod:`robustmri.deploy.dicom.classify`.

Bad input never aborts other series: unusable files and series are listed with their reason
in ``summary.json`` and in the log. Reports and logs carry no PatientName, PatientID or
PatientBirthDate; file paths that contain one are redacted (:mod:`robustmri.deploy.dicom.report`).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass

from robustmri.data.readers import as_path_list
from robustmri.deploy.dicom.classify import AGGREGATION_RULE, EXAMINED, SeriesNotClassified, classify_series
from robustmri.deploy.dicom.headers import scan_folders
from robustmri.deploy.dicom.policy import GROUPING_POLICY
from robustmri.deploy.dicom.report import Redactor, minimal_record, redacted, sr_text, study_lines, summary_entry
from robustmri.deploy.dicom.selection import SeriesSelection, select_series
from robustmri.deploy.dicom.series import DicomSeries, ScanResult, SkippedFile
from robustmri.deploy.dicom.series_rule import SeriesRule, rule_of_model
from robustmri.deploy.dicom.sr import SERIES_DESCRIPTION, write_sr
from robustmri.deploy.onnx.trust import check_demo_model
from robustmri.options import as_flag
from robustmri.outputs import write_json

logger = logging.getLogger(__name__)

OUTPUTS = ("study", "series")
#: Exit statuses of a run (``summary["status"]``): at least one result / nothing to report / unusable input.
STATUS_OK, STATUS_NO_RESULT, STATUS_NO_INPUT = "ok", "no_result", "no_input"
STUDY_POLICY = (
    "Series are grouped into studies by StudyInstanceUID; a study whose series disagree on PatientID is refused "
    "whole. Per study, the series that pass the selection and match the series rule are ranked (most evidence, "
    "then most slices, then highest SeriesNumber); with output 'study' the first that gives a result is the "
    "study's answer and every other series is listed as not used with the reason; with output 'series' every "
    "matching series gets its own result."
)


class DicomInputError(FileNotFoundError):
    """The input is missing or holds no files; ``summary.json`` says so (status ``no_input``)."""


@dataclass
class _Run:
    """What the steps of one :func:`infer_dicom` call share: the classifier, its model, the rule and the options."""

    classifier: object
    model: dict
    rule: SeriesRule
    rule_source: str
    output: str
    output_dir: str
    batch_size: int
    on_slice_error: str
    allow_incomplete: bool
    include_paths: bool
    write_sr_files: bool

    def __post_init__(self):
        self.series_rule = {"source": self.rule_source, **self.rule.to_dict()}


def infer_dicom(inputs, classifier, output_dir: str | os.PathLike, selection: SeriesSelection | None = None,
                batch_size: int = 32, on_slice_error: str = "fail", write_sr_files: bool = True,
                progress: bool = True, allow_incomplete: bool = False, output: str = "study",
                series_rule: SeriesRule | dict | str | None = None, include_paths: bool = False,
                allow_demo_model: bool = False) -> dict:
    """Classify the studies (or series) under ``inputs`` (folders or files); write reports; return the summary.

    ``output="study"`` (default): per study, the series that match the model's training domain
    (``series_rule``; None: the rule in the model's metadata, see :mod:`robustmri.deploy.dicom.series_rule`)
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
    started = time.perf_counter()
    run = _start(classifier, model, output_dir, output, series_rule, batch_size, on_slice_error, allow_incomplete,
                 include_paths, write_sr_files)
    scan = _scan(inputs, run, progress)
    redact = Redactor(scan.identifiers)
    _, rejected = select_series(scan.series, selection)
    # every file of a refused SeriesInstanceUID is listed as not used, with the series' reason
    skipped_files = list(scan.skipped_files) + [SkippedFile(path, f"not used: {s.refusal}") for s, _ in rejected
                                                if s.refusal for path in s.files]
    rejected_reason = {id(s): reason for s, reason in rejected}
    studies, results = _answer_studies(_group_studies(scan.series), rejected_reason, run, skipped_files, progress)
    classified = [_write_reports(series, record, study, run, redact) for series, record, study in results]
    summary = _summary(inputs, scan, studies, classified, skipped_files, run, redact, started)
    write_json(os.path.join(run.output_dir, "summary.json"), summary)
    _log_summary(summary, scan, studies, classified, skipped_files, run)
    return summary


def _start(classifier, model: dict, output_dir, output: str, series_rule, batch_size: int, on_slice_error: str,
           allow_incomplete, include_paths, write_sr_files: bool) -> _Run:
    """Checked options, the output folder (created) and the series rule to apply."""
    allow_incomplete = as_flag(allow_incomplete, "allow_incomplete")  # '--allow_incomplete false' is text
    include_paths = as_flag(include_paths, "include_paths")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    classifier.require_detector()  # a model that cannot vouch for its inputs is refused before any work
    output_dir = os.fspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    rule, rule_source = _resolve_rule(series_rule, classifier)
    return _Run(classifier, model, rule, rule_source, output, output_dir, batch_size, on_slice_error,
                allow_incomplete, include_paths, write_sr_files)


def _scan(inputs, run: _Run, progress: bool) -> ScanResult:
    """Every header under ``inputs``; a missing or empty input writes a ``no_input`` summary and raises
    :class:`DicomInputError`."""
    problem = input_problem(inputs)
    if problem is None:
        try:
            return scan_folders(inputs, progress=progress)
        except FileNotFoundError:  # removed while scanning
            problem = input_problem(inputs) or "no files under the input folder(s)"
    base = {"output": run.output, "model": run.model, "provider": run.model["provider"],
            "series_rule": run.series_rule, "not_for_clinical_use": True}
    write_no_input_summary(run.output_dir, problem, inputs, run.include_paths, base)
    raise DicomInputError(f"{problem}; status in {os.path.join(run.output_dir, 'summary.json')}")


def _answer_studies(studies, rejected_reason: dict, run: _Run, skipped_files: list[SkippedFile], progress: bool):
    """Each study's summary entry, and the (series, record, study entry) of every series that gave a result.
    Slices that could not be read are added to ``skipped_files``."""
    from tqdm.auto import tqdm  # a bar over the studies on an interactive terminal (this module avoids torch)

    bar = tqdm(studies, desc="DICOM studies", unit="study", leave=False,
               disable=None if progress and len(studies) > 1 else True)
    entries, results = [], []
    for ordinal, (study_uid, members) in enumerate(bar, start=1):
        entry = {"study_instance_uid": study_uid, "ordinal": ordinal, "status": STATUS_NO_RESULT, "reason": None,
                 "series": []}
        patient_problem = _study_patient_problem(members)
        outcome, candidates = _match_series(members, patient_problem, rejected_reason, run.rule)
        ranked = SeriesRule.rank(candidates)
        results += [(series, record, entry) for series, record in _classify_ranked(ranked, outcome, run,
                                                                                   skipped_files)]
        entry["series"] = [outcome[id(s)] for s in members]
        _conclude_study(entry, members, outcome, ranked, patient_problem, run)
        entries.append(entry)
    return entries, results


def _match_series(members: list[DicomSeries], patient_problem: str | None, rejected_reason: dict,
                  rule: SeriesRule) -> tuple[dict, list]:
    """Each series' outcome entry (why it is not used, or the rule's evidence), and the candidates to rank."""
    outcome, candidates = {}, []
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
    return outcome, candidates


def _classify_ranked(ranked: list[DicomSeries], outcome: dict, run: _Run, skipped_files: list[SkippedFile]):
    """(series, record) of the ranked series classified: the first that gives a result (``output="study"``)
    or every one (``"series"``); the others' outcomes say why they were not used."""
    chosen, results = None, []
    for series in ranked:
        if run.output == "study" and chosen is not None:
            outcome[id(series)]["reason"] = (f"not used: series {outcome[id(chosen)]['ordinal']} of the study was "
                                             "chosen (ranked first by the series rule)")
            continue
        record, rows, reason = _classify(series, run.classifier, run.batch_size, run.on_slice_error,
                                         run.allow_incomplete)
        skipped_files += [SkippedFile(row["file"], row["reason"]) for row in rows if row.get("status") == "error"]
        series.release()  # its decoded pixel data: memory follows the largest series, not the run
        if record is None:
            outcome[id(series)]["reason"] = reason
            continue
        # an abstention is the series' result: the study's answer is "no tumour type", not the next series
        outcome[id(series)].update(used=True, reason=None, abstained=record["status"] == "abstained")
        chosen = series
        results.append((series, record))
    return results


def _conclude_study(entry: dict, members: list[DicomSeries], outcome: dict, ranked: list, patient_problem,
                    run: _Run) -> None:
    """The study's status and reason in its summary entry."""
    used = [s for s in members if outcome[id(s)]["used"]]
    if used:
        entry.update(status="classified" if run.output == "study" else "series_classified", reason=None,
                     series_used=[outcome[id(s)]["series_instance_uid"] for s in used])
        abstained = [outcome[id(s)]["ordinal"] for s in used if outcome[id(s)]["abstained"]]
        if abstained and len(abstained) == len(used):
            entry.update(status="abstained", reason="no tumour type: the model cannot vouch for series "
                         + ", ".join(map(str, abstained)) + " (too many slices not assessable)")
    else:
        entry["reason"] = (patient_problem or
                           (f"no series of the study matches the series rule ({run.rule.name})" if not ranked
                            else "no matching series could be classified: " +
                            "; ".join(f"series {outcome[id(s)]['ordinal']}: {outcome[id(s)]['reason']}"
                                      for s in ranked)))


def _write_reports(series: DicomSeries, record: dict, study: dict, run: _Run, redact: Redactor) -> dict:
    """The series' JSON report (and its SR unless turned off), named by study or series UID; the record written."""
    stem = os.path.join(run.output_dir, study["study_instance_uid"] if run.output == "study"
                        else series.series_instance_uid)
    record = minimal_record(record, run.include_paths)
    record["study"] = {"study_instance_uid": study["study_instance_uid"], "ordinal": study["ordinal"],
                       "series": study["series"]}
    record["series_rule"] = run.series_rule
    record["model"] = run.model
    record["not_for_clinical_use"] = True
    if run.write_sr_files:
        finding, details = sr_text(record, run.model)
        details = details + study_lines(record, run.rule, run.rule_source, run.output)
        references = [(s.sop_class_uid, s.sop_instance_uid, s.frame)
                      for s, row in zip(series.slices, record["slices"]) if row.get("status") in EXAMINED]
        write_sr(stem + ".sr.dcm", series.header, series.series_instance_uid, references, finding, details)
        record["sr_file"] = os.path.basename(stem) + ".sr.dcm"
        record["sr_series_description"] = SERIES_DESCRIPTION
        study.setdefault("sr_files", []).append(record["sr_file"])
    record["report_file"] = os.path.basename(stem) + ".json"
    study.setdefault("report_files", []).append(record["report_file"])
    record = redacted(record, redact)
    write_json(stem + ".json", record)
    result = record.get("result") or {}
    logger.info("study %d, series %s: %s -> %s", study["ordinal"], series.series_instance_uid,
                result.get("class") or record.get("status"), record["report_file"])
    return record


def _summary(inputs, scan: ScanResult, studies: list[dict], classified: list[dict], skipped_files: list[SkippedFile],
             run: _Run, redact: Redactor, started: float) -> dict:
    """``summary.json``: every study and series with its outcome, skipped files counted by reason."""
    counts = Counter(redact(item.reason) for item in skipped_files)
    skipped_summary = [{"reason": reason, "count": n} for reason, n in counts.most_common()]
    if run.include_paths:
        for item in skipped_summary:
            item["files"] = [f.path for f in skipped_files if redact(f.reason) == item["reason"]]
    summary = {
        "status": STATUS_OK if classified else STATUS_NO_RESULT,
        "reason": None if classified else "no study gave a result; each study's reason is in 'studies'",
        "output": run.output,
        "n_inputs": len(as_path_list(inputs)),
        "n_files": scan.n_files,
        "n_studies": len(studies),
        "n_series_found": len(scan.series),
        "n_series_classified": sum(r.get("status", "classified") == "classified" for r in classified),
        "n_series_abstained": sum(r.get("status") == "abstained" for r in classified),
        "n_slices_not_assessable": sum((r.get("result") or {}).get("n_not_assessable", 0) for r in classified),
        "n_files_skipped": len(skipped_files),
        "provider": run.model["provider"],
        "model": run.model,
        "series_rule": run.series_rule,
        "aggregation": AGGREGATION_RULE,
        "grouping_policy": GROUPING_POLICY,
        "study_policy": STUDY_POLICY,
        "allow_incomplete": run.allow_incomplete,
        "studies": redacted(studies, redact),
        "series": [summary_entry(r) for r in classified],
        "skipped_series": redacted([s for study in studies for s in study["series"] if not s["used"]], redact),
        "skipped_files": skipped_summary,
        "seconds": round(time.perf_counter() - started, 4),
        "not_for_clinical_use": True,
    }
    if run.include_paths:
        summary["inputs"] = [os.path.abspath(p) for p in as_path_list(inputs)]
    return summary


def _log_summary(summary: dict, scan: ScanResult, studies: list[dict], classified: list[dict],
                 skipped_files: list[SkippedFile], run: _Run) -> None:
    for item in summary["skipped_files"]:  # one line per reason, with a count
        logger.warning("skipped %d file(s): %s", item["count"], item["reason"])
    for item in summary["skipped_series"]:
        logger.info("series %s (%s, %d file(s)) not used: %s", item["series_instance_uid"], item["modality"] or "?",
                    item["n_files"], item["reason"])
    logger.info("%d file(s), %d study(ies), %d series; %d result(s) (%d abstained) on %s; %d series not used, "
                "%d file(s) skipped -> %s", scan.n_files, len(studies), len(scan.series), len(classified),
                summary["n_series_abstained"], run.model["provider"],
                len(summary["skipped_series"]), len(skipped_files), run.output_dir)


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
