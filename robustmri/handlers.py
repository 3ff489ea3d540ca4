"""Ignite/MONAI handlers that the bundle configs attach to trainers and evaluators."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch
from ignite.engine import Engine, Events

from .metrics import classification_report, write_report
from .plots import plot_confusion_matrix, plot_training_curves

logger = logging.getLogger(__name__)


def _rows(output) -> list[dict]:
    """Engine output as a list of per-sample dicts, whether decollated or not."""
    if isinstance(output, dict):
        size = len(output["label"])
        return [{"pred": output["pred"][i], "label": output["label"][i]} for i in range(size)]
    return list(output)


def probabilities_and_labels(output) -> tuple[torch.Tensor, torch.Tensor]:
    """Output transform for ignite metrics: ([N, C] class scores, [N] class indices).

    MONAI engines decollate batches into per-sample dicts; ignite's Accuracy fed with
    per-sample one-hot vectors would count one-hot entries, not samples.
    """
    rows = _rows(output)
    scores = torch.stack([torch.as_tensor(r["pred"]).reshape(-1) for r in rows])
    labels = torch.stack([torch.as_tensor(r["label"]).reshape(-1)[0] for r in rows]).long()
    return scores, labels


class ClassificationReportHandler:
    """Collects an evaluator's class probabilities and writes the test report when it completes.

    Expects ``pred`` to hold probabilities (softmax in the evaluator's postprocessing)
    and ``label`` the class index. ``tag`` names the sub-folder (e.g. ``best``, ``last``).
    """

    def __init__(self, output_dir: str, class_names, tag: str = "test"):
        self.output_dir = output_dir
        self.class_names = tuple(class_names)
        self.tag = tag
        self.report: dict | None = None
        self._labels: list[int] = []
        self._probabilities: list[np.ndarray] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self._labels, self._probabilities, self.report = [], [], None

    def _collect(self, engine: Engine) -> None:
        scores, labels = probabilities_and_labels(engine.state.output)
        self._probabilities.extend(scores.detach().float().cpu().numpy())
        self._labels.extend(labels.cpu().tolist())

    def _write(self, engine: Engine) -> None:
        self.report = classification_report(self._labels, np.stack(self._probabilities), self.class_names)
        folder = os.path.join(self.output_dir, self.tag)
        write_report(self.report, folder)
        plot_confusion_matrix(self.report, os.path.join(folder, "confusion_matrix.png"), title=f"test ({self.tag})")
        logger.info("test [%s]: accuracy %.4f, macro-F1 %.4f, ROC-AUC %s (n = %d) -> %s", self.tag,
                    self.report["accuracy"], self.report["macro_f1"], _fmt(self.report["roc_auc_macro"]),
                    self.report["n"], folder)


class TrainingHistoryHandler:
    """Records the mean training loss and the validation metrics per epoch; writes
    ``history.json`` and ``training_curves.png`` into ``output_dir`` as training goes."""

    def __init__(self, output_dir: str, evaluator: Engine | None = None, loss_key: str = "loss"):
        self.output_dir = output_dir
        self.evaluator = evaluator
        self.loss_key = loss_key
        self.history: list[dict] = []
        self._losses: list[float] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self._losses.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect_loss)
        # after ValidationHandler (attached earlier) has run the evaluator for this epoch
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._record)

    def _collect_loss(self, engine: Engine) -> None:
        output = engine.state.output
        rows = output if isinstance(output, list) else [output]
        values = [float(r[self.loss_key]) for r in rows if isinstance(r, dict) and self.loss_key in r]
        if values:
            self._losses.append(values[0])

    def _record(self, engine: Engine) -> None:
        entry = {"epoch": engine.state.epoch,
                 "train_loss": float(np.mean(self._losses)) if self._losses else None}
        if self.evaluator is not None:
            entry.update({f"val_{k}" if not k.startswith("val") else k: float(v)
                          for k, v in self.evaluator.state.metrics.items() if np.isscalar(v)})
        self.history.append(entry)
        os.makedirs(self.output_dir, exist_ok=True)
        with open(os.path.join(self.output_dir, "history.json"), "w") as handle:
            json.dump(self.history, handle, indent=2)
        plot_training_curves(self.history, os.path.join(self.output_dir, "training_curves.png"))


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"
