"""Classify image files (PNG/JPEG/NIfTI/single DICOM/.mat) and write the results as JSON.

The bundle's ``inference.json`` is a standard MONAI infer workflow: ``dataset`` holds
:func:`file_items`, ``preprocessing`` is :class:`robustmri.data.transforms.LoadPreprocessd`
(which marks unreadable files instead of stopping), ``evaluator`` runs the network and
:class:`PredictionsWriter`, among its ``handlers``, writes one JSON file: for every readable file
its probabilities, whether it is ``assessable`` and its ``abstention_score`` (the checkpoint's
abstention state, :mod:`robustmri.abstention`), and its class when assessable (``null`` and a
``reason`` when not); every other file with its reason. The state's score name, threshold and
rule are written once, at the top, with the intended use
(``intended_use``: :data:`robustmri.INTENDED_USE`).
"""

from __future__ import annotations

import glob
import logging
import os

import torch
from ignite.engine import Engine

from robustmri import INTENDED_USE
from robustmri.abstention.fit import describe_state, scores_of
from robustmri.abstention.state import AbstentionState
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


#: The reason written for a readable image that is not assessable.
NOT_ASSESSABLE = ("not assessable: the abstention score is above the threshold (the image is unlike the training "
                  "images, so the model cannot vouch for a class)")


class PredictionsWriter(RunCollector):
    """Evaluator handler: collects class probabilities per file and writes ``output_file`` when done.

    ``pred`` must hold probabilities (softmax in the evaluator's postprocessing); items whose
    ``error`` is set (unreadable files) are listed with their reason and get no class. With
    ``abstention`` (the checkpoint's :class:`~robustmri.abstention.state.AbstentionState`) and
    ``network`` (the evaluator's, its weights loaded), every readable file also gets
    ``abstention_score`` and ``assessable``; a not-assessable one keeps its probabilities (what the
    network computed, for audit) but gets ``"class": null`` and a ``reason``.
    """

    def __init__(self, output_file: str, class_names, network: torch.nn.Module | None = None,
                 abstention: AbstentionState | None = None):
        if (network is None) != (abstention is None):
            raise ValueError("PredictionsWriter: give both network and abstention (the checkpoint's state), or neither")
        self.output_file = output_file
        self.class_names = tuple(class_names)
        self.network, self.abstention = network, abstention
        self.summary: dict | None = None
        self._predictions: list[dict] = []
        self._errors: list[dict] = []

    def reset(self, engine: Engine) -> None:
        self._predictions, self._errors, self.summary = [], [], None

    def collect(self, engine: Engine) -> None:
        readable = []
        for item, output in zip(engine.state.batch, engine.state.output):  # decollated: one dict per file
            if item.get(ERROR_KEY):
                self._errors.append({"file": item["file"], "error": item[ERROR_KEY]})
                continue
            probabilities = torch.as_tensor(output["pred"]).float().reshape(-1).tolist()
            best = max(range(len(probabilities)), key=probabilities.__getitem__)
            readable.append(output)
            self._predictions.append({"file": item["file"], "class": self.class_names[best],
                                      "probabilities": dict(zip(self.class_names, probabilities))})
        if self.abstention is None or not readable:
            return
        images = torch.stack([torch.as_tensor(output["image"]) for output in readable])
        scores = scores_of(self.abstention, self.network, images)
        for prediction, score, assessable in zip(self._predictions[-len(readable):], scores,
                                                 self.abstention.accepts(scores)):
            prediction.update(assessable=bool(assessable), abstention_score=float(score))
            if not assessable:
                prediction.update({"class": None, "reason": NOT_ASSESSABLE})

    def write(self, engine: Engine) -> None:
        assessable = [p for p in self._predictions if p.get("assessable", True)]
        summary = {"intended_use": INTENDED_USE}  # one top-level key for the whole output, not one per file
        summary.update({"abstention": describe_state(self.abstention)} if self.abstention is not None else {})
        summary.update({"n_classified": len(assessable), "n_assessable": len(assessable),
                        "n_not_assessable": len(self._predictions) - len(assessable), "n_failed": len(self._errors),
                        "predictions": self._predictions, "errors": self._errors})
        self.summary = summary
        write_json(self.output_file, self.summary)
        for error in self._errors:
            logger.warning("not classified: %s (%s)", error["file"], error["error"])
        logger.info("classified %d image(s), %d not assessable, %d failed -> %s", len(assessable),
                    summary["n_not_assessable"], len(self._errors), self.output_file)
