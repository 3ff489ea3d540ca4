"""The influence step that ISR and ISP share, wired into MONAI/ignite trainers.

It runs once, when epoch ``epoch`` (T_pre) completes, on the trainer's own network (any
classifier ending in one linear layer, :mod:`robustmri.influence`), and then lets training
continue. It scores every training sample on the clean validation loss, lets the method act
on the scores (:meth:`InfluenceStep.apply`), and writes ``influence.csv``,
``influence_summary.json``, a histogram of scores per class and a picture of examples into
``output_dir``.

Under ``torchrun`` (:mod:`robustmri.engine.distributed`) every rank takes rank 0's network,
scores its own contiguous shard and gets every score
(:func:`robustmri.influence.distributed.compute_influence_sharded`), so the scores, and what
the method makes of them, are the same on every rank and as in one process; rank 0 alone
writes the files.
"""

from __future__ import annotations

import csv
import logging
import os
import time

import numpy as np
import torch
from ignite.engine import Engine
from torch import nn

from robustmri.data.batching import item_batches
from robustmri.engine.distributed import broadcast_module, is_distributed, is_main_process, rank, world_size
from robustmri.engine.once import OnceAfterEpoch
from robustmri.influence import InfluenceResult, Solver, compute_influence, make_solver
from robustmri.influence.adapter import unwrap
from robustmri.influence.distributed import compute_influence_sharded, shard_bounds
from robustmri.outputs import plt, save_figure, write_json

logger = logging.getLogger(__name__)


class InfluenceStep(OnceAfterEpoch):
    """Computes influence scores once, after epoch ``epoch``; subclasses act on them (:meth:`apply`)."""

    method = "influence"

    def __init__(self, epoch: int, train_data: list[dict], val_data: list[dict], output_dir: str,
                 solver: str | Solver = "exact", solver_args: dict | None = None, class_names=None,
                 batch_size: int = 64):
        super().__init__(epoch)
        self.train_data, self.val_data = train_data, val_data
        self.output_dir = output_dir
        self.solver = make_solver(solver, **(solver_args or {}))
        self.class_names = tuple(class_names) if class_names else None
        self.batch_size = int(batch_size)
        self.result: InfluenceResult | None = None
        self.timings: dict[str, float] = {}

    def run(self, engine: Engine, network: nn.Module, device: torch.device) -> None:
        start = time.perf_counter()
        if is_distributed():  # every rank: rank 0's weights and BatchNorm statistics, its own shard of the samples
            broadcast_module(unwrap(network))
            train = range(*shard_bounds(len(self.train_data), rank(), world_size()))
            val = range(*shard_bounds(len(self.val_data), rank(), world_size()))
            self.result = compute_influence_sharded(network, item_batches(self.train_data, self.batch_size, train),
                                                    item_batches(self.val_data, self.batch_size, val), self.solver,
                                                    device)
        else:
            self.result = compute_influence(network, item_batches(self.train_data, self.batch_size),
                                            item_batches(self.val_data, self.batch_size), self.solver, device)
        self.timings["influence_s"] = time.perf_counter() - start
        position = {int(item["id"]): k for k, item in enumerate(self.train_data)}
        positions = [position[int(i)] for i in self.result.ids]
        columns = self.apply(network, device, positions)
        self.timings["total_s"] = time.perf_counter() - start
        self._write(positions, columns)
        scores = self.result.scores
        logger.info("%s after epoch %d: %d training samples scored in %.2f s (%d harmful, %d helpful)%s",
                    self.method, self.epoch, len(scores), self.timings["total_s"], int((scores < 0).sum()),
                    int((scores > 0).sum()), self.describe())

    def apply(self, network: nn.Module, device: torch.device, positions: list[int]) -> dict[str, np.ndarray]:
        """Act on ``self.result``; return extra per-sample columns for influence.csv."""
        return {}

    def describe(self) -> str:
        """A short note on what :meth:`apply` did, for the log line."""
        return ""

    def extra_summary(self) -> dict:
        """Method-specific entries (options used, achieved effect) merged into influence_summary.json."""
        return {}

    def _write(self, positions: list[int], columns: dict[str, np.ndarray]) -> None:
        if not is_main_process():  # under torchrun every rank holds the same result; rank 0 writes it
            return
        os.makedirs(self.output_dir, exist_ok=True)
        scores = self.result.scores.numpy()
        labels = self.result.labels.numpy()
        names = self.class_names or tuple(str(k) for k in range(int(labels.max()) + 1))
        with open(os.path.join(self.output_dir, "influence.csv"), "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "file", "label", "score", *columns])
            for row, p in enumerate(positions):
                item = self.train_data[p]
                writer.writerow([int(item["id"]), item.get("file", ""), names[labels[row]], f"{scores[row]:.6e}",
                                 *(f"{values[row]:.6g}" for values in columns.values())])
        summary = {"method": self.method, "epoch": self.epoch, "n_train": len(scores), "n_val": len(self.val_data),
                   "solver": type(self.solver).__name__, "damping": self.result.damping,
                   "harmful": int((scores < 0).sum()), "helpful": int((scores > 0).sum()), **self.timings,
                   **self.extra_summary()}
        write_json(os.path.join(self.output_dir, "influence_summary.json"), summary)
        plot_score_histogram(scores, labels, names, os.path.join(self.output_dir, "influence_histogram.png"))


def plot_score_histogram(scores, labels, class_names, path: str) -> None:
    """Influence scores per class; negative = harmful, positive = helpful."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(scores.min(), scores.max(), 40) if scores.max() > scores.min() else 10
    for k, name in enumerate(class_names):
        if (labels == k).any():
            ax.hist(scores[labels == k], bins=bins, alpha=0.55, label=f"{name} (n={(labels == k).sum()})")
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set(xlabel="influence score (> 0 helpful, < 0 harmful)", ylabel="training samples",
           title="influence of training samples on the clean validation loss")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_influence_examples(images, deltas, scores, class_names, labels, path: str, per_side: int = 3) -> None:
    """The most harmful and most helpful training images; with ``deltas`` (ISP) each row
    shows noisy image | perturbation | perturbed image, as in the paper's figures."""
    scores = np.asarray(scores)
    order = np.argsort(scores)
    rows = list(dict.fromkeys(order[:per_side].tolist() + order[-per_side:].tolist()))
    columns = 1 if deltas is None else 3
    fig, axes = plt.subplots(columns, len(rows), figsize=(2.1 * len(rows), 2.3 * columns), squeeze=False)
    for j, r in enumerate(rows):
        name = class_names[int(labels[r])] if class_names else str(int(labels[r]))
        verdict = "harmful" if scores[r] < 0 else "helpful"
        axes[0, j].imshow(images[r], cmap="gray", vmin=0, vmax=1)
        axes[0, j].set_title(f"{verdict}: {name}\nscore {scores[r]:.2e}", fontsize=8)
        if deltas is not None:
            limit = float(np.abs(deltas[r]).max()) or 1.0
            axes[1, j].imshow(deltas[r], cmap="seismic", vmin=-limit, vmax=limit)
            axes[1, j].set_title(f"perturbation (max {limit:.3f})", fontsize=8)
            axes[2, j].imshow(np.clip(images[r] + deltas[r], 0, 1), cmap="gray", vmin=0, vmax=1)
            axes[2, j].set_title("perturbed", fontsize=8)
    for ax in axes.ravel():
        ax.axis("off")
    save_figure(fig, path)
