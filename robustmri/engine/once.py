"""The handler base for a step that runs once, when a given training epoch completes.

ISR and ISP (the influence step), PIE (pruning) and the label audit all act once on the
trainer's own network after epoch ``epoch`` and let training go on; this base attaches them
to a MONAI/ignite trainer and hands them the network and its device.
"""

from __future__ import annotations

import logging

import torch
from ignite.engine import Engine, Events

logger = logging.getLogger(__name__)


class OnceAfterEpoch:
    """Calls :meth:`run` once, when epoch ``epoch`` (1-based) completes.

    Subclasses set ``method`` (the name in log lines) and ``changes_training``: a step that
    changes what is trained on (weights, images) warns when it is scheduled at or after the
    last epoch, since nothing would be trained with the change.
    """

    method = "step"
    changes_training = True

    def __init__(self, epoch: int):
        self.done = False
        self.epoch = int(epoch)
        if self.epoch < 1:
            raise ValueError(f"{self.method}: the epoch to run after must be >= 1, got {epoch}")

    def attach(self, engine: Engine) -> None:
        max_epochs = engine.state.max_epochs
        if self.changes_training and max_epochs is not None and self.epoch >= max_epochs:
            logger.warning("%s: epoch %d is not before the last epoch (%d): the step changes nothing that is "
                           "trained on", self.method, self.epoch, max_epochs)
        engine.add_event_handler(Events.EPOCH_COMPLETED(once=self.epoch), self)
        engine.add_event_handler(Events.STARTED, self._on_resume)

    def _on_resume(self, engine: Engine) -> None:
        """A run resumed right after epoch ``epoch`` (:mod:`robustmri.engine.training_state`) takes the step now."""
        if engine.state.epoch == self.epoch and not self.done:
            self(engine)

    def __call__(self, engine: Engine) -> None:
        network = engine.network
        self.run(engine, network, next(network.parameters()).device)
        self.done = True

    def training_state(self) -> dict:
        """Whether the step has run (:class:`robustmri.engine.training_state.Resumable`); subclasses add theirs."""
        return {"done": self.done}

    def load_training_state(self, state: dict) -> None:
        self.done = bool(state["done"])

    def run(self, engine: Engine, network: torch.nn.Module, device: torch.device) -> None:
        raise NotImplementedError
