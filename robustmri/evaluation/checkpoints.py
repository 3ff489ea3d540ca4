"""Evaluate the best-validation and the last-epoch checkpoints on the test set.

Model selection happens on validation only (the ``best`` checkpoint is chosen by the
CheckpointSaver on validation accuracy); the test set is only ever reported.
"""

from __future__ import annotations

import logging
import os

import torch
from ignite.engine import Engine, Events

from robustmri import INTENDED_USE
from robustmri.engine.checkpoint import load_weights
from robustmri.engine.distributed import is_main_process
from robustmri.engine.model_metadata import file_sha256
from robustmri.engine.predictions import predict_items
from robustmri.evaluation.metrics import classification_report
from robustmri.evaluation.report import ClassificationReportHandler
from robustmri.outputs import write_json

logger = logging.getLogger(__name__)


class LoadWeights:
    """Evaluator handler: load ``checkpoint`` into ``network`` when a run starts.

    What MONAI's ``CheckpointLoader`` does in model-zoo inference configs, with :func:`load_weights`'s
    messages (a missing checkpoint, or one trained with other settings, is named as such).
    """

    def __init__(self, network: torch.nn.Module, checkpoint: str):
        self.network, self.checkpoint = network, checkpoint

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        load_weights(self.network, self.checkpoint, next(self.network.parameters()).device)


def evaluate_checkpoints(evaluator, network: torch.nn.Module, checkpoints: dict[str, str],
                         report: ClassificationReportHandler, output_dir: str) -> dict:
    """Run ``evaluator`` once per checkpoint; write ``summary.json`` (by tag, and ``intended_use``); return the reports
    by tag.

    A missing checkpoint is reported and skipped; if none exists the call fails.
    """
    device = next(network.parameters()).device
    available = {tag: path for tag, path in checkpoints.items() if os.path.isfile(path)}
    for tag in sorted(set(checkpoints) - set(available)):
        logger.warning("checkpoint %r not found at %s: skipped", tag, checkpoints[tag])
    if not available:
        raise FileNotFoundError(f"none of the checkpoints exists: {checkpoints}; train first")
    results = {}
    for tag, path in available.items():
        load_weights(network, path, device)
        report.tag = tag
        evaluator.run()
        # the sha256 lets export credit these figures to this very checkpoint (robustmri.deploy.onnx.export)
        results[tag] = {"checkpoint": os.path.abspath(path), "checkpoint_sha256": file_sha256(path), **report.report}
    if not is_main_process():  # under torchrun every rank holds the same reports; rank 0 writes
        return results
    write_json(os.path.join(output_dir, "summary.json"),
               {tag: {k: r[k] for k in ("checkpoint", "checkpoint_sha256", "n", "accuracy", "macro_f1",
                                        "roc_auc_macro")}
                for tag, r in results.items()} | {"intended_use": INTENDED_USE})
    return results


def evaluate_checkpoints_on(network: torch.nn.Module, checkpoints: dict[str, str], items: list[dict],
                            class_names, with_correct: bool = False, inferer=None) -> dict[str, dict]:
    """Classification report per checkpoint tag on ``items`` (e.g. a run's own test split), in process;
    ``with_correct`` adds ``correct``, whether each item was classified right (in the order of ``items``);
    ``inferer``: how the test split is predicted (the bundle's ``test_inferer``; None: the network alone)."""
    device = next(network.parameters()).device
    reports = {}
    for tag, path in checkpoints.items():
        load_weights(network, path, device)
        logits, labels, _ = predict_items(network, items, device=device, inferer=inferer)
        reports[tag] = classification_report(labels.numpy(), torch.softmax(logits, dim=1).numpy(), class_names)
        if with_correct:
            reports[tag]["correct"] = (logits.argmax(1) == labels).numpy()
    return reports
