"""Influence label audit: rank training samples so that a reviewer meets wrong labels first.

A wrongly labelled sample pulls the classifier towards the wrong class, which raises the
clean validation loss: its influence score (sign convention of :mod:`robustmri.influence`)
is negative. The audit ranks training samples from the most harmful up and, where the
protocol recorded which labels it flipped, reports precision at k of that ranking against
two baselines: ranking by training loss (the usual small-loss heuristic, largest first)
and a random order (expected precision = the flip rate).
"""

from __future__ import annotations

import csv
import logging
import os

import numpy as np
import torch
from ignite.engine import Engine

from robustmri.data.batching import item_batches
from robustmri.data.label_noise import has_label_record, true_labels
from robustmri.engine.distributed import is_main_process
from robustmri.engine.once import OnceAfterEpoch
from robustmri.engine.predictions import predict_items
from robustmri.influence import Solver, compute_influence, influence_ranking, make_solver
from robustmri.methods import Method
from robustmri.outputs import write_json

METHOD = Method(name="audit", title="Influence label audit: training labels ranked for review, precision at k",
                order=9, families=("noisy labels",), summary="audit_summary.json",
                reference="Koh and Liang, ICML 2017, section 5.4")
RANKING_FILE = "audit_ranking.csv"

logger = logging.getLogger(__name__)


def loss_ranking(losses) -> np.ndarray:
    """Positions from the largest training loss down (the baseline)."""
    return np.argsort(-np.asarray(losses, dtype=np.float64), kind="stable")


def precision_at_k(ranking, is_wrong, k: int) -> float:
    """Share of truly wrong labels among the first ``k`` ranked samples."""
    is_wrong = np.asarray(is_wrong, dtype=bool)
    k = int(k)
    if not 0 < k <= len(is_wrong):
        raise ValueError(f"k must lie in [1, {len(is_wrong)}], got {k}")
    return float(is_wrong[np.asarray(ranking)[:k]].mean())


def resolve_ks(ks, n: int, n_wrong: int | None) -> list[int]:
    """Concrete k values: integers as given, floats in (0, 1) as shares of n, "flipped" as the number of wrong labels."""
    resolved = []
    for k in ks:
        if k == "flipped":
            if n_wrong:
                resolved.append(int(n_wrong))
        elif isinstance(k, float) and 0 < k < 1:
            resolved.append(max(1, int(round(k * n))))
        else:
            resolved.append(int(k))
    return sorted({k for k in resolved if 0 < k <= n})


def audit_report(influence_scores, losses, is_wrong, ks) -> dict:
    """Precision at each k for the influence ranking, the loss ranking and random order."""
    is_wrong = np.asarray(is_wrong, dtype=bool)
    by_influence, by_loss = influence_ranking(influence_scores), loss_ranking(losses)
    rows = [{"k": k, "influence": precision_at_k(by_influence, is_wrong, k),
             "loss": precision_at_k(by_loss, is_wrong, k), "random": float(is_wrong.mean())}
            for k in resolve_ks(ks, len(is_wrong), int(is_wrong.sum()))]
    return {"n": int(len(is_wrong)), "wrong_labels": int(is_wrong.sum()), "precision_at_k": rows}


class AuditHandler(OnceAfterEpoch):
    """Runs the audit when epoch ``epoch`` completes; writes ``audit_ranking.csv`` and ``audit_summary.json``.

    The ranking uses only the given labels and the clean validation set; the recorded true
    labels (``true_label`` of the protocol's items) only score it. The audit changes nothing
    that is trained on, so it may run after the last epoch (its default).
    """

    method = "audit"
    changes_training = False

    def __init__(self, epoch: int, train_data: list[dict], val_data: list[dict], output_dir: str,
                 solver: str | Solver = "exact", solver_args: dict | None = None, ks=(0.05, 0.1, "flipped"),
                 batch_size: int = 64):
        super().__init__(epoch)
        self.train_data, self.val_data, self.output_dir = train_data, val_data, output_dir
        self.solver = make_solver(solver, **(solver_args or {}))
        self.ks, self.batch_size = list(ks), int(batch_size)
        self.report: dict | None = None

    def run(self, engine: Engine, network: torch.nn.Module, device: torch.device) -> None:
        result = compute_influence(network, item_batches(self.train_data, self.batch_size),
                                   item_batches(self.val_data, self.batch_size), self.solver, device)
        logits, labels, ids = predict_items(network, self.train_data, self.batch_size, device)
        if not torch.equal(ids, result.ids):
            raise RuntimeError("label audit: influence and loss passes saw the training samples in different orders")
        losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none").numpy()
        scores = result.scores.numpy()
        report = {"epoch": self.epoch, "solver": type(self.solver).__name__, "damping": result.damping}
        if has_label_record(self.train_data):
            is_wrong = true_labels(self.train_data) != labels.numpy()
            report.update(audit_report(scores, losses, is_wrong, self.ks))
            best = report["precision_at_k"][-1] if report["precision_at_k"] else None
            if best:
                logger.info("label audit after epoch %d: precision at %d = %.3f by influence, %.3f by loss, "
                            "%.3f at random", self.epoch, best["k"], best["influence"], best["loss"], best["random"])
        else:
            is_wrong = None
            report.update({"n": len(scores), "wrong_labels": None, "precision_at_k": None,
                           "note": "no recorded true labels (label_noise is 'none'): ranking only"})
        self.report = report
        if not is_main_process():  # under torchrun every rank computed the same ranking; rank 0 writes it
            return
        write_json(os.path.join(self.output_dir, METHOD.summary), report)
        by_influence, by_loss = influence_ranking(scores), loss_ranking(losses)
        influence_rank, loss_rank = np.empty(len(scores), int), np.empty(len(scores), int)
        influence_rank[by_influence] = np.arange(1, len(scores) + 1)
        loss_rank[by_loss] = np.arange(1, len(scores) + 1)
        with open(os.path.join(self.output_dir, RANKING_FILE), "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["influence_rank", "loss_rank", "id", "file", "label", "score", "loss"])
            for row in by_influence:
                item = self.train_data[row]
                writer.writerow([influence_rank[row], loss_rank[row], int(ids[row]), item.get("file", ""),
                                 int(labels[row]), f"{scores[row]:.6e}", f"{losses[row]:.6g}"])
