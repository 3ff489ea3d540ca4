"""Classify DICOM studies with an exported ONNX model; write a JSON report and a DICOM SR per study.

    python scripts/infer_dicom.py /path/to/dicom_folder [more folders] --model bundle/models/model.onnx
    python scripts/infer_dicom.py IN --model model.onnx --output_dir OUT --output series --device cpu \
        --on_slice_error skip --series_rule my_rule.json

Series are grouped by SeriesInstanceUID; files of one SeriesInstanceUID that disagree on patient,
study, modality or geometry are refused, never merged (robustmri.deploy.dicom.policy.GROUPING_POLICY).
Per study, the series that match the model's training domain (the series rule written in the
model's metadata, T1-weighted post-contrast MR; --series_rule FILE.json overrides it, and the reports
say so) are ranked and the best one that gives a result answers for the study (--output series:
every matching series is classified). --modalities, --series_description and --image_type pre-filter
series before the rule. An incomplete series (duplicate positions, missing slices) gives no result
unless --allow_incomplete. A slice whose out-of-distribution score is above the model's threshold is not
assessable and does not vote; a series with too many such slices (the model's metadata states the share)
gets no tumour class ("abstained") and its SR says why; a model exported without the detector is refused
(exit 2). The console and the reports carry no patient identifiers, file or folder
names (--include_paths adds file paths for local debugging). Research software, not for clinical use.

Reports go to --output_dir, by default ``bundle/eval/dicom`` (where the bundle's ``dicom_inference`` writes
them; git ignores ``bundle/eval``).

The model is verified on load (integrity digest, and with --public_key key.pem its Ed25519
signature). Signed by default: a model whose signature was not verified (unsigned, or no --public_key
given) is refused unless --allow_unsigned; sign it with scripts/model_keys.py and
scripts/export_onnx.py --signing_key. A demo model (trained on the embedded synthetic set) is refused
unless --allow_demo_model, and then needs no key and every output says DEMO MODEL.

Outputs: every file is written to a temporary name of its own and renamed whole (never a torn file);
the output folder is checked writable before any work and locked for the run (a second run into it
exits at once with status 3); summary.json says "running" while the run writes and is written last
as its manifest (run id, times, every file written with its sha256). SR Series and SOP Instance UIDs
are derived from the study, the model's digest and the series rule: a rerun replaces, never duplicates.

Exit status (one line on stderr for every status but 0, never a traceback):
  0  at least one study (or series) was answered with a tumour type;
  1  no study was answered (no matching series, every result an abstention; summary.json says no_result);
  2  usage or input: a bad option value, a missing or empty input, a model that cannot be used or is refused;
  3  output or I/O: the output folder is not writable or not a folder, is in use by another run, or the disk
     filled up (summary.json then says "running": the run is incomplete).
"""

from __future__ import annotations

import json
import logging
import os
import sys

import fire

from robustmri.deploy.dicom.selection import SeriesSelection
from robustmri.deploy.dicom.study import (
    EXIT_NO_RESULT,
    EXIT_OUTPUT,
    EXIT_STATUS,
    EXIT_USAGE,
    OUTPUTS,
    STATUS_OK,
    DicomInputError,
    OutputError,
    check_output_dir,
    infer_dicom,
    input_problem,
    write_no_input_summary,
)
from robustmri.deploy.onnx.runtime import ModelMetadataError, OnnxClassifier
from robustmri.deploy.onnx.trust import DemoModelError, ModelIntegrityError
from robustmri.options import as_flag

ON_SLICE_ERROR = ("fail", "skip")
FLAGS = ("no_sr", "quiet", "allow_incomplete", "include_paths", "json_summary", "allow_demo_model", "allow_unsigned")

BUNDLE = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "bundle"))


def _fail(message: str, status: int = EXIT_USAGE) -> None:
    print(f"infer_dicom: {message}", file=sys.stderr)
    sys.exit(status)


def _integer(name: str, value, minimum: int) -> int:
    """An integer option (not a flag, not text); one line and status 2 otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(f"--{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _options(options: dict) -> dict:
    """The options checked for type and value before any work; one line and status 2 for the first bad one."""
    checked = dict(options)
    for name in FLAGS:
        try:
            checked[name] = as_flag(options[name], name)
        except ValueError as err:
            _fail(f"--{err}")
    checked["batch_size"] = _integer("batch_size", options["batch_size"], 1)
    checked["threads"] = _integer("threads", options["threads"], 0)
    for name, allowed in (("output", OUTPUTS), ("on_slice_error", ON_SLICE_ERROR)):
        if options[name] not in allowed:
            _fail(f"--{name} must be one of {', '.join(allowed)}, got {options[name]!r}")
    for name in ("model", "output_dir", "series_rule", "public_key", "device"):
        if not isinstance(options[name], str):
            _fail(f"--{name} must be text, got {options[name]!r}")
    return checked


def main(*inputs: str, model: str = os.path.join(BUNDLE, "models", "model.onnx"),
         output_dir: str = os.path.join(BUNDLE, "eval", "dicom"), modalities="MR", series_description: str = "", image_type="", device: str = "auto",
         batch_size: int = 32, on_slice_error: str = "fail", threads: int = 0, no_sr: bool = False,
         quiet: bool = False, allow_incomplete: bool = False, output: str = "study", series_rule: str = "",
         include_paths: bool = False, json_summary: bool = False, public_key: str = "", allow_demo_model: bool = False,
         allow_unsigned: bool = False):
    """Classify the selected studies under ``inputs``; print a short summary (``--json_summary``: the JSON).

    Exit status: 0 at least one study answered; 1 none answered; 2 usage or input (bad option, missing
    input, model refused, e.g. unsigned without --allow_unsigned); 3 output or I/O (folder not writable,
    in use by another run, disk full). One line on stderr, never a traceback.
    """
    options = _options(locals())
    batch_size, threads, output, on_slice_error = (options[k] for k in ("batch_size", "threads", "output",
                                                                         "on_slice_error"))
    no_sr, quiet, allow_incomplete, include_paths, json_summary, allow_demo_model, allow_unsigned = (
        options[k] for k in FLAGS)
    try:
        _run(inputs, model, output_dir, modalities, series_description, image_type, device, batch_size,
             on_slice_error, threads, no_sr, quiet, allow_incomplete, output, series_rule, include_paths,
             json_summary, public_key, allow_demo_model, allow_unsigned)
    except OutputError as err:
        _fail(f"output: {err.strerror}", EXIT_OUTPUT)


def _run(inputs, model, output_dir, modalities, series_description, image_type, device, batch_size, on_slice_error,
         threads, no_sr, quiet, allow_incomplete, output, series_rule, include_paths, json_summary, public_key,
         allow_demo_model, allow_unsigned):
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not inputs:
        _fail("give one or more DICOM folders (or files) to classify")
    check_output_dir(output_dir)  # before any work: a folder that cannot hold the results fails at once
    problem = input_problem(list(inputs))
    if problem:  # before the model is loaded: one line, and the status in summary.json
        where = write_no_input_summary(output_dir, problem, list(inputs), include_paths)
        _fail(f"{problem}; status in {where}")
    rule = None
    if series_rule:
        try:
            with open(series_rule) as handle:
                rule = handle.read()
        except OSError as err:
            _fail(f"cannot read the series rule file ({err.strerror})")
    try:
        selection = SeriesSelection(modalities=modalities or None, series_description=series_description or None,
                                    image_type=image_type or None)
        classifier = OnnxClassifier(model, device=device, intra_op_num_threads=threads, public_key=public_key or None)
        classifier.require_detector()  # a model that cannot vouch for its inputs is refused
    except ModelIntegrityError as err:
        _fail(f"model refused: {err}")
    except (FileNotFoundError, ModelMetadataError, RuntimeError, ValueError) as err:
        _fail(str(err).splitlines()[0])
    try:
        summary = infer_dicom(list(inputs), classifier, output_dir, selection, batch_size=batch_size,
                              on_slice_error=on_slice_error, write_sr_files=not no_sr, progress=not quiet,
                              allow_incomplete=allow_incomplete, output=output, series_rule=rule,
                              include_paths=include_paths, allow_demo_model=allow_demo_model,
                              allow_unsigned=allow_unsigned)
    except (DemoModelError, ModelIntegrityError) as err:
        _fail(f"model refused: {err}")
    except DicomInputError as err:
        _fail(str(err))
    except ValueError as err:  # an invalid option or series rule
        _fail(str(err).splitlines()[0])
    if json_summary:
        print(json.dumps(summary, indent=2))
    else:
        for study in summary["studies"]:
            results = [s for s in summary["series"] if s["study_instance_uid"] == study["study_instance_uid"]]
            if results:
                for r in results:
                    outcome = r["class"] if r["class"] else r["status"]
                    prob = f" {r['probability']:.2f}" if r.get("probability") is not None else ""
                    print(f"study {study['ordinal']}: {outcome}{prob} (series {r['series_instance_uid']}) -> "
                          f"{r['report_file']}")
            else:
                print(f"study {study['ordinal']}: no result: {study['reason']}")
        skipped = summary["n_files_skipped"]
        print(f"{summary['n_files']} file(s), {summary['n_studies']} study(ies), {summary['n_series_classified']} "
              f"result(s), {summary['n_series_abstained']} abstained, {skipped} file(s) skipped; summary: "
              f"{os.path.join(output_dir, 'summary.json')}")
    if summary["status"] != STATUS_OK:  # the exit status agrees with the summary's status
        _fail(f"no study was answered ({summary['status']}); the reasons are in "
              + os.path.join(output_dir, "summary.json"), EXIT_STATUS.get(summary["status"], EXIT_NO_RESULT))


if __name__ == "__main__":
    fire.Fire(main)
