"""Classify image files (PNG/JPEG/NIfTI/single DICOM/.mat) and write the results as JSON.

The bundle's ``inference.json`` is a standard MONAI infer workflow: ``dataset`` holds
:func:`file_items`, ``preprocessing`` is :class:`robustmri.data.transforms.LoadPreprocessd`
(which marks unreadable files instead of stopping), ``evaluator`` runs the network and
:class:`PredictionsWriter`, among its ``handlers``, writes one JSON file: the class and
probabilities of every readable file, and every other file with its reason, under the intended use
(``intended_use``: :data:`robustmri.INTENDED_USE`).
"""

from __future__ import annotations

import glob
import logging
import os

import torch
from ignite.engine import Engine

from robustmri import INTENDED_USE
from robustmri.data.readers import as_path_list, has_image_suffix
from robustmri.data.transforms import ERROR_KEY
from robustmri.engine.collect import RunCollector
from robustmri.outputs import write_json

logger = logging.getLogger(__name__)


def list_inputs(inputs) -> list[str]:
    """Expand folders (recursively, image suffixes only) and glob patterns into sorted files."""
    files: list[str] = []
    for entry in as_path_list(inputs):
        if os.path.isdir(entry):
            found = sorted(p for p in glob.glob(os.path.join(entry, "**", "*"), recursive=True)
                           if os.path.isfile(p) and has_image_suffix(p))
            if not found:
                raise FileNotFoundError(f"{entry}: folder holds no image files")
            files += found
        elif any(ch in entry for ch in "*?["):
            files += sorted(glob.glob(entry, recursive=True))
        else:
            files.append(entry)
    if not files:
        raise FileNotFoundError(f"no input files in {list(inputs)}")
    return files




def file_items(inputs) -> list[dict]:
    """Data-set items ``{"image": path, "file": path}`` for every input file (:func:`list_inputs`)."""
    return [{"image": path, "file": path} for path in list_inputs(inputs)]


class PredictionsWriter(RunCollector):
    """Evaluator handler: collects class probabilities per file and writes ``output_file`` when done.

    ``pred`` must hold probabilities (softmax in the evaluator's postprocessing); items whose
    ``error`` is set (unreadable files) are listed with their reason and get no class.
    """

    def __init__(self, output_file: str, class_names):
        self.output_file = output_file
        self.class_names = tuple(class_names)
        self.summary: dict | None = None
        self._predictions: list[dict] = []
        self._errors: list[dict] = []

    def reset(self, engine: Engine) -> None:
        self._predictions, self._errors, self.summary = [], [], None

    def collect(self, engine: Engine) -> None:
        for item, output in zip(engine.state.batch, engine.state.output):  # decollated: one dict per file
            if item.get(ERROR_KEY):
                self._errors.append({"file": item["file"], "error": item[ERROR_KEY]})
                continue
            probabilities = torch.as_tensor(output["pred"]).float().reshape(-1).tolist()
            best = max(range(len(probabilities)), key=probabilities.__getitem__)
            self._predictions.append({"file": item["file"], "class": self.class_names[best],
                                      "probabilities": dict(zip(self.class_names, probabilities))})

    def write(self, engine: Engine) -> None:
        self.summary = {"n_classified": len(self._predictions), "n_failed": len(self._errors),
                        "predictions": self._predictions, "errors": self._errors}
        self.summary["intended_use"] = INTENDED_USE  # one top-level key for the whole output, not one per file
        write_json(self.output_file, self.summary)
        for error in self._errors:
            logger.warning("not classified: %s (%s)", error["file"], error["error"])
        logger.info("classified %d image(s), %d failed -> %s", len(self._predictions), len(self._errors),
                    self.output_file)
