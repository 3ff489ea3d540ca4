"""ISR and ISP wired into MONAI/ignite trainers.

Both run the influence step once, when epoch ``epoch`` (T_pre) completes, on the
trainer's own network, and then let training continue:

- :class:`ISRHandler` gives every training sample a fixed loss weight; the trainer's
  loss must be a :class:`SampleWeightedCrossEntropy` (attached as a handler too).
- :class:`ISPHandler` replaces the selected training images by their perturbed
  versions, in the data set itself, so the change persists for the remaining epochs.

Each writes ``influence.csv``, ``influence_summary.json``, a histogram of scores per
class and a picture of examples into ``output_dir``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time

import numpy as np
import torch
from ignite.engine import Engine, Events
from torch import nn

from .influence import InfluenceResult, compute_influence, input_gradients, make_solver
from .isr_isp import isr_weights, perturb, select_for_perturbation, weighted_cross_entropy
from .plots import plot_influence_examples, plot_score_histogram

logger = logging.getLogger(__name__)


def item_batches(items: list[dict], batch_size: int, positions=None):
    """Batches of protocol items (no augmentation): dicts of stacked image, label and id."""
    positions = range(len(items)) if positions is None else positions
    positions = list(positions)
    for start in range(0, len(positions), batch_size):
        chunk = [items[p] for p in positions[start:start + batch_size]]
        yield {
            "image": torch.as_tensor(np.stack([np.asarray(it["image"]) for it in chunk])).float(),
            "label": torch.tensor([int(it["label"]) for it in chunk]),
            "id": torch.tensor([int(it["id"]) for it in chunk]),
        }


class SampleWeightedCrossEntropy(nn.Module):
    """mean_i(w_i * CE_i) with weights looked up by the batch's sample ids.

    Attach it to the trainer (list it among the train handlers): it reads each batch's
    ``id`` when the iteration starts. Until :meth:`set_weights` is called every weight is
    1 and the loss is plain cross-entropy.
    """

    def __init__(self):
        super().__init__()
        self.weights_by_id: torch.Tensor | None = None
        self._batch_ids: torch.Tensor | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self._remember_ids)

    def _remember_ids(self, engine: Engine) -> None:
        batch = engine.state.batch
        self._batch_ids = torch.as_tensor(batch["id"]).reshape(-1).long() if isinstance(batch, dict) and "id" in batch else None

    def set_weights(self, ids: torch.Tensor, weights: torch.Tensor) -> None:
        table = torch.ones(int(ids.max()) + 1)
        table[ids.long()] = weights.float()
        self.weights_by_id = table

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        weights = None
        if self.weights_by_id is not None:
            if self._batch_ids is None:
                raise RuntimeError("sample weights are set but the batch carries no 'id': attach the loss to the trainer")
            weights = self.weights_by_id[self._batch_ids].to(logits.device)
        return weighted_cross_entropy(logits, labels, weights)


class InfluenceStep:
    """Computes influence scores once, after epoch ``epoch``; subclasses act on them."""

    method = "influence"

    def __init__(self, epoch: int, train_data: list[dict], val_data: list[dict], output_dir: str,
                 solver: str | object = "exact", solver_args: dict | None = None, class_names=None,
                 batch_size: int = 64):
        self.epoch = int(epoch)
        self.train_data, self.val_data = train_data, val_data
        self.output_dir = output_dir
        self.solver = make_solver(solver, **(solver_args or {})) if isinstance(solver, str) else solver
        self.class_names = tuple(class_names) if class_names else None
        self.batch_size = int(batch_size)
        self.result: InfluenceResult | None = None
        self.timings: dict[str, float] = {}

    def attach(self, engine: Engine) -> None:
        if engine.state.max_epochs is not None and self.epoch >= engine.state.max_epochs:
            logger.warning("%s: influence epoch %d is not before the last epoch (%d): the step changes nothing "
                           "that is trained on", self.method, self.epoch, engine.state.max_epochs)
        engine.add_event_handler(Events.EPOCH_COMPLETED(once=self.epoch), self)

    def __call__(self, engine: Engine) -> None:
        network = engine.network
        device = next(network.parameters()).device
        start = time.perf_counter()
        self.result = compute_influence(network, item_batches(self.train_data, self.batch_size),
                                        item_batches(self.val_data, self.batch_size), self.solver, device)
        self.timings["influence_s"] = time.perf_counter() - start
        position = {int(item["id"]): k for k, item in enumerate(self.train_data)}
        positions = [position[int(i)] for i in self.result.ids]
        columns = self.apply(engine, positions)
        self.timings["total_s"] = time.perf_counter() - start
        self._write(positions, columns)
        scores = self.result.scores
        logger.info("%s after epoch %d: %d training samples scored in %.2f s (%d harmful, %d helpful)%s",
                    self.method, self.epoch, len(scores), self.timings["total_s"], int((scores < 0).sum()),
                    int((scores > 0).sum()), self.describe())

    def apply(self, engine: Engine, positions: list[int]) -> dict[str, np.ndarray]:
        """Act on ``self.result``; return extra per-sample columns for influence.csv."""
        return {}

    def describe(self) -> str:
        return ""

    def _write(self, positions: list[int], columns: dict[str, np.ndarray]) -> None:
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
                   "harmful": int((scores < 0).sum()), "helpful": int((scores > 0).sum()), **self.timings}
        with open(os.path.join(self.output_dir, "influence_summary.json"), "w") as handle:
            json.dump(summary, handle, indent=2)
        plot_score_histogram(scores, labels, names, os.path.join(self.output_dir, "influence_histogram.png"))


class ISRHandler(InfluenceStep):
    """Influence-based Sample Reweighing: fixed per-sample weights in [1, alpha] after epoch T_pre."""

    method = "ISR"

    def __init__(self, loss: SampleWeightedCrossEntropy, *args, alpha: float = 2.0, emphasis: str = "helpful",
                 **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(loss, SampleWeightedCrossEntropy):
            raise TypeError("ISR needs the trainer's loss to be robustmri.influence_handlers.SampleWeightedCrossEntropy")
        self.loss, self.alpha, self.emphasis = loss, float(alpha), emphasis
        isr_weights(torch.zeros(2), self.alpha, emphasis)  # validate the options now, not after T_pre epochs

    def apply(self, engine: Engine, positions: list[int]) -> dict[str, np.ndarray]:
        weights = isr_weights(self.result.scores, self.alpha, self.emphasis)
        self.loss.set_weights(self.result.ids, weights)
        images = [np.asarray(self.train_data[p]["image"])[0] for p in positions]
        plot_influence_examples(images, None, self.result.scores.numpy(), self.class_names, self.result.labels.numpy(),
                                os.path.join(self.output_dir, "influence_examples.png"))
        return {"weight": weights.numpy()}

    def describe(self) -> str:
        return f"; weights in [1, {self.alpha:g}], emphasis {self.emphasis}"


class ISPHandler(InfluenceStep):
    """Influence-based Sample Perturbation: one persisted step per selected training image."""

    method = "ISP"

    def __init__(self, *args, step: float = 0.1, direction: str = "gradient", epsilon: float | None = None,
                 quantisation: str = "float", ratio: float = 1.0, selection: str = "harmful", **kwargs):
        super().__init__(*args, **kwargs)
        self.options = {"step": float(step), "direction": direction, "epsilon": epsilon, "quantisation": quantisation}
        self.ratio, self.selection = float(ratio), selection
        perturb(torch.zeros(1), torch.zeros(1), **self.options)  # validate the options now
        select_for_perturbation(torch.zeros(2), self.ratio, selection)
        self.changed = 0

    def apply(self, engine: Engine, positions: list[int]) -> dict[str, np.ndarray]:
        network = engine.network
        device = next(network.parameters()).device
        s = self.result.s.to(device)
        chosen = select_for_perturbation(self.result.scores, self.ratio, self.selection).tolist()
        linf = np.zeros(len(positions))
        l2 = np.zeros(len(positions))
        order = np.argsort(self.result.scores.numpy())
        examples = set(order[:3].tolist() + order[-3:].tolist())  # most harmful and most helpful
        before, deltas = {}, {}
        start = time.perf_counter()
        for start_row in range(0, len(chosen), self.batch_size):
            rows = chosen[start_row:start_row + self.batch_size]
            batch = next(item_batches(self.train_data, len(rows), [positions[r] for r in rows]))
            images = batch["image"].to(device)
            gradients = input_gradients(network, images, batch["label"].to(device), s)
            perturbed = perturb(images, gradients, **self.options)
            change = (perturbed - images).detach()
            for k, row in enumerate(rows):
                self.train_data[positions[row]]["image"] = perturbed[k].detach().cpu().numpy().astype(np.float32)
                linf[row] = change[k].abs().max().item()
                l2[row] = change[k].norm().item()
                if row in examples:
                    before[row] = images[k, 0].cpu().numpy()
                    deltas[row] = change[k, 0].cpu().numpy()
        self.timings["input_gradients_s"] = time.perf_counter() - start
        self.changed = len(chosen)
        rows = sorted(before, key=lambda r: self.result.scores[r].item())
        plot_influence_examples([before[r] for r in rows], [deltas[r] for r in rows],
                                self.result.scores.numpy()[rows], self.class_names, self.result.labels.numpy()[rows],
                                os.path.join(self.output_dir, "influence_examples.png"))
        return {"perturbation_linf": linf, "perturbation_l2": l2}

    def describe(self) -> str:
        return f"; {self.changed} images perturbed ({self.options['direction']}, step {self.options['step']:g})"
