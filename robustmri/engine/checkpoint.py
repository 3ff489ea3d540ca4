"""The trained model, written once training has run all its epochs: ``models/model.pt``.

The product's model is the last epoch's weights, averaged (:mod:`robustmri.engine.ema`) when the
recipe keeps an average; the checkpoint-selection study on tuning seeds chose that over the
best-validation epoch (``docs/results.md``). MONAI's ``CheckpointSaver(save_final=True)`` would
also write its file when training fails part-way; a deployable name must never hold a
half-trained model, so this handler writes only on completion of every epoch, atomically
(write, then rename), as a plain ``state_dict`` (what :func:`load_weights` and MONAI's ``CheckpointLoader``
read).
"""

from __future__ import annotations

import logging
import os

import torch
from ignite.engine import Engine, Events
from torch import nn

from robustmri.engine.distributed import is_main_process
from robustmri.engine.model_metadata import metadata_path, read_trained

logger = logging.getLogger(__name__)


class SaveFinalModel:
    """Trainer handler: save ``model``'s state to ``path`` when the trainer completes its last epoch."""

    def __init__(self, model: nn.Module, path: str):
        self.model, self.path = model, path

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.state.epoch < engine.state.max_epochs:  # stopped early (terminate): not a finished model
            logger.info("training stopped after epoch %d of %d: %s not written", engine.state.epoch,
                        engine.state.max_epochs, self.path)
            return
        if not is_main_process():  # under torchrun rank 0 writes
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        partial = f"{self.path}.partial"
        torch.save({k: v.detach().cpu() for k, v in self.model.state_dict().items()}, partial)
        os.replace(partial, self.path)
        logger.info("trained model saved: %s", self.path)


def load_weights(network: torch.nn.Module, path: str, device="cpu") -> torch.nn.Module:
    """Load a state dict saved by the bundle (plain, or wrapped as ``{"model": ...}``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint not found; train first "
                                "(python -m monai.bundle run training --config_file configs/train.json)")
    state = torch.load(path, map_location=device, weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    try:
        network.load_state_dict(state)
    except RuntimeError as err:
        trained = read_trained(path)
        hint = (f"; it was trained with spatial_size {trained['spatial_size']} and network_padding "
                f"{trained['network_padding']} ({metadata_path(path)})" if trained else "")
        raise RuntimeError(f"{path}: checkpoint does not fit the configured network{hint} ({err})") from err
    return network
