"""Test reports: the evaluator handler that writes metrics and a confusion matrix, and the metric output transform."""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from ignite.engine import Engine

from robustmri.engine.collect import RunCollector
from robustmri.engine.distributed import is_distributed, is_main_process, world_size
from robustmri.evaluation.metrics import classification_report, write_report
from robustmri.outputs import plt, save_figure

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


class ClassificationReportHandler(RunCollector):
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

    def reset(self, engine: Engine) -> None:
        self._labels, self._probabilities, self.report = [], [], None

    def collect(self, engine: Engine) -> None:
        scores, labels = probabilities_and_labels(engine.state.output)
        self._probabilities.extend(scores.detach().float().cpu().numpy())
        self._labels.extend(labels.cpu().tolist())

    def write(self, engine: Engine) -> None:
        labels, probabilities = gather_in_order(self._labels), gather_in_order(self._probabilities)
        self.report = classification_report(labels, np.stack(probabilities), self.class_names)
        if not is_main_process():  # every rank holds the whole report; rank 0 writes it
            return
        folder = os.path.join(self.output_dir, self.tag)
        write_report(self.report, folder)
        plot_confusion_matrix(self.report, os.path.join(folder, "confusion_matrix.png"), title=f"test ({self.tag})")
        logger.info("test [%s]: accuracy %.4f, macro-F1 %.4f, ROC-AUC %s (n = %d) -> %s", self.tag,
                    self.report["accuracy"], self.report["macro_f1"], _fmt(self.report["roc_auc_macro"]),
                    self.report["n"], folder)


def gather_in_order(rows: list) -> list:
    """Under ``torchrun``, every rank's ``rows`` joined in the order of the data set.

    Rank r of W evaluated items r, r + W, r + 2W, ... (MONAI's ``DistributedSampler`` with
    ``shuffle=False, even_divisible=False``, as ``multi_gpu_evaluate.json`` sets it), so item
    ``r + W * j`` is rank r's j-th row. Without a process group ``rows`` is returned as is.
    """
    if not is_distributed():
        return list(rows)
    parts = [None] * world_size()
    torch.distributed.all_gather_object(parts, list(rows))
    joined = []
    for j in range(max(len(part) for part in parts)):
        joined += [part[j] for part in parts if j < len(part)]
    return joined


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def plot_confusion_matrix(report: dict, path: str, title: str = "") -> None:
    names = report["confusion_matrix"]["rows_true_columns_predicted"]
    counts = np.asarray(report["confusion_matrix"]["counts"])
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.imshow(counts, cmap="Blues")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center",
                    color="white" if counts[i, j] > counts.max() / 2 else "black")
    ax.set_xticks(range(len(names)), names, rotation=30)
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="predicted", ylabel="true",
           title=f"{title}\naccuracy {report['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f}")
    save_figure(fig, path)
