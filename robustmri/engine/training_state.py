"""A training run's whole state at an epoch boundary, to branch from or resume at.

Runs that share their first epochs (naive training, ISR and ISP all train plainly up to
T_pre) can train that prefix once: :class:`SaveTrainingState` writes the state when epoch
``epoch`` completes (and can end the run there); :class:`LoadTrainingState` puts it back
into a new trainer when it starts, so the new run goes on from epoch ``epoch + 1`` exactly
as an uninterrupted run would: same weights, optimiser moments, learning-rate schedule, weight average,
iteration count and random-number streams (the data path's randomness is a function of
seed, epoch and sample, see :mod:`robustmri.data.in_memory`). A step scheduled after that
very epoch (:class:`robustmri.engine.once.OnceAfterEpoch`, e.g. the influence step) runs
when the resumed trainer starts.

The file is written atomically (write, then rename): an interrupted write never leaves a
half state behind.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from ignite.engine import Engine, Events

from robustmri.engine.ema import WeightAverage


def _attached(engine: Engine, match):
    """The first handler object on ``engine`` (or the owner of a bound-method handler) for which ``match`` holds."""
    for handlers in engine._event_handlers.values():
        for handler, *_ in handlers:
            owner = getattr(handler, "__self__", handler)
            if match(owner):
                return owner
    return None


def _scheduler(engine: Engine):
    """The learning-rate scheduler stepped by a MONAI ``LrScheduleHandler`` on this engine, if any."""
    owner = _attached(engine, lambda h: type(h).__name__ == "LrScheduleHandler")
    return None if owner is None else owner.lr_scheduler


def attached_weight_average(engine: Engine) -> WeightAverage | None:
    """The enabled :class:`~robustmri.engine.ema.WeightAverage` updated by ``engine``, if any."""
    return _attached(engine, lambda h: isinstance(h, WeightAverage) and h.enabled)


def training_state(engine: Engine) -> dict:
    """Model, optimiser, scheduler, weight average, epoch and iteration, and the RNG states of torch, numpy and random."""
    scheduler = _scheduler(engine)
    average = attached_weight_average(engine)
    return {"model": engine.network.state_dict(), "optimizer": engine.optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict() if scheduler is not None else None,
            "ema": average.state_dict() if average is not None else None,
            "epoch": int(engine.state.epoch), "iteration": int(engine.state.iteration),
            "rng": {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "random": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}


def _numpy_state() -> dict:
    """numpy's RNG state as tensors and plain numbers, so the file loads with ``weights_only=True``."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def save_training_state(engine: Engine, path: str) -> None:
    """Write :func:`training_state` to ``path`` atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = f"{path}.partial"
    torch.save(training_state(engine), partial)
    os.replace(partial, path)


def restore_training_state(engine: Engine, state: dict) -> None:
    engine.network.load_state_dict(state["model"])
    engine.optimizer.load_state_dict(state["optimizer"])
    scheduler = _scheduler(engine)
    if (scheduler is None) != (state["lr_scheduler"] is None):
        raise ValueError("the saved state and this trainer disagree on having a learning-rate schedule")
    if scheduler is not None:
        scheduler.load_state_dict(state["lr_scheduler"])
        for group, lr in zip(engine.optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
    average = attached_weight_average(engine)
    if (average is None) != (state.get("ema") is None):
        raise ValueError("the saved state and this trainer disagree on keeping a weight average (ema_decay)")
    if average is not None:
        average.load_state_dict(state["ema"])
    engine.state.epoch, engine.state.iteration = state["epoch"], state["iteration"]
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    numpy_state = rng["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached"]))
    random.setstate(rng["random"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


class SaveTrainingState:
    """Trainer handler: save the training state when epoch ``epoch`` completes; ``stop``: end the run there."""

    def __init__(self, path: str, epoch: int, stop: bool = False):
        self.path, self.epoch, self.stop = path, int(epoch), bool(stop)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(once=self.epoch), self)

    def __call__(self, engine: Engine) -> None:
        save_training_state(engine, self.path)
        if self.stop:
            engine.terminate()


class LoadTrainingState:
    """Trainer handler: restore the state saved at ``path`` when the run starts (attach it first)."""

    def __init__(self, path: str):
        self.path = path

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{self.path}: no saved training state to start from")
        state = torch.load(self.path, map_location=next(engine.network.parameters()).device, weights_only=True)
        if state["epoch"] >= engine.state.max_epochs:
            raise ValueError(f"{self.path}: saved after epoch {state['epoch']}, not before the last epoch "
                             f"({engine.state.max_epochs})")
        restore_training_state(engine, state)
