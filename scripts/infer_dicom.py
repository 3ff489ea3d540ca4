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

The model is verified on load (integrity digest; with --public_key key.pem also its Ed25519
signature: an unsigned or otherwise signed model is refused); a demo model (trained on the
embedded synthetic set) is refused unless --allow_demo_model, and then every output says DEMO MODEL.

Exit status: 0 when at least one study (or series) gave a result, 1 when none did, 2 when the input
is missing or empty or the model cannot be used or is refused (one line on stderr; summary.json says why when the
output folder could be written).
"""

from __future__ import annotations

import json
import logging
import os
import sys

import fire

from robustmri.deploy.dicom.selection import SeriesSelection
from robustmri.deploy.dicom.study import DicomInputError, infer_dicom, input_problem, write_no_input_summary
from robustmri.deploy.onnx.runtime import ModelMetadataError, OnnxClassifier
from robustmri.deploy.onnx.trust import DemoModelError, ModelIntegrityError

BUNDLE = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "bundle"))


def _fail(message: str) -> None:
    print(f"infer_dicom: {message}", file=sys.stderr)
    sys.exit(2)


def main(*inputs: str, model: str = os.path.join(BUNDLE, "models", "model.onnx"),
         output_dir: str = os.path.join(BUNDLE, "eval", "dicom"), modalities="MR", series_description: str = "", image_type="", device: str = "auto",
         batch_size: int = 32, on_slice_error: str = "fail", threads: int = 0, no_sr: bool = False,
         quiet: bool = False, allow_incomplete: bool = False, output: str = "study", series_rule: str = "",
         include_paths: bool = False, json_summary: bool = False, public_key: str = "", allow_demo_model: bool = False):
    """Classify the selected studies under ``inputs``; print a short summary (``--json_summary``: the JSON)."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not inputs:
        _fail("give one or more DICOM folders (or files) to classify")
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
            _fail(f"{series_rule}: cannot read the series rule ({err.strerror})")
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
                              include_paths=include_paths, allow_demo_model=allow_demo_model)
    except DemoModelError as err:
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
    if not summary["n_series_classified"]:
        print("no study gave a result; the reasons are in " + os.path.join(output_dir, "summary.json"),
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    fire.Fire(main)
