"""The training history: mean training loss and validation metrics per epoch, as JSON and a plot."""

from __future__ import annotations

import os

import numpy as np
from ignite.engine import Engine, Events

from robustmri.engine.distributed import is_main_process
from robustmri.outputs import plt, save_figure, write_json


class TrainingHistoryHandler:
    """Records the mean training loss and the validation metrics per epoch; writes
    ``history.json`` and ``training_curves.png`` into ``output_dir`` as training goes."""

    def __init__(self, output_dir: str, evaluator: Engine | None = None, loss_key: str = "loss"):
        self.output_dir = output_dir
        self.evaluator = evaluator
        self.loss_key = loss_key
        self.history: list[dict] = []
        self._losses: list[float] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self._losses.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect_loss)
        # after ValidationHandler (attached earlier) has run the evaluator for this epoch
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._record)

    def training_state(self) -> dict:
        """The epochs recorded so far, for resuming a run (:mod:`robustmri.engine.training_state`)."""
        return {"history": [dict(entry) for entry in self.history]}

    def load_training_state(self, state: dict) -> None:
        self.history = [dict(entry) for entry in state["history"]]

    def _collect_loss(self, engine: Engine) -> None:
        output = engine.state.output
        rows = output if isinstance(output, list) else [output]
        values = [float(r[self.loss_key]) for r in rows if isinstance(r, dict) and self.loss_key in r]
        if values:
            self._losses.append(values[0])

    def _record(self, engine: Engine) -> None:
        entry = {"epoch": engine.state.epoch,
                 "train_loss": float(np.mean(self._losses)) if self._losses else None}
        if self.evaluator is not None:
            entry.update({f"val_{k}" if not k.startswith("val") else k: float(v)
                          for k, v in self.evaluator.state.metrics.items() if np.isscalar(v)})
        self.history.append(entry)
        if not is_main_process():  # every rank records (a resumed run needs it), rank 0 writes
            return
        write_json(os.path.join(self.output_dir, "history.json"), self.history)
        plot_training_curves(self.history, os.path.join(self.output_dir, "training_curves.png"))


def plot_training_curves(history: list[dict], path: str) -> None:
    """Training loss and every validation metric against the epoch."""
    epochs = [h["epoch"] for h in history]
    metric_keys = sorted({k for h in history for k in h if k.startswith("val_")})
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(9, 3.5))
    losses = [h.get("train_loss") for h in history]
    if any(v is not None for v in losses):
        ax_loss.plot(epochs, [np.nan if v is None else v for v in losses], marker="o", ms=3)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss")
    for key in metric_keys:
        ax_val.plot(epochs, [h.get(key, np.nan) for h in history], marker="o", ms=3, label=key)
    ax_val.set(xlabel="epoch", title="validation (clean)")
    if metric_keys:
        ax_val.legend()
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
    save_figure(fig, path)
