"""Meta-Weight-Net (Shu et al., NeurIPS 2019): a small MLP maps each sample's loss to its weight.

The classification form of the meta-reweighting behind Meta Corrupted Pixels Mining
(MICCAI 2020). Every training iteration:

1. virtual step: theta'(phi) = theta - a * grad_theta sum_i w_i(phi) l_i(theta), with
   w_i = V(l_i; phi) the weight net's output, normalised to sum to 1 over the batch (the
   authors' released code; a constant V then gives plain mean cross-entropy);
2. meta step: phi <- phi - b * grad_phi L_meta(theta'(phi)), L_meta the mean cross-entropy
   on a batch of the clean validation (meta) set; the gradient flows through the virtual
   step (second order), taken with ``torch.func.functional_call`` so the real network is
   never touched;
3. real step: the trainer's optimiser on sum_i w_i l_i with the updated V, weights held fixed.

The virtual step is plain SGD with rate ``virtual_lr`` whatever the real optimiser (the
authors used SGD for both; with Adam the virtual step is the usual first-order stand-in).
BatchNorm statistics are updated by the virtual step on copies only, so the real
network's buffers change once per iteration, as in plain training.

Under ``torchrun`` (:mod:`robustmri.engine.distributed`) each rank takes the virtual and meta
steps on its own training batch and its own share of the meta batch: the ranks draw meta
batches from one seeded order of the meta set, each step takes the next ``ranks x
meta_batch_size`` samples and rank r the r-th share (``meta_batch_size`` is per process, like
``batch_size``). The virtual step is each rank's own (its training batch, the weights
normalised within it, as the real step's loss is); the weight net's gradient is averaged over
the ranks before the meta step (:func:`~robustmri.engine.distributed.average_gradients`, as DDP
averages the classifier's), so every rank holds the same weight net. It starts from rank 0's and
takes rank 0's at every epoch end, as the classifier does. The recorded meta loss of an epoch is
the mean over every rank's steps; rank 0 alone writes ``mwnet_summary.json``.

Resuming (:mod:`robustmri.engine.training_state`): the handler's state holds the weight net,
its optimiser, the meta-batch order (generator and queue) and the history.
"""

from __future__ import annotations

import copy
import logging
import os

import numpy as np
import torch
from ignite.engine import Engine, Events
from torch import nn
from torch.func import functional_call

from robustmri.data.batching import item_batches
from robustmri.data.label_noise import has_label_record, true_labels
from robustmri.engine.distributed import (
    average_gradients,
    broadcast_module,
    gather_lists,
    is_main_process,
    rank,
    world_size,
)
from robustmri.engine.predictions import predict_items
from robustmri.influence.adapter import unwrap
from robustmri.methods import Method
from robustmri.outputs import write_json

METHOD = Method(name="mwnet", title="MW-Net: Meta-Weight-Net loss reweighting learnt on the clean validation set",
                order=6, families=("noisy labels",), summary="mwnet_summary.json",
                reference="Shu et al., NeurIPS 2019")

logger = logging.getLogger(__name__)


class WeightNet(nn.Module):
    """V(l; phi): loss -> weight in (0, 1), one hidden layer (100 units in the paper)."""

    def __init__(self, hidden: int = 100):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1), nn.Sigmoid())

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        return self.net(losses.reshape(-1, 1)).reshape(-1)


def normalised_weights(raw: torch.Tensor) -> torch.Tensor:
    """w / sum(w) (weights of a batch sum to 1); all-zero weights stay zero."""
    total = raw.sum()
    return raw / total if total.item() != 0 else raw


def weighted_loss(losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (normalised_weights(weights) * losses).sum()


def meta_loss_after_virtual_step(model: nn.Module, weight_net: nn.Module, images: torch.Tensor,
                                 labels: torch.Tensor, meta_images: torch.Tensor, meta_labels: torch.Tensor,
                                 virtual_lr: float, weight_params: dict | None = None) -> torch.Tensor:
    """L_meta(theta'(phi)), differentiable in the weight net's parameters (``weight_params`` overrides them).

    The model's own parameters and buffers are left unchanged (buffers are copied).
    """
    params = {name: p for name, p in model.named_parameters()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    with torch.enable_grad():
        logits = functional_call(model, (params, buffers), (images,))
        losses = nn.functional.cross_entropy(logits, labels, reduction="none")
        weight_input = losses.detach()
        raw = weight_net(weight_input) if weight_params is None else functional_call(weight_net, weight_params,
                                                                                      (weight_input,))
        inner = weighted_loss(losses, raw)
        grads = torch.autograd.grad(inner, tuple(params.values()), create_graph=True)
        fast = {name: p - virtual_lr * g for (name, p), g in zip(params.items(), grads)}
        meta_logits = functional_call(model, (fast, buffers), (meta_images,))
        return nn.functional.cross_entropy(meta_logits, meta_labels)


def meta_step(model: nn.Module, weight_net: nn.Module, meta_optimizer: torch.optim.Optimizer, images, labels,
              meta_images, meta_labels, virtual_lr: float) -> float:
    """One update of the weight net on the meta loss after a virtual step; returns the meta loss.

    Under ``torchrun`` the weight net's gradient is averaged over the ranks before the update."""
    meta_loss = meta_loss_after_virtual_step(model, weight_net, images, labels, meta_images, meta_labels, virtual_lr)
    weight_params = [p for p in weight_net.parameters() if p.requires_grad]
    grads = torch.autograd.grad(meta_loss, weight_params)
    meta_optimizer.zero_grad(set_to_none=True)
    for p, g in zip(weight_params, grads):
        p.grad = g
    average_gradients(weight_params)
    meta_optimizer.step()
    return float(meta_loss.detach())


class MetaWeightedCrossEntropy(nn.Module):
    """The real step's loss: sum_i w_i CE_i with w = normalised V(CE_i), V held fixed."""

    def __init__(self, weight_net: WeightNet):
        super().__init__()
        self.weight_net = weight_net
        self.last_weights: torch.Tensor | None = None

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        losses = nn.functional.cross_entropy(logits, labels.long().reshape(-1), reduction="none")
        with torch.no_grad():
            raw = self.weight_net(losses.detach())
        self.last_weights = raw.detach()
        return weighted_loss(losses, raw)


class MWNetHandler:
    """Runs the virtual and meta steps at the start of every iteration; the trainer does the real step.

    The trainer's loss must be the :class:`MetaWeightedCrossEntropy` holding the same weight net.
    Meta batches cycle through the clean validation set in a seeded random order. Writes
    ``mwnet_summary.json`` (meta loss and the learnt loss-to-weight curve per epoch; the mean
    weight of wrongly and correctly labelled samples when the protocol recorded them). A
    :class:`~robustmri.engine.training_state.Resumable` handler: its state is put back when the run
    starts, after the weight net is on the trainer's device.
    """

    def __init__(self, loss: MetaWeightedCrossEntropy, val_data: list[dict], output_dir: str,
                 meta_lr: float = 1e-3, meta_weight_decay: float = 1e-4, virtual_lr: float = 0.01,
                 meta_batch_size: int = 32, seed: int = 0, train_data: list[dict] | None = None):
        if not isinstance(loss, MetaWeightedCrossEntropy):
            raise TypeError("mwnet needs the trainer's loss to be robustmri.methods.mwnet.MetaWeightedCrossEntropy")
        if not val_data:
            raise ValueError("mwnet needs a non-empty clean validation (meta) set")
        if virtual_lr < 0 or meta_lr < 0:
            raise ValueError(f"learning rates must be >= 0, got virtual {virtual_lr} and meta {meta_lr}")
        self.loss, self.weight_net = loss, loss.weight_net
        self.val_data, self.train_data, self.output_dir = val_data, train_data, output_dir
        self.virtual_lr, self.meta_batch_size = float(virtual_lr), int(meta_batch_size)
        self.meta_optimizer = torch.optim.Adam(self.weight_net.parameters(), lr=meta_lr, weight_decay=meta_weight_decay)
        self.rng = np.random.default_rng(seed)
        self._queue: list[int] = []
        self._meta_losses: list[float] = []
        self.history: list[dict] = []
        self._started = False
        self._pending: dict | None = None  # a resumed run's state, put back once the weight net is on its device

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_STARTED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._record)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _start(self, engine: Engine) -> None:
        self.weight_net.to(next(engine.network.parameters()).device)
        broadcast_module(self.weight_net)  # under torchrun every rank starts from rank 0's weight net
        self._started = True
        if self._pending is not None:
            self._restore(self._pending)
            self._pending = None

    # -- resuming (robustmri.engine.training_state.Resumable) --
    def training_state(self) -> dict:
        """The weight net and its optimiser, the meta-batch order (generator and queue) and the history."""
        return {"weight_net": self.weight_net.state_dict(), "meta_optimizer": self.meta_optimizer.state_dict(),
                "rng": self.rng.bit_generator.state, "queue": [int(p) for p in self._queue],
                "history": copy.deepcopy(self.history)}

    def load_training_state(self, state: dict) -> None:
        """Put ``state`` back now if the run has started, else when it starts (the trainer restores first)."""
        if self._started:
            self._restore(state)
        else:
            self._pending = state

    def _restore(self, state: dict) -> None:
        self.weight_net.load_state_dict(state["weight_net"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.rng.bit_generator.state = state["rng"]
        self._queue = [int(p) for p in state["queue"]]
        self.history = copy.deepcopy(list(state["history"]))

    def next_meta_batch(self) -> dict:
        """This rank's share of the next ``ranks x meta_batch_size`` samples of the seeded meta-set order."""
        ranks, this = world_size(), rank()
        need = self.meta_batch_size * ranks
        if len(self._queue) < need:
            self._queue += self.rng.permutation(len(self.val_data)).tolist()
        step, self._queue = self._queue[:need], self._queue[need:]
        positions = step[len(step) * this // ranks:len(step) * (this + 1) // ranks]
        if not positions:
            raise ValueError(f"mwnet: a meta set of {len(self.val_data)} samples cannot give each of {ranks} ranks "
                             "a meta batch")
        return next(item_batches(self.val_data, len(positions), positions))

    def __call__(self, engine: Engine) -> None:
        batch = engine.state.batch
        network = unwrap(engine.network)  # the virtual step runs the network functionally, not through DDP
        device = next(network.parameters()).device
        network.train()
        meta = self.next_meta_batch()
        self._meta_losses.append(meta_step(
            network, self.weight_net, self.meta_optimizer, torch.as_tensor(batch["image"]).to(device),
            torch.as_tensor(batch["label"]).to(device).long().reshape(-1), meta["image"].to(device),
            meta["label"].to(device), self.virtual_lr))

    def weight_curve(self, max_loss: float = 5.0, points: int = 11) -> dict:
        grid = torch.linspace(0, max_loss, points, device=next(self.weight_net.parameters()).device)
        with torch.no_grad():
            return {f"{x:.2f}": float(w) for x, w in zip(grid.tolist(), self.weight_net(grid).tolist())}

    def _record(self, engine: Engine) -> None:
        broadcast_module(self.weight_net)  # under torchrun: rank 0's, as for the classifier
        meta_losses = gather_lists(self._meta_losses)  # every rank's steps
        self.history.append({"epoch": engine.state.epoch, "meta_loss": float(np.mean(meta_losses)),
                             "weight_by_loss": self.weight_curve()})
        self._meta_losses = []

    def _write(self, engine: Engine) -> None:
        if not is_main_process():  # under torchrun every rank holds the same history; rank 0 writes it
            return
        summary = {"method": "MW-Net", "virtual_lr": self.virtual_lr, "history": self.history}
        if self.train_data and has_label_record(self.train_data):
            network = unwrap(engine.network)
            device = next(network.parameters()).device
            logits, labels, _ = predict_items(network, self.train_data, 64, device)
            with torch.no_grad():
                weights = self.weight_net(nn.functional.cross_entropy(logits, labels, reduction="none").to(device))
            weights = weights.cpu().numpy()
            wrong = true_labels(self.train_data) != labels.numpy()
            summary["final_mean_weight"] = {"wrong_labels": float(weights[wrong].mean()) if wrong.any() else None,
                                            "correct_labels": float(weights[~wrong].mean()) if (~wrong).any() else None}
        write_json(os.path.join(self.output_dir, METHOD.summary), summary)
