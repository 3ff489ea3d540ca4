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

:class:`TrainingCheckpoint` is the same state written after every epoch, for resuming a run
that was killed (the bundle's ``resume`` option, ``training_state_path``). Besides the above it
holds the state of every attached handler that keeps some (the :class:`Resumable` protocol:
the influence step's "done" flag, ISR's and PIE's sample weights, ISP's perturbed images, the
training history, AT's random generator, ALR's peer network and relabelled labels, MW-Net's
weight net, PINT's teacher, stability training's noise generator) and the validation's best metric so far, with the
best-model saver's record, so a resumed run ends exactly as an uninterrupted one. It also holds
the precision the run trains in (a resumed run goes on in it rather than deciding again) and
the settings that make the run the one it is (:meth:`ModelMetadataWriter.run_settings
<robustmri.engine.model_metadata.ModelMetadataWriter.run_settings>`): a state that another run
wrote, or one of a run that has finished, is refused in one line (:class:`CannotResume`).
"""

from __future__ import annotations

import logging
import os
import random
from typing import Protocol

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from monai.handlers import CheckpointSaver

from robustmri.engine.distributed import is_main_process
from robustmri.engine.ema import WeightAverage
from robustmri.engine.model_metadata import ModelMetadataWriter
from robustmri.engine.precision import set_precision

logger = logging.getLogger(__name__)


class CannotResume(SystemExit):
    """``resume`` was asked for and the saved state cannot be resumed; the message says why, in one line.

    A ``SystemExit`` (as argparse's usage errors are): it is a refusal to run, not a failure,
    so ``python -m monai.bundle run training ... --resume true`` ends with this line and exit
    status 1 instead of the tracebacks that ignite and MONAI's ``StatsHandler`` write for an
    ``Exception``. Code that runs a workflow itself can catch it by name.
    """

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Resumable(Protocol):
    """A trainer handler with state of its own that a resumed run needs.

    ``training_state()`` returns tensors, plain numbers, strings, lists and dicts (what
    ``torch.load(weights_only=True)`` reads back); ``load_training_state`` puts it back. Checked on
    the class (:func:`is_resumable`), not with ``isinstance``: ignite's metrics answer every attribute.
    """

    def training_state(self) -> dict: ...

    def load_training_state(self, state: dict) -> None: ...


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
    """Model (without a DDP wrapper), optimiser, scheduler, weight average, epoch and iteration, and the RNG
    states of torch, numpy and random."""
    scheduler = _scheduler(engine)
    average = attached_weight_average(engine)
    module = _module(engine)
    return {"model": module.state_dict(), "optimizer": engine.optimizer.state_dict(),
            "precision": getattr(module, "robustmri_precision", None),
            "precision_reason": getattr(module, "robustmri_precision_reason", None),
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


def _module(engine: Engine) -> torch.nn.Module:
    """The trainer's network without a ``DistributedDataParallel`` wrapper: states load with any number of ranks."""
    from robustmri.influence.adapter import unwrap

    return unwrap(engine.network)


def _precision_problem(engine: Engine, state: dict) -> str | None:
    """Why this run cannot go on in the precision ``state`` recorded, or None (it can, or nothing was recorded)."""
    module = _module(engine)
    recorded, current = state.get("precision"), getattr(module, "robustmri_precision", None)
    if recorded is None or current is None or recorded == current:
        return None
    requested = getattr(module, "robustmri_precision_requested", "auto")
    if requested != "auto":
        return (f"it trained in {recorded} and this run asks for precision {requested}: resume with --precision "
                f"auto (or {recorded})")
    if "fp16" in (recorded, current):  # the trainer's amp (fp16's GradScaler) is fixed when the trainer is built
        return f"it trained in {recorded} and this device trains in {current} (fp16 runs under the trainer's amp)"
    return None


def _restore_precision(engine: Engine, state: dict, path: str) -> None:
    """Go on in the precision the saved run trained in (``precision: auto`` decided it then, once)."""
    module = _module(engine)
    recorded, current = state.get("precision"), getattr(module, "robustmri_precision", None)
    if recorded is None or current is None:
        return
    if recorded != current:
        problem = _precision_problem(engine, state)
        if problem is not None:
            raise ValueError(f"{path}: {problem}")
        set_precision(module, recorded, f"recorded in {path} by the run this one continues "
                      f"({state.get('precision_reason')}); here auto would choose {current}")
    logger.info("precision %s, as recorded in %s (%s)", recorded, path, state.get("precision_reason"))


def restore_training_state(engine: Engine, state: dict, path: str = "training state") -> None:
    _module(engine).load_state_dict(state["model"])
    _restore_precision(engine, state, path)
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
        restore_training_state(engine, state, self.path)


#: Handlers of these modules change what is trained on; without the :class:`Resumable` protocol
#: (or ``resume_stateless = True``) a resumed run would silently differ, so resuming refuses them.
METHOD_MODULES = ("robustmri.methods",)


def _owners(engine: Engine) -> list:
    """Every distinct handler object attached to ``engine`` (owners of bound methods), in attachment order."""
    seen, owners = set(), []
    for handlers in engine._event_handlers.values():
        for handler, *_ in handlers:
            owner = getattr(handler, "__self__", handler)
            if id(owner) not in seen:
                seen.add(id(owner))
                owners.append(owner)
    return owners


def _keyed(owners) -> dict[str, object]:
    """``{"ClassName#k": owner}``: the k-th owner of that class, so one config gives the same keys every run."""
    counts: dict[str, int] = {}
    keyed = {}
    for owner in owners:
        name = type(owner).__qualname__
        keyed[f"{name}#{counts.get(name, 0)}"] = owner
        counts[name] = counts.get(name, 0) + 1
    return keyed


def is_resumable(handler) -> bool:
    """Whether ``handler``'s class offers :class:`Resumable` (looked up on the class: some objects, such as
    ignite's metrics, answer every attribute)."""
    return not isinstance(handler, type) and all(callable(getattr(type(handler), name, None))
                                                  for name in ("training_state", "load_training_state"))


def resumable_handlers(engine: Engine) -> dict[str, Resumable]:
    """The attached handlers with state of their own (:class:`Resumable`), by stable key."""
    return {k: o for k, o in _keyed(_owners(engine)).items() if is_resumable(o)}


def unresumable_handlers(engine: Engine) -> list[str]:
    """Names of attached method handlers whose state a resumed run could not restore."""
    names = []
    for owner in _owners(engine):
        module = type(owner).__module__
        if (module.startswith(METHOD_MODULES) and not is_resumable(owner)
                and not getattr(owner, "resume_stateless", False)):
            names.append(type(owner).__qualname__)
    return sorted(set(names))


def _validator(engine: Engine):
    """The evaluator run by a MONAI ``ValidationHandler`` on ``engine``, if any."""
    owner = _attached(engine, lambda h: type(h).__name__ == "ValidationHandler")
    return None if owner is None else owner.validator


def _best(engine: Engine | None) -> dict | None:
    if engine is None or not hasattr(engine.state, "best_metric"):
        return None
    return {"best_metric": float(engine.state.best_metric), "best_metric_epoch": int(engine.state.best_metric_epoch)}


def _savers(engine: Engine | None) -> dict:
    """The key-metric record of every MONAI ``CheckpointSaver`` on ``engine`` (which file holds the best score)."""
    if engine is None:
        return {}
    return {k: o._key_metric_checkpoint.state_dict() for k, o in _keyed(_owners(engine)).items()
            if isinstance(o, CheckpointSaver) and isinstance(o._key_metric_checkpoint, Checkpoint)}


def run_settings(engine: Engine) -> dict:
    """The settings that make the trainer's run the one it is: the epochs, the batch size and, when a
    :class:`~robustmri.engine.model_metadata.ModelMetadataWriter` is attached, its ``run_settings()``."""
    settings = {"epochs": int(engine.state.max_epochs)}
    batch_size = getattr(getattr(engine, "data_loader", None), "batch_size", None)
    if batch_size is not None:
        settings["batch_size"] = int(batch_size)
    writer = _attached(engine, lambda h: isinstance(h, ModelMetadataWriter))
    if writer is not None:
        settings.update(writer.run_settings())
    return settings


#: What to do about a state of another run (ends the messages of :func:`resume_problem` that say so).
OTHER_RUN_ADVICE = "resume with the command that wrote it, or start afresh with another ckpt_dir (or without the file)"


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def resume_problem(engine: Engine, state: dict) -> str | None:
    """Why ``state`` (a :func:`run_state`) cannot be resumed by the run on ``engine``, in one phrase; None if it can.

    In order: a setting of :func:`run_settings` differs (states without settings skip this),
    a method's state is not saved, the handlers differ, the network's parameters differ, the
    weight average or learning-rate schedule is kept by one and not the other, the precision
    cannot be the recorded one, the run already completed.
    """
    saved, current = state.get("settings") or {}, run_settings(engine)
    differ = [key for key in saved if key in current and saved[key] != current[key]]
    if differ:
        shown = "; ".join(f"{key} {_shown(saved[key])} there, {_shown(current[key])} here" for key in differ[:3])
        more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
        return f"it was written by another run ({shown}{more}): {OTHER_RUN_ADVICE}"
    unsupported = unresumable_handlers(engine)
    if unsupported:
        return (f"the state of {', '.join(unsupported)} is not saved (resume supports naive training, ISR, ISP, AT, "
                "N2V, ALR, MW-Net, PIE, PINT, stability training and the label audit)")
    handlers, saved_handlers = resumable_handlers(engine), state.get("handlers", {})
    if set(handlers) != set(saved_handlers):
        return (f"it was written by a run with other handlers ({sorted(saved_handlers)}) than this one "
                f"({sorted(handlers)}): {OTHER_RUN_ADVICE}")
    model = _module(engine).state_dict()
    if set(model) != set(state["model"]):
        return (f"it was written for another network ({len(state['model'])} tensors there, {len(model)} here): "
                f"{OTHER_RUN_ADVICE}")
    for key, value in model.items():
        if tuple(value.shape) != tuple(state["model"][key].shape):
            return (f"it was written for another network ({key}: {list(state['model'][key].shape)} there, "
                    f"{list(value.shape)} here): {OTHER_RUN_ADVICE}")
    if (attached_weight_average(engine) is None) != (state.get("ema") is None):
        return ("it was written by a run that kept a weight average and this one does not, or the reverse "
                f"(ema_decay): {OTHER_RUN_ADVICE}")
    if (_scheduler(engine) is None) != (state.get("lr_scheduler") is None):
        return ("it was written by a run with a learning-rate schedule and this one has none, or the reverse: "
                f"{OTHER_RUN_ADVICE}")
    problem = _precision_problem(engine, state)
    if problem is not None:
        return problem
    if state["epoch"] >= engine.state.max_epochs:
        return (f"this run already completed its {engine.state.max_epochs} epochs (state saved after epoch "
                f"{state['epoch']}): nothing to resume")
    return None


def run_state(engine: Engine) -> dict:
    """:func:`training_state` plus what resuming a killed run needs: handler states and best metrics so far, and
    the run's settings (:func:`run_settings`) to tell it from another run."""
    validator = _validator(engine)
    return {**training_state(engine), "settings": run_settings(engine),
            "handlers": {k: h.training_state() for k, h in resumable_handlers(engine).items()},
            "trainer_best": _best(engine), "validator_best": _best(validator), "validator_savers": _savers(validator)}


def _restore_best(engine: Engine | None, best: dict | None) -> None:
    if engine is not None and best is not None:
        engine.state.best_metric, engine.state.best_metric_epoch = best["best_metric"], best["best_metric_epoch"]


def restore_run_state(engine: Engine, state: dict, path: str = "training state") -> None:
    """Put a :func:`run_state` back: the training state, then every handler's, then the best metrics."""
    unsupported = unresumable_handlers(engine)
    if unsupported:
        raise ValueError(f"{path}: cannot resume: the state of {', '.join(unsupported)} is not saved (resume "
                         "supports naive training, ISR, ISP, AT, N2V, ALR, MW-Net, PIE, PINT, stability training "
                         "and the label audit)")
    handlers = resumable_handlers(engine)
    saved = state.get("handlers", {})
    if set(handlers) != set(saved):
        raise ValueError(f"{path}: written by a run with other handlers ({sorted(saved)}) than this one "
                         f"({sorted(handlers)}): resume with the config that wrote it")
    restore_training_state(engine, state, path)
    for key, handler in handlers.items():
        handler.load_training_state(saved[key])
    _restore_best(engine, state.get("trainer_best"))
    validator = _validator(engine)
    _restore_best(validator, state.get("validator_best"))
    savers = _keyed(_owners(validator)) if validator is not None else {}
    for key, record in state.get("validator_savers", {}).items():
        if isinstance(savers.get(key), CheckpointSaver):
            savers[key].load_state_dict(record)


class TrainingCheckpoint:
    """Trainer handler: write the whole run state (:func:`run_state`) to ``path`` after every epoch, atomically;
    with ``resume``, continue from the state at ``path`` when the run starts.

    List it first among the trainer's handlers: it restores the state before any other
    handler's start-up (a step scheduled right after the saved epoch then sees the restored
    state). It saves after every other handler of the epoch has run (its save is registered
    when the run starts, after all handlers are attached), so the state holds this epoch's
    validation, history and any step taken after it. ``resume`` without a file at ``path``
    starts from epoch 1 (so a job can always be launched with ``resume: true``); a file that
    this run cannot resume (:func:`resume_problem`) ends the run with :class:`CannotResume`.
    Under ``torchrun`` only rank 0 writes; every rank reads the same file (a path all nodes see).
    """

    def __init__(self, path: str, resume: bool = False, save: bool = True):
        if isinstance(resume, str):  # ``--resume true`` on the command line arrives as a string
            if resume.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"resume must be true or false, got {resume!r}")
            resume = resume.strip().lower() in ("true", "1", "yes")
        self.path, self.resume, self.save = path, bool(resume), bool(save)
        self._registered: set[int] = set()
        self.resumed_from: int | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._exception_raised)

    def _exception_raised(self, engine: Engine, error: BaseException) -> None:
        """A refusal leaves at once, before the next handler (MONAI's ``StatsHandler``) logs it with a traceback.

        ignite passes an exception on only through its ``EXCEPTION_RAISED`` handlers: any other
        is raised here too when no other handler is there to do it.
        """
        others = [h for h, *_ in engine._event_handlers.get(Events.EXCEPTION_RAISED, [])
                  if getattr(h, "__self__", None) is not self]
        if isinstance(error, CannotResume) or not others:
            raise error

    def _start(self, engine: Engine) -> None:
        if self.save and id(engine) not in self._registered:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._save)
            self._registered.add(id(engine))
        if not self.resume:
            return
        if not os.path.isfile(self.path):
            logger.info("resume: no training state at %s; starting from epoch 1", self.path)
            return
        try:
            state = torch.load(self.path, map_location=next(engine.network.parameters()).device, weights_only=True)
        except Exception as err:  # noqa: BLE001 - whatever the reason, the file is no state this run can use
            raise CannotResume(f"{self.path}: cannot resume: the file is not a readable training state "
                               f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
        problem = resume_problem(engine, state)
        if problem is not None:
            raise CannotResume(f"{self.path}: cannot resume: {problem}")
        restore_run_state(engine, state, self.path)
        self.resumed_from = int(state["epoch"])
        logger.info("resumed from %s: epoch %d of %d done", self.path, state["epoch"], engine.state.max_epochs)

    def _save(self, engine: Engine) -> None:
        if not is_main_process():
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        partial = f"{self.path}.partial"
        torch.save(run_state(engine), partial)
        os.replace(partial, self.path)
