"""Losses the methods hand to MONAI's stock ``SupervisedTrainer``."""

from __future__ import annotations

import torch
from ignite.engine import Engine, Events
from torch import nn


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """mean_i(w_i * CE_i); plain cross-entropy when ``weights`` is None."""
    losses = nn.functional.cross_entropy(logits, labels.long().reshape(-1), reduction="none")
    return losses.mean() if weights is None else (weights.to(losses) * losses).mean()


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
        has_ids = isinstance(batch, dict) and "id" in batch
        self._batch_ids = torch.as_tensor(batch["id"]).reshape(-1).long() if has_ids else None

    def set_weights(self, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """Weight ``weights[k]`` for the sample with id ``ids[k]`` from now on; unlisted ids keep weight 1."""
        table = torch.ones(int(ids.max()) + 1)
        table[ids.long()] = weights.float()
        self.weights_by_id = table

    def training_state(self) -> dict:
        """The weight table (None until set), for resuming a run (:mod:`robustmri.engine.training_state`)."""
        return {"weights_by_id": self.weights_by_id}

    def load_training_state(self, state: dict) -> None:
        table = state["weights_by_id"]
        self.weights_by_id = None if table is None else table.detach().cpu().float()

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        weights = None
        if self.weights_by_id is not None:
            if self._batch_ids is None:
                raise RuntimeError("sample weights are set but the batch carries no 'id': "
                                   "attach the loss to the trainer")
            weights = self.weights_by_id[self._batch_ids].to(logits.device)
        return weighted_cross_entropy(logits, labels, weights)
