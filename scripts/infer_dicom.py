"""Classify DICOM series with an exported ONNX model; write a JSON report and a DICOM SR per series.

    python scripts/infer_dicom.py /path/to/dicom_folder [more folders] --model bundle/models/model.onnx \
        --output_dir results/
    python scripts/infer_dicom.py IN --model model.onnx --output_dir OUT --series_description 'T1.*(POST|GD|\\+C)' \
        --image_type ORIGINAL,PRIMARY --device cpu --on_slice_error skip

Series are grouped by SeriesInstanceUID; files of one SeriesInstanceUID that disagree on patient,
study, modality or geometry are refused, never merged (robustmri.deploy.dicom_series.GROUPING_POLICY).
Series are selected by Modality (MR by default), optionally a SeriesDescription regular expression
and required ImageType values. An incomplete series (duplicate positions, missing slices) gives no
result unless --allow_incomplete, which classifies it and marks it "complete": false. The
console and the reports carry no patient identifiers. Research software, not for clinical use.

The model is verified on load (integrity digest; with --public_key key.pem also its Ed25519
signature, and an unsigned or otherwise signed model is refused); a demo model (trained on the
embedded synthetic set) is refused unless --allow_demo_model, and then every output says DEMO MODEL.
Exit status: 0 when at least one series was classified, 1 when none was (see summary.json), 2 when
the model is refused (one line on stderr).
"""

from __future__ import annotations

import json
import logging
import os
import sys

import fire

from robustmri.deploy.dicom_inference import infer_dicom
from robustmri.deploy.dicom_series import SeriesSelection
from robustmri.deploy.model_trust import DemoModelError, ModelIntegrityError
from robustmri.deploy.onnx_runtime import ModelMetadataError, OnnxClassifier

BUNDLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "bundle")


def main(*inputs: str, model: str = os.path.join(BUNDLE, "models", "model.onnx"), output_dir: str = "dicom_results",
         modalities="MR", series_description: str = "", image_type="", device: str = "auto",
         batch_size: int = 32, on_slice_error: str = "fail", threads: int = 0, no_sr: bool = False,
         quiet: bool = False, allow_incomplete: bool = False, public_key: str = "", allow_demo_model: bool = False):
    """Classify the selected series under ``inputs``; print the run summary (JSON)."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not inputs:
        raise SystemExit("give one or more DICOM folders (or files) to classify")
    selection = SeriesSelection(modalities=modalities or None, series_description=series_description or None,
                                image_type=image_type or None)
    try:
        classifier = OnnxClassifier(model, device=device, intra_op_num_threads=threads, public_key=public_key or None)
        summary = infer_dicom(list(inputs), classifier, output_dir, selection, batch_size=batch_size,
                              on_slice_error=on_slice_error, write_sr_files=not no_sr, progress=not quiet,
                              allow_incomplete=allow_incomplete, allow_demo_model=allow_demo_model)
    except (ModelIntegrityError, ModelMetadataError, DemoModelError) as err:
        print(f"model refused: {err}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({k: summary[k] for k in ("n_files", "n_series_found", "n_series_classified", "provider",
                                              "series", "skipped_series", "skipped_files", "seconds")}, indent=2))
    if not summary["n_series_classified"]:
        print("no series classified; the reasons are in " + os.path.join(output_dir, "summary.json"), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    fire.Fire(main)
