"""Influence label audit: rank training samples so that a reviewer meets wrong labels first.

A wrongly labelled sample pulls the classifier towards the wrong class, which raises the
clean validation loss: its influence score (sign convention of :mod:`robustmri.influence`)
is negative. The audit ranks training samples from the most harmful up and, where the
protocol recorded which labels it flipped, reports precision at k of that ranking against
two baselines: ranking by training loss (the usual small-loss heuristic, largest first)
and a random order (expected precision = the flip rate). With ``self_influence`` (the
default) it also ranks by self-influence, ``-g_i . (H + lambda I)^-1 g_i / N``
(:mod:`robustmri.influence.self_influence`, Koh and Liang's own criterion of section 5.4),
which needs no validation set: the most negative first.

Under ``torchrun`` (:mod:`robustmri.engine.distributed`) every rank takes rank 0's network
(weights and BatchNorm statistics) and works on its contiguous shard of the training and
validation sets (:func:`robustmri.influence.distributed.shard_bounds`): the influence scores
and self-influence come from :func:`robustmri.influence.distributed.compute_influence_sharded`
(which all-reduces the last-layer Hessian), and the shards' losses are all-gathered in sample
order, so every rank holds the scores, rankings and precision at k of one process (up to the
rounding of summing in another order); rank 0 alone writes the files.
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
from robustmri.engine.distributed import broadcast_module, is_distributed, is_main_process, rank, world_size
from robustmri.engine.once import OnceAfterEpoch
from robustmri.engine.predictions import predict_items
from robustmri.evaluation.ranking import precision_at_k
from robustmri.influence import Solver, compute_influence, influence_ranking, make_solver
from robustmri.influence.adapter import unwrap
from robustmri.influence.distributed import compute_influence_sharded, gather_rows, shard_bounds
from robustmri.methods import Method
from robustmri.options import as_flag
from robustmri.outputs import write_json

METHOD = Method(name="audit", title="Influence label audit: training labels ranked for review, precision at k",
                order=9, families=("noisy labels",), summary="audit_summary.json",
                reference="Koh and Liang, ICML 2017, section 5.4", builds_on=("influence",))
RANKING_FILE = "audit_ranking.csv"
#: Per-sample values with the recorded true labels, for benchmarks of review orders only (written only where the
#: protocol flipped labels; the reviewer's ranking file never carries the true labels).
VALUES_FILE = "audit_values.json"

logger = logging.getLogger(__name__)


def loss_ranking(losses) -> np.ndarray:
    """Positions from the largest training loss down (the baseline)."""
    return np.argsort(-np.asarray(losses, dtype=np.float64), kind="stable")


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


def audit_report(influence_scores, losses, is_wrong, ks, self_influence=None) -> dict:
    """Precision at each k for the influence ranking, the loss ranking, random order and, when given, the
    self-influence ranking (most negative first)."""
    is_wrong = np.asarray(is_wrong, dtype=bool)
    by_influence, by_loss = influence_ranking(influence_scores), loss_ranking(losses)
    by_self = None if self_influence is None else influence_ranking(self_influence)
    rows = [{"k": k, "influence": precision_at_k(by_influence, is_wrong, k),
             "loss": precision_at_k(by_loss, is_wrong, k), "random": float(is_wrong.mean()),
             **({} if by_self is None else {"self_influence": precision_at_k(by_self, is_wrong, k)})}
            for k in resolve_ks(ks, len(is_wrong), int(is_wrong.sum()))]
    return {"n": int(len(is_wrong)), "wrong_labels": int(is_wrong.sum()), "precision_at_k": rows}


class AuditHandler(OnceAfterEpoch):
    """Runs the audit when epoch ``epoch`` completes; writes ``audit_ranking.csv`` and ``audit_summary.json``.

    The ranking uses only the given labels and the clean validation set; the recorded true
    labels (``true_label`` of the protocol's items) only score it. The audit changes nothing
    that is trained on, so it may run after the last epoch (its default). Self-influence comes
    from the influence pass's features and the Cholesky factor of ``H + lambda I`` with the
    solver's damping (for ``exact`` the very factor of the solve).
    """

    method = "audit"
    changes_training = False

    def __init__(self, epoch: int, train_data: list[dict], val_data: list[dict], output_dir: str,
                 solver: str | Solver = "exact", solver_args: dict | None = None, ks=(0.05, 0.1, "flipped"),
                 batch_size: int = 64, self_influence: bool = True):
        super().__init__(epoch)
        self.train_data, self.val_data, self.output_dir = train_data, val_data, output_dir
        self.solver = make_solver(solver, **(solver_args or {}))
        self.ks, self.batch_size = list(ks), int(batch_size)
        self.self_influence = as_flag(self_influence, "self_influence")
        self.report: dict | None = None
        #: the per-sample values the report was built from, in training-set order (every rank holds all of them)
        self.values: dict[str, torch.Tensor] | None = None

    def compute(self, network: torch.nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
        """Influence scores, losses, given labels, ids and (with ``self_influence``) self-influence of every
        training sample, in training-set order; under a process group each rank computes its shard."""
        model = unwrap(network)  # the network itself: its forward passes differ in number between shards
        size = self.batch_size
        if is_distributed():  # rank 0's weights and BatchNorm statistics on every rank, then each rank its shard
            broadcast_module(model)
            train = range(*shard_bounds(len(self.train_data), rank(), world_size()))
            val = range(*shard_bounds(len(self.val_data), rank(), world_size()))
            result = compute_influence_sharded(model, item_batches(self.train_data, size, train),
                                               item_batches(self.val_data, size, val), self.solver, device,
                                               self.self_influence)
            logits, labels, ids = predict_items(model, self.train_data, size, device, train)
            losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none") if len(labels) else \
                torch.zeros(0)
            losses, labels, ids, logits = gather_rows(losses), gather_rows(labels), gather_rows(ids), gather_rows(logits)
        else:
            result = compute_influence(model, item_batches(self.train_data, size),
                                       item_batches(self.val_data, size), self.solver, device, self.self_influence)
            logits, labels, ids = predict_items(model, self.train_data, size, device)
            losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        if not torch.equal(ids, result.ids):
            raise RuntimeError("label audit: influence and loss passes saw the training samples in different orders")
        values = {"scores": result.scores, "losses": losses, "labels": labels, "ids": ids,
                  "probabilities": torch.softmax(logits.float(), dim=1)}
        if result.self_influence is not None:
            values["self_influence"] = result.self_influence
        return values

    def run(self, engine: Engine, network: torch.nn.Module, device: torch.device) -> None:
        values = self.values = self.compute(network, device)
        scores, losses, labels, ids = (values[k].numpy() for k in ("scores", "losses", "labels", "ids"))
        self_scores = values["self_influence"].numpy() if "self_influence" in values else None
        report = {"epoch": self.epoch, "solver": type(self.solver).__name__, "damping": self.solver.damping,
                  "self_influence": self_scores is not None}
        if is_distributed():
            report["ranks"] = world_size()
        if has_label_record(self.train_data):
            is_wrong = true_labels(self.train_data) != labels
            report.update(audit_report(scores, losses, is_wrong, self.ks, self_scores))
            best = report["precision_at_k"][-1] if report["precision_at_k"] else None
            if best:
                logger.info("label audit after epoch %d: precision at %d = %.3f by influence, %.3f by loss, "
                            "%.3f at random%s", self.epoch, best["k"], best["influence"], best["loss"], best["random"],
                            f", {best['self_influence']:.3f} by self-influence" if self_scores is not None else "")
        else:
            report.update({"n": len(scores), "wrong_labels": None, "precision_at_k": None,
                           "note": "no recorded true labels (label_noise is 'none'): ranking only"})
        self.report = report
        if not is_main_process():  # under torchrun every rank computed the same ranking; rank 0 writes it
            return
        os.makedirs(self.output_dir, exist_ok=True)
        write_json(os.path.join(self.output_dir, METHOD.summary), report)
        if has_label_record(self.train_data):
            write_json(os.path.join(self.output_dir, VALUES_FILE), {
                "ids": ids.tolist(), "labels": labels.tolist(), "true_labels": true_labels(self.train_data).tolist(),
                "scores": scores.tolist(), "losses": losses.tolist(),
                "self_influence": None if self_scores is None else self_scores.tolist(),
                "probabilities": values["probabilities"].numpy().round(6).tolist()}, indent=None)
        by_influence = influence_ranking(scores)
        ranks = {"influence_rank": by_influence, "loss_rank": loss_ranking(losses)}
        if self_scores is not None:
            ranks["self_influence_rank"] = influence_ranking(self_scores)
        positions = {}
        for name, order in ranks.items():
            positions[name] = np.empty(len(scores), int)
            positions[name][order] = np.arange(1, len(scores) + 1)
        with open(os.path.join(self.output_dir, RANKING_FILE), "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow([*ranks, "id", "file", "label", "score", "loss",
                             *(["self_influence"] if self_scores is not None else [])])
            for row in by_influence:
                item = self.train_data[row]
                writer.writerow([*(positions[name][row] for name in ranks), int(ids[row]), item.get("file", ""),
                                 int(labels[row]), f"{scores[row]:.6e}", f"{losses[row]:.6g}",
                                 *([f"{self_scores[row]:.6e}"] if self_scores is not None else [])])
