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

Outputs cannot tear or lie (:func:`infer_dicom`): atomic files, the output folder checked writable
before any work and locked for the run, ``summary.json`` a ``"running"`` marker from the start and
the run's manifest at the end, SR UIDs that a rerun repeats; :data:`EXIT_STATUS` maps a summary's
status to the exit status of the scripts that run it (:class:`OutputError`: :data:`EXIT_OUTPUT`).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import logging
import os
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

from robustmri import INTENDED_USE
from robustmri.data.readers import as_path_list
from robustmri.deploy.dicom.classify import AGGREGATION_RULE, EXAMINED, SeriesNotClassified, classify_series
from robustmri.deploy.dicom.headers import scan_folders
from robustmri.deploy.dicom.policy import GROUPING_POLICY
from robustmri.deploy.dicom.report import Redactor, minimal_record, redacted, sr_text, study_lines, summary_entry
from robustmri.deploy.dicom.selection import SeriesSelection, select_series
from robustmri.deploy.dicom.series import DicomSeries, ScanResult, SkippedFile
from robustmri.deploy.dicom.series_rule import SeriesRule, rule_of_model
from robustmri.deploy.dicom.sr import SERIES_DESCRIPTION, sr_uids, write_sr
from robustmri.deploy.onnx.trust import canonical_json, check_demo_model, check_signed
from robustmri.options import as_flag
from robustmri.outputs import write_json

logger = logging.getLogger(__name__)

OUTPUTS = ("study", "series")
#: Statuses of a run (``summary["status"]``): at least one study answered with a class / none answered (every
#: study without a result, or abstained) / unusable input / the run is in progress, or was killed before its end.
STATUS_OK, STATUS_NO_RESULT, STATUS_NO_INPUT, STATUS_RUNNING = "ok", "no_result", "no_input", "running"
#: Exit statuses of ``scripts/infer_dicom.py`` (and of anything else that runs :func:`infer_dicom`): 0 at least
#: one study answered; 1 none answered; 2 usage or input (a bad option, a missing input, a refused model);
#: 3 output or I/O (output folder not writable or in use by another run, disk full).
EXIT_OK, EXIT_NO_RESULT, EXIT_USAGE, EXIT_OUTPUT = 0, 1, 2, 3
EXIT_STATUS = {STATUS_OK: EXIT_OK, STATUS_NO_RESULT: EXIT_NO_RESULT, STATUS_NO_INPUT: EXIT_USAGE}
#: The lock file of an output folder: one run at a time writes a folder (``fcntl.flock``, released when the
#: process ends, however it ends).
LOCK_FILE = ".robustmri.lock"
SUMMARY_FILE = "summary.json"
STUDY_POLICY = (
    "Series are grouped into studies by StudyInstanceUID; a study whose series disagree on PatientID is refused "
    "whole. Per study, the series that pass the selection and match the series rule are ranked (most evidence, "
    "then most slices, then highest SeriesNumber); with output 'study' the first that gives a result is the "
    "study's answer and every other series is listed as not used with the reason; with output 'series' every "
    "matching series gets its own result."
)


class DicomInputError(FileNotFoundError):
    """The input is missing or holds no files; ``summary.json`` says so (status ``no_input``)."""


class OutputError(OSError):
    """The outputs cannot be written: the folder is not writable or not a folder, another run holds it,
    the disk is full (exit status :data:`EXIT_OUTPUT`). The message is one line without a path."""


def _os_reason(err: OSError) -> str:
    """An OS error as its errno name and description, without the path its message may hold."""
    name = errno.errorcode.get(err.errno or 0)
    return f"{name}: {os.strerror(err.errno)}" if name else type(err).__name__


def check_output_dir(output_dir: str | os.PathLike) -> str:
    """Create ``output_dir`` if needed and prove it writable (a file is created and removed); its path.
    :class:`OutputError` (one line) when it is not a folder or not writable: checked before any work."""
    output_dir = os.fspath(output_dir)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise OutputError(errno.ENOTDIR, "the output path exists and is not a folder")
    try:
        os.makedirs(output_dir, exist_ok=True)
        descriptor, probe = tempfile.mkstemp(prefix=".write-test.", dir=output_dir)
        os.close(descriptor)
        os.remove(probe)
    except OSError as err:
        raise OutputError(err.errno, f"the output folder is not writable ({_os_reason(err)})") from None
    return output_dir


@contextlib.contextmanager
def output_lock(output_dir: str):
    """Hold the output folder's lock (:data:`LOCK_FILE`) for the block; :class:`OutputError` at once when
    another process holds it (``fcntl.flock``, non-blocking: a second run never waits, nor mixes its files in)."""
    import fcntl

    try:
        handle = open(os.path.join(output_dir, LOCK_FILE), "a")
    except OSError as err:
        raise OutputError(err.errno, f"cannot create the output folder's lock file ({_os_reason(err)})") from None
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise OutputError(errno.EBUSY, "the output folder is in use by another run (its lock file "
                              f"{LOCK_FILE} is held); wait for it or choose another output folder") from None
        yield
    finally:
        handle.close()  # closing releases the lock


@dataclass
class _Manifest:
    """The run's identity, times and every file it wrote (name relative to the output folder, sha256)."""

    output_dir: str
    run_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    started: str = field(default_factory=lambda: _now())
    files: list = field(default_factory=list)

    def add(self, path: str) -> str:
        """Record a file written (its digest read back from the disk); its name relative to the output folder."""
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        name = os.path.relpath(path, self.output_dir)
        self.files = [f for f in self.files if f["file"] != name] + [{"file": name, "sha256": digest.hexdigest()}]
        return name

    def record(self, finished: bool = False) -> dict:
        return {"run_id": self.run_id, "started": self.started, "finished": _now() if finished else None}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


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
    manifest: _Manifest | None = None

    def __post_init__(self):
        self.series_rule = {"source": self.rule_source, **self.rule.to_dict()}
        self.rule_digest = hashlib.sha256(canonical_json(self.rule.to_dict()).encode("ascii")).hexdigest()


def infer_dicom(inputs, classifier, output_dir: str | os.PathLike, selection: SeriesSelection | None = None,
                batch_size: int = 32, on_slice_error: str = "fail", write_sr_files: bool = True,
                progress: bool = True, allow_incomplete: bool = False, output: str = "study",
                series_rule: SeriesRule | dict | str | None = None, include_paths: bool = False,
                allow_demo_model: bool = False, allow_unsigned: bool = False) -> dict:
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
    Any other model must have had its signature verified on load (a public key given to the
    classifier) unless ``allow_unsigned`` (:func:`robustmri.deploy.onnx.trust.check_signed`).

    Outputs (:func:`robustmri.outputs.write_atomic`: never a torn file under a final name): the
    output folder is proved writable before any work and locked for the run (:func:`output_lock`;
    a second run into it raises :class:`OutputError` at once); ``summary.json`` is replaced at the
    start by a ``"running"`` status and written last as the run's manifest (``run``: run id,
    start and end times; ``files``: every file the run wrote, relative name and sha256), so a folder
    whose summary says ``running`` holds an incomplete run. A failed write raises :class:`OutputError`.
    The SR's Series and SOP Instance UIDs are derived from the study, the model's digest and the
    series rule (:func:`robustmri.deploy.dicom.sr.sr_uids`): a rerun replaces, never duplicates.
    """
    model = classifier.describe()
    check_demo_model(model, allow_demo_model)
    check_signed(model, allow_unsigned)
    started = time.perf_counter()
    run = _start(classifier, model, output_dir, output, series_rule, batch_size, on_slice_error, allow_incomplete,
                 include_paths, write_sr_files)
    with output_lock(run.output_dir):
        run.manifest = _Manifest(run.output_dir)
        # an older summary must not make the folder look complete while this run writes (or after it is killed)
        _write_output(lambda: write_json(os.path.join(run.output_dir, SUMMARY_FILE), {
            "status": STATUS_RUNNING, "reason": RUNNING_REASON, "run": run.manifest.record(),
            "n_series_classified": 0, "not_for_clinical_use": True, "intended_use": INTENDED_USE}))
        scan = _scan(inputs, run, progress)
        redact = Redactor(scan.identifiers)
        _, rejected = select_series(scan.series, selection)
        # every file of a refused SeriesInstanceUID is listed as not used, with the series' reason
        skipped_files = list(scan.skipped_files) + [SkippedFile(path, f"not used: {s.refusal}") for s, _ in rejected
                                                    if s.refusal for path in s.files]
        rejected_reason = {id(s): reason for s, reason in rejected}
        studies, results = _answer_studies(_group_studies(scan.series), rejected_reason, run, skipped_files, progress)
        classified = _write_output(lambda: [_write_reports(series, record, study, run, redact)
                                            for series, record, study in results])
        summary = _summary(inputs, scan, studies, classified, skipped_files, run, redact, started)
        summary["run"] = run.manifest.record(finished=True)
        summary["files"] = list(run.manifest.files)  # the manifest: written last, so present only when complete
        _write_output(lambda: write_json(os.path.join(run.output_dir, SUMMARY_FILE), summary))
    _log_summary(summary, scan, studies, classified, skipped_files, run)
    return summary


#: What ``summary.json`` says while a run writes the folder (and after a run killed before its end).
RUNNING_REASON = ("the run is in progress, or was stopped before its end: the files in this folder are not a "
                  "complete output (a complete run replaces this summary with its manifest)")


def _write_output(write):
    """``write()``'s result; an OS error while writing outputs (disk full, folder removed) as :class:`OutputError`."""
    try:
        return write()
    except OutputError:
        raise
    except OSError as err:
        raise OutputError(err.errno, f"cannot write the outputs ({_os_reason(err)}); summary.json says "
                                     f"'{STATUS_RUNNING}': the run is incomplete") from None


def _start(classifier, model: dict, output_dir, output: str, series_rule, batch_size: int, on_slice_error: str,
           allow_incomplete, include_paths, write_sr_files: bool) -> _Run:
    """Checked options, the output folder (created, proved writable) and the series rule to apply."""
    allow_incomplete = as_flag(allow_incomplete, "allow_incomplete")  # '--allow_incomplete false' is text
    include_paths = as_flag(include_paths, "include_paths")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    classifier.require_detector()  # a model that cannot vouch for its inputs is refused before any work
    rule, rule_source = _resolve_rule(series_rule, classifier)
    output_dir = check_output_dir(output_dir)
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
            "series_rule": run.series_rule, "not_for_clinical_use": True,
            "run": run.manifest.record(finished=True) if run.manifest else None}
    _write_output(lambda: write_no_input_summary(run.output_dir, problem, inputs, run.include_paths, base))
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
        refused = [outcome[id(s)] for s in members if s.refusal]
        entry["reason"] = (patient_problem or
                           ("no series of the study can be used: " + "; ".join(
                               f"series {o['ordinal']}: {o['reason']}" for o in refused) if refused and not ranked
                            else None) or
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
    record["intended_use"] = INTENDED_USE
    if run.write_sr_files:
        finding, details = sr_text(record, run.model)
        details = details + study_lines(record, run.rule, run.rule_source, run.output)
        references = [(s.sop_class_uid, s.sop_instance_uid, s.frame)
                      for s, row in zip(series.slices, record["slices"]) if row.get("status") in EXAMINED]
        uids = sr_uids(study["study_instance_uid"], run.model.get("integrity_sha256") or "", run.rule_digest,
                       series.series_instance_uid if run.output == "series" else None)
        run.manifest.add(write_sr(stem + ".sr.dcm", series.header, series.series_instance_uid, references, finding,
                                  details, uids=uids))
        record["sr_series_instance_uid"], record["sr_sop_instance_uid"] = uids
        record["sr_file"] = os.path.basename(stem) + ".sr.dcm"
        record["sr_series_description"] = SERIES_DESCRIPTION
        study.setdefault("sr_files", []).append(record["sr_file"])
    record["report_file"] = os.path.basename(stem) + ".json"
    study.setdefault("report_files", []).append(record["report_file"])
    record = redacted(record, redact)
    run.manifest.add(write_json(stem + ".json", record))
    result = record.get("result") or {}
    logger.info("study %d, series %s: %s -> %s", study["ordinal"], series.series_instance_uid,
                result.get("class") or record.get("status"), record["report_file"])
    return record


def _summary(inputs, scan: ScanResult, studies: list[dict], classified: list[dict], skipped_files: list[SkippedFile],
             run: _Run, redact: Redactor, started: float) -> dict:
    """``summary.json``: every study and series with its outcome, skipped files counted by reason."""
    answered = sum(r.get("status", "classified") == "classified" for r in classified)
    counts = Counter(redact(item.reason) for item in skipped_files)
    skipped_summary = [{"reason": reason, "count": n} for reason, n in counts.most_common()]
    if run.include_paths:
        for item in skipped_summary:
            item["files"] = [f.path for f in skipped_files if redact(f.reason) == item["reason"]]
    summary = {
        "status": STATUS_OK if answered else STATUS_NO_RESULT,
        "reason": None if answered else ("no study was answered with a tumour type (every result an abstention); "
                                         "each study's reason is in 'studies'" if classified else
                                         "no study gave a result; each study's reason is in 'studies'"),
        "output": run.output,
        "n_inputs": len(as_path_list(inputs)),
        "n_files": scan.n_files,
        "n_studies": len(studies),
        "n_series_found": len(scan.series),
        "n_series_classified": answered,
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
        "intended_use": INTENDED_USE,
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
               "not_for_clinical_use": True, "intended_use": INTENDED_USE}
    if include_paths:
        summary["inputs"] = [os.path.abspath(p) for p in as_path_list(inputs)]
    path = os.path.join(check_output_dir(output_dir), SUMMARY_FILE)
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
