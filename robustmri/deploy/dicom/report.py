"""What a DICOM run writes about a series: its report record, the SR's text, its line in the summary, redacted.

Reports and logs carry no PatientName, PatientID or PatientBirthDate; file paths that contain one are
redacted (:class:`Redactor`), and records drop free text from the headers and, unless asked, file names.
"""

from __future__ import annotations

import re

from robustmri.deploy.dicom.classify import AGGREGATION_RULE
from robustmri.deploy.dicom.series_rule import SeriesRule
from robustmri.deploy.onnx.trust import DEMO_MODEL_NOTICE, model_line

REDACTED = "[redacted]"


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


def minimal_record(record: dict, include_paths: bool) -> dict:
    """The record without free text from the headers, and without file names unless ``include_paths``."""
    record = dict(record)
    record.pop("series_description", None)
    if not include_paths:
        record["slices"] = [{k: v for k, v in row.items() if k != "file"} for row in record["slices"]]
    return record


def study_lines(record: dict, rule: SeriesRule, rule_source: str, output: str) -> list[str]:
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


def summary_entry(record: dict) -> dict:
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


#: Fields that carry text from outside (paths, reasons, descriptions): the ones redaction looks at.
#: UIDs, hashes and numbers are left alone (a short numeric PatientID could occur inside a hash).
FREE_TEXT_FIELDS = ("file", "files", "reason", "incomplete_reason", "sr_file", "report_file", "series_description")


def redacted(value, redact: Redactor):
    if isinstance(value, dict):
        return {k: (([redact(x) for x in v] if isinstance(v, list) else redact(v)) if k in FREE_TEXT_FIELDS
                    else redacted(v, redact)) for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v, redact) for v in value]
    return value
