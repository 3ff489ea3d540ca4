"""Fit the abstention state when training ends: ``model_abstention.pt`` beside ``model.pt``.

:class:`FitAbstention` runs after :class:`robustmri.engine.checkpoint.SaveFinalModel` has written the
model (attach it after that handler and after :class:`robustmri.engine.model_metadata.ModelMetadataWriter`,
which records the final checkpoint the state is tied to): one no-grad feature pass of the saved weights
over the training and validation splits (:func:`robustmri.abstention.fit.fit_state`). Like the saver it
writes nothing when training stopped early, and under torchrun only rank 0 fits and writes.
"""

from __future__ import annotations

import logging
import os

from ignite.engine import Engine, Events
from torch import nn

from robustmri.abstention.fit import MAHALANOBIS, fit_state, protocol_arrays, save_and_record
from robustmri.abstention.mahalanobis import TARGET_ACCEPTANCE
from robustmri.abstention.scores import score_by_name
from robustmri.engine.distributed import is_main_process
from robustmri.influence.adapter import unwrap

logger = logging.getLogger(__name__)


class FitAbstention:
    """Trainer handler: fit ``checkpoint``'s abstention state on ``data`` when the trainer completes its last epoch.

    ``network`` holds the weights saved to ``checkpoint`` (the bundle's ``@ema.model``, what
    ``SaveFinalModel`` saves); ``data`` is the protocol trained on (``@data``): the score is fitted on its
    ``train_split`` and the threshold accepts ``target_acceptance`` of its ``validation_split``. ``score``: the
    abstention score by name (:data:`robustmri.abstention.scores.SCORES`; the bundle's ``abstention_score``).
    """

    def __init__(self, network: nn.Module, data, checkpoint: str, target_acceptance: float = TARGET_ACCEPTANCE,
                 train_split: str = "train", validation_split: str = "val", score: str = MAHALANOBIS):
        if not 0.0 < float(target_acceptance) <= 1.0:
            raise ValueError(f"abstention target_acceptance must be in (0, 1], got {target_acceptance}")
        self.network, self.data, self.checkpoint = network, data, os.fspath(checkpoint)
        self.target_acceptance = float(target_acceptance)
        self.train_split, self.validation_split = train_split, validation_split
        self.score = score_by_name(score).name  # an unknown name fails when the config is parsed, not after training

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.state.epoch < engine.state.max_epochs:  # stopped early: SaveFinalModel wrote no model
            logger.info("training stopped after epoch %d of %d: no abstention state fitted", engine.state.epoch,
                        engine.state.max_epochs)
            return
        if not is_main_process():  # under torchrun rank 0 fits and writes
            return
        if not os.path.isfile(self.checkpoint):
            raise FileNotFoundError(f"{self.checkpoint}: no trained model to fit the abstention state for (attach "
                                    "FitAbstention after SaveFinalModel)")
        try:
            train_images, train_labels = protocol_arrays(self.data, self.train_split)
            validation_images, _ = protocol_arrays(self.data, self.validation_split)
            state = fit_state(unwrap(self.network), train_images, train_labels, validation_images, self.checkpoint,
                              self.target_acceptance, score=self.score)
        except ValueError as error:  # no validation split, a class without training slices: the model is kept
            logger.error("no abstention state for %s: %s; inference and export refuse a checkpoint without one",
                         os.path.basename(self.checkpoint), error)
            return
        save_and_record(state, self.checkpoint)  # atomic: a reader sees the previous state file or this one
