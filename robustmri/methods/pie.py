"""Pruning-identified exemplars (Hooker et al. 2019; "Attend Who is Weak", WACV 2023).

Rare and atypical samples are the first a network forgets when it loses capacity. After
epoch ``epoch`` a copy of the trained network is pruned globally by weight magnitude
(L1, over every convolution and linear weight) to sparsity s and fine-tuned briefly with
the pruning mask fixed; the hard samples (PIEs) are the training samples on which the
pruned and the dense network predict different classes. Training then continues with
those samples' loss weighted by ``weight`` (through
:class:`robustmri.engine.influence_step.SampleWeightedCrossEntropy`).

The fine-tune only repairs what pruning removed: at sparsity 0 nothing is removed, none is
run, the two networks are the same and the hard set is empty.

Under ``torchrun`` (:mod:`robustmri.engine.distributed`) every rank takes rank 0's network
(weights and BatchNorm statistics); rank 0 alone prunes and fine-tunes (the fine-tune is
training, whose result would depend on each rank's random state) and broadcasts the pruned
network (kept weights, mask, BatchNorm statistics), so it is the same on every rank. Each
rank then predicts its contiguous shard of the training set
(:func:`robustmri.influence.distributed.shard_bounds`) with both networks and the predictions
are all-gathered in sample order: the hard set and the weights are the same on every rank
and as in one process. Rank 0 alone writes the files.
"""

from __future__ import annotations

import copy
import csv
import logging
import os

import numpy as np
import torch
from ignite.engine import Engine
from torch import nn
from torch.nn.utils import prune

from robustmri.data.batching import item_batches
from robustmri.data.label_noise import has_label_record, true_labels
from robustmri.engine.losses import SampleWeightedCrossEntropy
from robustmri.engine.distributed import broadcast_module, is_distributed, is_main_process, rank, world_size
from robustmri.engine.once import OnceAfterEpoch
from robustmri.engine.predictions import predict_items
from robustmri.influence.adapter import unwrap
from robustmri.influence.distributed import gather_rows, shard_bounds
from robustmri.methods import Method
from robustmri.outputs import write_json

METHOD = Method(name="pie", title="PIE: pruning-identified hard samples, up-weighted", order=7,
                families=("noisy labels",), summary="pie_summary.json",
                reference="Hooker et al. 2019; \"Attend Who is Weak\", WACV 2023")

logger = logging.getLogger(__name__)


def prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def pruned_copy(model: nn.Module, sparsity: float) -> nn.Module:
    """A copy with the ``sparsity`` share of its conv/linear weights of smallest |w| (over all layers) set to 0.

    The mask stays attached (``torch.nn.utils.prune``), so fine-tuning keeps those weights at 0.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    pruned = copy.deepcopy(model)
    if sparsity > 0:  # torch's pruning flattens weights with .view: a channels_last network is made contiguous
        pruned.to(memory_format=torch.contiguous_format)
        prune.global_unstructured(prunable_weights(pruned), pruning_method=prune.L1Unstructured, amount=float(sparsity))
    return pruned


def weight_sparsity(model: nn.Module) -> float:
    """Share of exactly-zero conv/linear weights."""
    weights = [getattr(m, name).detach() for m, name in prunable_weights(model)]
    return float(sum((w == 0).sum().item() for w in weights) / sum(w.numel() for w in weights))


def finetune(model: nn.Module, items: list[dict], steps: int, lr: float, batch_size: int = 32, seed: int = 0,
             device="cpu") -> None:
    """``steps`` Adam steps of plain cross-entropy on shuffled training items (train mode)."""
    if steps <= 0:
        return
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    rng = np.random.default_rng(seed)
    model.train()
    done = 0
    while done < steps:
        for batch in item_batches(items, batch_size, rng.permutation(len(items))):
            if len(batch["label"]) < 2:
                continue  # BatchNorm needs more than one sample in train mode
            optimiser.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(batch["image"].to(device)), batch["label"].to(device)).backward()
            optimiser.step()
            done += 1
            if done >= steps:
                break


def refresh_pruned_weights(model: nn.Module) -> None:
    """Recompute every pruned ``weight`` from its ``weight_orig`` and mask (what the pruning hook does before a
    forward pass), e.g. after both were overwritten by a broadcast."""
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                hook(module, None)


def _predicted_classes(model: nn.Module, items: list[dict], batch_size: int, device, positions=None):
    """Predicted classes, given labels and ids (each [N] int64) of ``items`` (or of ``positions`` in it)."""
    logits, labels, ids = predict_items(model, items, batch_size, device, positions)
    return (logits.argmax(1) if len(labels) else torch.zeros(0, dtype=torch.long)), labels, ids


def find_hard_samples(model: nn.Module, items: list[dict], sparsity: float, finetune_steps: int = 50,
                      lr: float = 1e-3, batch_size: int = 64, seed: int = 0, device="cpu") -> dict:
    """Dense and pruned predictions on ``items`` and the positions where they disagree.

    Under a process group it is collective (module doc): rank 0's network, pruned and
    fine-tuned on rank 0 and broadcast, each rank predicting its shard, the predictions
    all-gathered in item order; every rank returns the whole result.
    """
    model = unwrap(model)  # the network itself: the shards' forward passes differ in number
    distributed = is_distributed()
    if distributed:
        broadcast_module(model)
    pruned = pruned_copy(model, sparsity)
    if sparsity > 0:
        if is_main_process():
            finetune(pruned, items, finetune_steps, lr, batch_size, seed, device)
        if distributed:
            broadcast_module(pruned)  # weight_orig, the masks and the BatchNorm statistics rank 0 fine-tuned
            refresh_pruned_weights(pruned)
    positions = range(*shard_bounds(len(items), rank(), world_size())) if distributed else None
    dense, labels, ids = _predicted_classes(model, items, batch_size, device, positions)
    sparse, _, _ = _predicted_classes(pruned, items, batch_size, device, positions)
    if distributed:
        dense, sparse, labels, ids = (gather_rows(values) for values in (dense, sparse, labels, ids))
    dense, sparse = dense.numpy(), sparse.numpy()
    return {"hard": np.flatnonzero(dense != sparse), "dense_prediction": dense, "pruned_prediction": sparse,
            "labels": labels.numpy(), "ids": ids.numpy(), "sparsity": weight_sparsity(pruned)}


class PIEHandler(OnceAfterEpoch):
    """After epoch ``epoch``: find the pruning-identified hard samples and up-weight their loss by ``weight``."""

    method = "PIE"

    def __init__(self, loss: SampleWeightedCrossEntropy, epoch: int, train_data: list[dict], output_dir: str,
                 sparsity: float = 0.3, finetune_steps: int = 50, finetune_lr: float = 1e-3, weight: float = 2.0,
                 batch_size: int = 64, seed: int = 0):
        if not isinstance(loss, SampleWeightedCrossEntropy):
            raise TypeError("pie needs the trainer's loss to be robustmri.engine.losses.SampleWeightedCrossEntropy")
        if weight < 0:
            raise ValueError(f"the hard-sample weight must be >= 0, got {weight}")
        pruned_copy(nn.Linear(1, 1), sparsity)  # validate now, not after ``epoch`` epochs
        super().__init__(epoch)
        self.loss, self.train_data, self.output_dir = loss, train_data, output_dir
        self.sparsity, self.finetune_steps, self.finetune_lr = float(sparsity), int(finetune_steps), float(finetune_lr)
        self.weight, self.batch_size, self.seed = float(weight), int(batch_size), int(seed)
        self.result: dict | None = None

    def run(self, engine: Engine, network: nn.Module, device: torch.device) -> None:
        result = find_hard_samples(network, self.train_data, self.sparsity, self.finetune_steps, self.finetune_lr,
                                   self.batch_size, self.seed, device)
        weights = torch.ones(len(result["ids"]))
        weights[torch.as_tensor(result["hard"], dtype=torch.long)] = self.weight
        self.loss.set_weights(torch.as_tensor(result["ids"]), weights)
        self.result = result
        self._write(result)
        logger.info("PIE after epoch %d: %d of %d training samples hard at sparsity %.2f (weight %g)", self.epoch,
                    len(result["hard"]), len(result["ids"]), result["sparsity"], self.weight)

    def _write(self, result: dict) -> None:
        if not is_main_process():  # under torchrun every rank found the same samples; rank 0 writes them
            return
        os.makedirs(self.output_dir, exist_ok=True)
        hard = result["hard"]
        with open(os.path.join(self.output_dir, "pie_hard_samples.csv"), "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "file", "label", "dense_prediction", "pruned_prediction"])
            for p in hard:
                writer.writerow([int(result["ids"][p]), self.train_data[p].get("file", ""), int(result["labels"][p]),
                                 int(result["dense_prediction"][p]), int(result["pruned_prediction"][p])])
        labels = result["labels"]
        summary = {"method": "PIE", "epoch": self.epoch, "requested_sparsity": self.sparsity,
                   "achieved_sparsity": result["sparsity"], "finetune_steps": self.finetune_steps,
                   "weight": self.weight, "n_train": int(len(labels)), "n_hard": int(len(hard)),
                   "hard_by_label": {str(k): int((labels[hard] == k).sum()) for k in np.unique(labels)}}
        if has_label_record(self.train_data):  # evaluation only
            wrong = true_labels(self.train_data) != labels
            summary["wrong_label_share_in_hard"] = float(wrong[hard].mean()) if len(hard) else None
            summary["wrong_label_share_overall"] = float(wrong.mean())
        write_json(os.path.join(self.output_dir, METHOD.summary), summary)
