"""Active Label Refinement (Khanal, Dai, Bhattarai, Linte, MICCAI 2024): co-teaching with
Variance of Gradients, then budgeted relabelling by a (simulated) expert.

Phase 1, co-teaching (Han et al. 2018) of two networks: in every batch each network picks
the samples it trusts and its peer trains on them. A network keeps ``keep = int((1 - f) B)``
of the B samples, f the forget rate ramped linearly from 0 to the noise-rate estimate. Of
those, a share ``mix_ratio`` is chosen by Variance of Gradients instead of small loss: the
samples (outside the small-loss picks) whose gradient on the final-layer row of their given
label varied most over the last ``window`` epochs. Small-loss selection alone discards
clean samples of minority classes, whose losses stay high; their gradients keep moving,
which VoG sees. Ties in VoG (no history yet) fall back to small loss, so with no history or
``mix_ratio = 0`` the selection is plain co-teaching's.

Phase 2, active label refinement: the samples the peer network trusted for the main
network during the last co-teaching epoch are "kept as clean". Each round, the ``budget``
samples with the highest prediction entropy among those neither kept nor relabelled yet go
to the expert (simulated by an oracle that returns the protocol's recorded true label),
their labels are replaced, and the main network is fine-tuned on kept plus relabelled samples.

The pure functions below are the method; :class:`ALRHandler` wires them into the
stock MONAI trainer the way the AT handler does: when each iteration starts it trains the
peer network itself and hands the trainer the subset its own network should learn from.

Under ``torchrun`` (:mod:`robustmri.engine.distributed`) the method keeps its meaning, with the
ranks' batches taken together as DDP takes them:

- each rank selects within its own batch (co-teaching's selection is per batch); the trainer's
  DDP network averages the main network's gradients, and the handler averages the peer's
  (:func:`~robustmri.engine.distributed.average_gradients`) the same way, so every rank's peer
  takes the same step; the peer starts from rank 0's weights and takes rank 0's (BatchNorm
  statistics included) at every epoch end, as the trainer's network does;
- at every epoch end the ranks pool what they saw: the label-row gradients recorded for VoG (a
  sample drawn twice in an epoch, by the sampler's padding, keeps the mean of its records), the
  samples each peer trusted and the peer losses, so every rank holds the same VoG history, the
  same "kept as clean" set and the same epoch record;
- a relabelling round is chosen on rank 0 (its network, after the epoch-end broadcast) and every
  rank applies the same new labels;
- in phase 2 the ranks draw their batches from one seeded order of the pool: each step takes the
  next ``ranks x batch_size`` samples and rank r the r-th share, so an epoch fine-tunes on as many
  samples as in one process;
- rank 0 alone writes ``alr_summary.json``.

Resuming (:mod:`robustmri.engine.training_state`): the handler's state holds the peer network and
its optimiser, both VoG histories, the kept and relabelled sets with every training label, the
pool order (generator and queue) and the epoch and round records.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
from collections.abc import Callable

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import list_data_collate
from torch import nn

from robustmri.data.label_noise import has_label_record, true_labels
from robustmri.engine.distributed import (
    all_reduce,
    average_gradients,
    broadcast_module,
    broadcast_object,
    gather_lists,
    is_distributed,
    is_main_process,
    rank,
    world_size,
)
from robustmri.engine.precision import full_precision
from robustmri.engine.predictions import entropy, predict_items
from robustmri.evaluation.metrics import classification_report
from robustmri.influence import FinalLayer
from robustmri.influence.adapter import unwrap
from robustmri.methods import Method
from robustmri.outputs import write_json

METHOD = Method(name="alr", title="ALR: co-teaching with Variance of Gradients, then budgeted relabelling", order=5,
                families=("noisy labels",), summary="alr_summary.json",
                reference="Khanal, Dai, Bhattarai, Linte, MICCAI 2024")

logger = logging.getLogger(__name__)

ORACLES = ("true", "noisy")


# -- phase 1: selection --------------------------------------------------------------------------


def forget_rate(epoch_index: int, noise_rate: float, ramp_epochs: int, exponent: float = 1.0) -> float:
    """Han et al.'s schedule: ``noise_rate * min((epoch_index / ramp_epochs) ** exponent, 1)``, epoch_index from 0."""
    if not 0.0 <= noise_rate < 1.0:
        raise ValueError(f"the noise-rate estimate must lie in [0, 1), got {noise_rate}")
    if ramp_epochs <= 0:
        return float(noise_rate)
    return float(noise_rate) * min((epoch_index / ramp_epochs) ** exponent, 1.0)


def keep_count(n: int, rate: float) -> int:
    """Samples kept from n at forget rate ``rate`` (co-teaching's ``int((1 - rate) n)``), at least one."""
    return max(1, int((1.0 - rate) * n)) if n else 0


def select_clean(losses, vog, rate: float, mix_ratio: float = 0.0) -> np.ndarray:
    """Positions a network trusts: small-loss picks plus a ``mix_ratio`` share of the kept count by highest VoG."""
    losses = np.asarray(losses, dtype=np.float64)
    if not 0.0 <= mix_ratio <= 1.0:
        raise ValueError(f"mix_ratio must lie in [0, 1], got {mix_ratio}")
    keep = keep_count(len(losses), rate)
    by_loss = np.argsort(losses, kind="stable")
    n_vog = int(round(mix_ratio * keep))
    small = by_loss[:keep - n_vog]
    if n_vog == 0:
        return small
    rest = by_loss[keep - n_vog:]  # in small-loss order, so equal VoG falls back to small loss
    vog_rest = np.asarray(vog, dtype=np.float64)[rest]
    return np.concatenate([small, rest[np.argsort(-vog_rest, kind="stable")[:n_vog]]])


def label_row_gradients(features: torch.Tensor, probabilities: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """d CE / d W[y] = (p_y - 1) h for every sample: the gradient of the final-layer row of its given label."""
    p_label = probabilities.gather(1, labels.reshape(-1, 1).long())
    return (p_label - 1.0) * features


class VoGTracker:
    """Per-sample label-row gradients of the last ``window`` epochs; VoG = mean over dims of their std over epochs."""

    def __init__(self, ids, dim: int, window: int = 5):
        if window < 2:
            raise ValueError(f"VoG needs a window of at least 2 epochs, got {window}")
        ids = np.asarray(ids, dtype=np.int64)
        self.row = {int(i): r for r, i in enumerate(ids)}
        self.window = int(window)
        self.gradients = torch.zeros(self.window, len(ids), dim)
        self.seen = torch.zeros(self.window, len(ids), dtype=torch.bool)
        self._slot = -1

    def start_epoch(self, epoch: int) -> None:
        self._slot = epoch % self.window
        self.seen[self._slot] = False

    def record(self, ids, gradients: torch.Tensor) -> None:
        rows = torch.as_tensor([self.row[int(i)] for i in ids])
        self.gradients[self._slot, rows] = gradients.detach().float().cpu()
        self.seen[self._slot, rows] = True

    def scores(self, ids) -> np.ndarray:
        """VoG of each id; 0 where fewer than 2 epochs were recorded."""
        rows = torch.as_tensor([self.row[int(i)] for i in ids])
        grads, seen = self.gradients[:, rows], self.seen[:, rows].float()  # [W, M, d], [W, M]
        count = seen.sum(0)  # [M]
        mean = (grads * seen[..., None]).sum(0) / count.clamp_min(1)[:, None]
        variance = (((grads - mean) ** 2) * seen[..., None]).sum(0) / count.clamp_min(1)[:, None]
        vog = variance.sqrt().mean(1)
        return torch.where(count >= 2, vog, torch.zeros_like(vog)).numpy()

    def share_epoch(self) -> None:
        """Under ``torchrun``: pool this epoch's records of every rank (each rank recorded its own batches), so
        every rank holds them all; a sample recorded on several ranks (the sampler's padding) keeps their mean."""
        if not is_distributed():
            return
        seen = all_reduce(self.seen[self._slot].to(torch.float32))
        total = all_reduce(self.gradients[self._slot] * self.seen[self._slot, :, None])
        self.gradients[self._slot] = total / seen.clamp_min(1)[:, None]
        self.seen[self._slot] = seen > 0

    def state_dict(self) -> dict:
        return {"gradients": self.gradients.clone(), "seen": self.seen.clone()}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["gradients"].shape) != tuple(self.gradients.shape):
            raise ValueError(f"VoG history of shape {tuple(state['gradients'].shape)} saved, this run keeps "
                             f"{tuple(self.gradients.shape)} (window, samples, features)")
        self.gradients.copy_(state["gradients"])
        self.seen.copy_(state["seen"])


# -- phase 2: relabelling ---------------------------------------------------------------------------


def resolve_budget(budget, n: int) -> int:
    """A share of n (float in (0, 1)) or a count."""
    value = int(round(budget * n)) if isinstance(budget, float) and 0 < budget < 1 else int(budget)
    if value < 0:
        raise ValueError(f"the relabelling budget must be >= 0, got {budget}")
    return value


def select_for_relabelling(entropies, candidates, budget: int) -> np.ndarray:
    """The ``budget`` candidate positions of highest entropy (fewer if fewer candidates remain)."""
    entropies = np.asarray(entropies, dtype=np.float64)
    positions = np.flatnonzero(np.asarray(candidates, dtype=bool))
    return positions[np.argsort(-entropies[positions], kind="stable")[:budget]]


def relabel(labels, selected, oracle_labels) -> tuple[np.ndarray, int]:
    """Labels with the oracle's answers at ``selected``, and how many of them changed."""
    labels = np.asarray(labels, dtype=np.int64).copy()
    answers = np.asarray(oracle_labels, dtype=np.int64)
    changed = int((labels[selected] != answers).sum())
    labels[selected] = answers
    return labels, changed


def make_oracle(kind: str) -> Callable[[list[dict]], list[int]]:
    """The simulated expert: ``true`` answers the recorded true label; ``noisy`` repeats the given one (a control)."""
    if kind not in ORACLES:
        raise ValueError(f"oracle must be one of {ORACLES}, got {kind!r}")
    if kind == "true":
        return lambda items: [int(it.get("true_label", it["label"])) for it in items]
    return lambda items: [int(it["label"]) for it in items]


def clean_recall_by_class(kept_mask, given, true, num_classes: int) -> dict[int, float | None]:
    """For each true class: the share of its correctly labelled samples that were kept."""
    kept_mask, given, true = (np.asarray(a) for a in (kept_mask, given, true))
    clean = given == true
    return {k: float(kept_mask[clean & (true == k)].mean()) if (clean & (true == k)).any() else None
            for k in range(num_classes)}


# -- the engine wiring ------------------------------------------------------------------------------------


def _forward_stats(final: FinalLayer, images: torch.Tensor, labels: torch.Tensor):
    """Per-sample losses, features and probabilities in train mode, BatchNorm buffers left untouched.

    The network runs on copies of its buffers, so the trainer's own forward then updates the
    running statistics once, as in plain training.
    """
    network = final.network
    state = {**dict(network.named_parameters()), **{name: b.clone() for name, b in network.named_buffers()}}
    with torch.no_grad():
        features, logits = final(images, state=state)
        losses = nn.functional.cross_entropy(logits, labels, reduction="none")
    return losses, features, torch.softmax(logits, 1)


def _subset(batch: dict, positions: torch.Tensor) -> dict:
    size = len(batch["label"])
    chosen = positions.tolist()
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value) and value.ndim and value.shape[0] == size:
            out[key] = value[positions.to(value.device)]
        elif isinstance(value, (list, tuple)) and len(value) == size:
            out[key] = [value[p] for p in chosen]
        else:
            out[key] = value
    return out


class ALRHandler:
    """Phase 1 for ``phase1_epochs`` epochs, then ``rounds`` relabelling rounds sharing the remaining epochs.

    ``peer_network`` is the second co-teaching network (the trainer's is the first, the one
    that is checkpointed and evaluated). Training items are relabelled in place. Writes
    ``alr_summary.json`` into ``output_dir``. A :class:`~robustmri.engine.training_state.Resumable`
    handler: its state is put back when the run starts, after the peer's optimiser is built.
    """

    def __init__(self, peer_network: nn.Module, train_data: list[dict], val_data: list[dict], output_dir: str,
                 noise_rate: float = 0.2, ramp_epochs: int = 10, exponent: float = 1.0, mix_ratio: float = 0.2,
                 vog_window: int = 5, phase1_epochs: int = 10, rounds: int = 2, budget=0.05, oracle: str = "true",
                 batches: Callable[[list[int]], dict] | None = None, batch_size: int = 32, num_classes: int = 3, seed: int = 0):
        forget_rate(0, noise_rate, ramp_epochs)  # validate now
        select_clean(np.zeros(2), np.zeros(2), 0.0, mix_ratio)
        if not train_data:
            raise ValueError("co-teaching needs training data")
        self.peer, self.train_data, self.val_data, self.output_dir = peer_network, train_data, val_data, output_dir
        self.noise_rate, self.ramp_epochs, self.exponent = float(noise_rate), int(ramp_epochs), float(exponent)
        self.mix_ratio, self.vog_window = float(mix_ratio), int(vog_window)
        self.phase1_epochs, self.rounds = int(phase1_epochs), int(rounds)
        self.budget = resolve_budget(budget, len(train_data))
        self.oracle, self.oracle_kind = make_oracle(oracle), oracle
        self.batches, self.batch_size, self.num_classes = batches, int(batch_size), int(num_classes)
        self.rng = np.random.default_rng(seed)
        self.position = {int(it["id"]): p for p, it in enumerate(train_data)}
        self.kept = np.zeros(len(train_data), dtype=bool)
        self.relabelled = np.zeros(len(train_data), dtype=bool)
        self._chosen_this_epoch = np.zeros(len(train_data), dtype=bool)
        self._pool_queue: list[int] = []
        self.peer_optimizer = None
        self.final: dict[str, FinalLayer] = {}
        self.vog: dict[str, VoGTracker] = {}
        self.epochs_log: list[dict] = []
        self.rounds_log: list[dict] = []
        self.round_epochs = 0
        self._kept_report: dict | None = None
        self._losses: list[float] = []
        self._pending: dict | None = None  # a resumed run's state, put back once the peer's optimiser exists

    # -- set-up --
    def attach(self, engine: Engine) -> None:
        max_epochs = engine.state.max_epochs
        if max_epochs is not None:
            if self.phase1_epochs >= max_epochs and self.rounds > 0:
                raise ValueError(f"co-teaching: phase 1 ({self.phase1_epochs} epochs) leaves no epoch of the "
                                 f"{max_epochs} for {self.rounds} relabelling rounds")
            self.round_epochs = (max_epochs - self.phase1_epochs) // max(1, self.rounds) if self.rounds else 0
            if self.rounds and self.round_epochs < 1:
                raise ValueError(f"co-teaching: {max_epochs - self.phase1_epochs} epochs after phase 1 cannot hold "
                                 f"{self.rounds} relabelling rounds")
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_STARTED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _start(self, engine: Engine) -> None:
        device = next(engine.network.parameters()).device
        self.peer.to(device)
        broadcast_module(self.peer)  # under torchrun every rank starts from rank 0's peer, as DDP does for the main
        optimiser = engine.optimizer
        accepted = inspect.signature(type(optimiser)).parameters  # AdamW's defaults hold an option it does not take
        self.peer_optimizer = type(optimiser)(self.peer.parameters(),
                                              **{k: v for k, v in optimiser.defaults.items() if k in accepted})
        self.final = {"main": FinalLayer(engine.network), "peer": FinalLayer(self.peer)}
        dim = self.final["main"].layer.in_features
        ids = [int(it["id"]) for it in self.train_data]
        self.vog = {"main": VoGTracker(ids, dim, self.vog_window), "peer": VoGTracker(ids, dim, self.vog_window)}
        if self._pending is not None:
            self._restore(self._pending)
            self._pending = None
        logger.info("ALR: co-teaching for %d epochs (forget rate to %.3g over %d epochs, VoG mix %.2f), then %d "
                    "relabelling rounds of %d samples, %d epochs each", self.phase1_epochs, self.noise_rate,
                    self.ramp_epochs, self.mix_ratio, self.rounds, self.budget, self.round_epochs)

    # -- resuming (robustmri.engine.training_state.Resumable) --
    def training_state(self) -> dict:
        """Peer network and optimiser, VoG histories, kept and relabelled sets, every training label (by id),
        the pool's generator and queue, and the records so far."""
        return {"peer": self.peer.state_dict(), "peer_optimizer": self.peer_optimizer.state_dict(),
                "vog": {name: tracker.state_dict() for name, tracker in self.vog.items()},
                "ids": torch.as_tensor([int(it["id"]) for it in self.train_data], dtype=torch.long),
                "labels": torch.as_tensor([int(it["label"]) for it in self.train_data], dtype=torch.long),
                "kept": torch.from_numpy(self.kept.copy()), "relabelled": torch.from_numpy(self.relabelled.copy()),
                "rng": self.rng.bit_generator.state, "pool_queue": [int(p) for p in self._pool_queue],
                "epochs_log": copy.deepcopy(self.epochs_log), "rounds_log": copy.deepcopy(self.rounds_log),
                "kept_report": copy.deepcopy(self._kept_report)}

    def load_training_state(self, state: dict) -> None:
        """Put ``state`` back now if the run has started, else when it starts (the trainer restores first)."""
        if self.peer_optimizer is None:
            self._pending = state
        else:
            self._restore(state)

    def _restore(self, state: dict) -> None:
        ids = [int(it["id"]) for it in self.train_data]
        if state["ids"].tolist() != ids:
            raise ValueError("ALR: the saved state was written for other training samples: resume with the data "
                             "that wrote it")
        self.peer.load_state_dict(state["peer"])
        self.peer_optimizer.load_state_dict(state["peer_optimizer"])
        for name, tracker in self.vog.items():
            tracker.load_state_dict(state["vog"][name])
        for item, label in zip(self.train_data, state["labels"].tolist()):
            item["label"] = int(label)  # the relabelled samples' new labels
        self.kept = state["kept"].numpy().astype(bool).copy()
        self.relabelled = state["relabelled"].numpy().astype(bool).copy()
        self.rng.bit_generator.state = state["rng"]
        self._pool_queue = [int(p) for p in state["pool_queue"]]
        self.epochs_log = copy.deepcopy(list(state["epochs_log"]))
        self.rounds_log = copy.deepcopy(list(state["rounds_log"]))
        self._kept_report = copy.deepcopy(state["kept_report"])

    def in_phase1(self, epoch: int) -> bool:
        return epoch <= self.phase1_epochs

    def _epoch_started(self, engine: Engine) -> None:
        self._chosen_this_epoch[:] = False
        self._losses = []
        for tracker in self.vog.values():
            tracker.start_epoch(engine.state.epoch)

    # -- every iteration --
    def __call__(self, engine: Engine) -> None:
        if self.in_phase1(engine.state.epoch):
            self._coteach(engine)
        else:
            engine.state.batch = self._pool_batch(len(engine.state.batch["label"]))

    def _coteach(self, engine: Engine) -> None:
        batch, network = engine.state.batch, engine.network
        device = next(network.parameters()).device
        images = torch.as_tensor(batch["image"]).to(device)
        labels = torch.as_tensor(batch["label"]).to(device).long().reshape(-1)
        ids = torch.as_tensor(batch["id"]).reshape(-1).tolist()
        network.train()
        self.peer.train()
        rate = forget_rate(engine.state.epoch - 1, self.noise_rate, self.ramp_epochs, self.exponent)
        chosen = {}
        for name in ("main", "peer"):
            with full_precision(network):  # selection statistics in float32 whatever the training precision
                losses, features, probabilities = _forward_stats(self.final[name], images, labels)
            self.vog[name].record(ids, label_row_gradients(features, probabilities, labels))
            chosen[name] = select_clean(losses.cpu().numpy(), self.vog[name].scores(ids), rate, self.mix_ratio)
        # the peer learns from what the main network trusts ...
        for_peer = torch.as_tensor(chosen["main"], device=device)
        self.peer_optimizer.zero_grad(set_to_none=True)
        peer_loss = nn.functional.cross_entropy(self.peer(images[for_peer]), labels[for_peer])
        peer_loss.backward()
        average_gradients(self.peer.parameters())  # under torchrun: the ranks' batches together, as DDP does
        self.peer_optimizer.step()
        self._losses.append(float(peer_loss.detach()))
        # ... and the trainer teaches the main network what the peer trusts
        for_main = chosen["peer"]
        self._chosen_this_epoch[[self.position[ids[p]] for p in for_main]] = True
        engine.state.batch = _subset(batch, torch.as_tensor(for_main))

    def _pool_batch(self, size: int) -> dict:
        """The next ``size`` pool samples of this rank: its share of the next ``ranks x size`` of the pool order."""
        pool = np.flatnonzero(self.kept | self.relabelled)
        if len(pool) == 0:
            raise RuntimeError("co-teaching kept no training sample: nothing to fine-tune on")
        ranks, this = world_size(), rank()
        if len(self._pool_queue) < size * ranks:
            self._pool_queue += self.rng.permutation(pool).tolist()
        step, self._pool_queue = self._pool_queue[:size * ranks], self._pool_queue[size * ranks:]
        low, high = len(step) * this // ranks, len(step) * (this + 1) // ranks
        positions = step[low:high]
        if not positions:
            raise RuntimeError(f"ALR: a pool of {len(pool)} samples cannot give each of {ranks} ranks a batch")
        if self.batches is not None:  # the trainer's own data path, augmentation included
            return self.batches(positions)
        items = [{"image": self.train_data[p]["image"], "label": int(self.train_data[p]["label"]),
                  "id": int(self.train_data[p]["id"])} for p in positions]
        return list_data_collate(items)

    # -- epoch ends and rounds --
    def _share_epoch(self, epoch: int) -> None:
        """Under ``torchrun``: rank 0's peer on every rank, and every rank's records of this epoch pooled."""
        if not is_distributed():
            return
        broadcast_module(self.peer)
        if self.in_phase1(epoch):
            for tracker in self.vog.values():
                tracker.share_epoch()
            chosen = torch.from_numpy(self._chosen_this_epoch.astype(np.int32))
            self._chosen_this_epoch = all_reduce(chosen, torch.distributed.ReduceOp.MAX).numpy().astype(bool)
            self._losses = gather_lists(self._losses)

    def _epoch_completed(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        self._share_epoch(epoch)
        entry = {"epoch": epoch, "phase": 1 if self.in_phase1(epoch) else 2}
        if self.in_phase1(epoch):
            entry.update({"forget_rate": forget_rate(epoch - 1, self.noise_rate, self.ramp_epochs, self.exponent),
                          "selected_for_main": int(self._chosen_this_epoch.sum()),
                          "peer_loss": float(np.mean(self._losses)) if self._losses else None,
                          **self._selection_quality(self._chosen_this_epoch)})
        entry.update(self._validation_metrics(engine.network))
        self.epochs_log.append(entry)
        if epoch == self.phase1_epochs:
            self.kept = self._chosen_this_epoch.copy()
            self._kept_report = {"n_kept": int(self.kept.sum()), **self._selection_quality(self.kept)}
            self._pool_queue = []
        after_phase1 = epoch - self.phase1_epochs
        if self.rounds and after_phase1 >= 0 and after_phase1 % max(1, self.round_epochs) == 0 \
                and len(self.rounds_log) < self.rounds:
            self._relabel_round(engine)

    def _relabel_round(self, engine: Engine) -> None:
        """Rank 0 picks the samples (every rank holds its network after the epoch-end broadcast); all relabel them."""
        candidates = ~(self.kept | self.relabelled)
        selected = None
        if is_main_process():
            network = unwrap(engine.network)
            device = next(network.parameters()).device
            logits, _, _ = predict_items(network, self.train_data, self.batch_size, device)
            entropies = entropy(torch.softmax(logits, 1)).numpy()
            selected = select_for_relabelling(entropies, candidates, self.budget).tolist()
        selected = np.asarray(broadcast_object(selected), dtype=np.int64)
        given = np.array([int(it["label"]) for it in self.train_data])
        answers = self.oracle([self.train_data[p] for p in selected])
        new_labels, changed = relabel(given, selected, answers)
        for p in selected:
            self.train_data[p]["label"] = int(new_labels[p])
        self.relabelled[selected] = True
        record = {"round": len(self.rounds_log) + 1, "epoch": engine.state.epoch, "oracle": self.oracle_kind,
                  "candidates": int(candidates.sum()), "relabelled": int(len(selected)), "labels_changed": changed,
                  "total_relabelled": int(self.relabelled.sum()), "pool": int((self.kept | self.relabelled).sum())}
        if has_label_record(self.train_data):
            truth = true_labels(self.train_data)
            record["wrong_labels_before"] = int((given != truth).sum())
            record["wrong_labels_after"] = int((new_labels != truth).sum())
        self.rounds_log.append(record)
        self._pool_queue = []
        logger.info("ALR round %d: %d samples relabelled (%d labels changed), pool %d", record["round"],
                    record["relabelled"], changed, record["pool"])

    def _selection_quality(self, mask: np.ndarray) -> dict:
        """How clean a selection is, from the recorded true labels (evaluation only)."""
        if not has_label_record(self.train_data) or not mask.any():
            return {}
        given = np.array([int(it["label"]) for it in self.train_data])
        truth = true_labels(self.train_data)
        recall = clean_recall_by_class(mask, given, truth, self.num_classes)
        return {"precision_clean": float((given[mask] == truth[mask]).mean()),
                "clean_recall_by_class": {str(k): v for k, v in recall.items()}}

    def _validation_metrics(self, network: nn.Module) -> dict:
        """On the whole validation set, on every rank (each holds rank 0's network after the epoch-end broadcast)."""
        if not self.val_data:
            return {}
        network = unwrap(network)
        device = next(network.parameters()).device
        logits, labels, _ = predict_items(network, self.val_data, self.batch_size, device)
        report = classification_report(labels.numpy(), torch.softmax(logits, 1).numpy(),
                                       [str(k) for k in range(self.num_classes)])
        return {"val_balanced_accuracy": report["balanced_accuracy"], "val_macro_f1": report["macro_f1"]}

    def _write(self, engine: Engine) -> None:
        if not is_main_process():  # under torchrun every rank holds the same records; rank 0 writes them
            return
        write_json(os.path.join(self.output_dir, METHOD.summary), {
            "method": "ALR (co-teaching + VoG, active relabelling)", "noise_rate_estimate": self.noise_rate,
            "mix_ratio": self.mix_ratio, "vog_window": self.vog_window, "phase1_epochs": self.phase1_epochs,
            "round_epochs": self.round_epochs, "budget": self.budget, "oracle": self.oracle_kind,
            "kept": self._kept_report, "rounds": self.rounds_log, "epochs": self.epochs_log})
