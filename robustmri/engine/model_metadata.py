"""What a checkpoint was trained with, written beside it: ``<ckpt_dir>/model_metadata.json``.

``configs/metadata.json`` describes the bundle as shipped (``train.json``'s 64 x 64 input, the
size ``make demo`` trains at). A trained model can differ (``--spatial_size 128``, the paper's
256 x 256), and export, inference and ``ckpt_export`` must rebuild the network as it was trained. So training
writes, into ``ckpt_dir`` when it starts, the bundle metadata of the trained model (the
bundle's metadata with the input shape as trained, so ``ckpt_export`` and
``verify_net_in_out`` take it as ``--meta_file``) plus ``trained_with``: the spatial size,
the network padding, the preprocessing (its name and exact description), the network's class,
the class names, the bundle version, where the training data came from, and the precision it
trained in with the reason (:mod:`robustmri.engine.precision`).

Deployment configs read the settings back with :func:`trained_setting`: the value written
beside the checkpoint, else the training default they pass (``train.json``'s; a model still to be
trained), and an explicit command-line value always wins.

The record also holds ``provenance`` (:data:`PROVENANCE_SCHEMA`; field names are stable and
documented in ``docs/deployment.md``, "Model integrity and provenance"): what trained the
model, which export copies into the ONNX metadata. Written when training starts, completed when
it ends (``training.completed``, the sha256 of ``model.pt`` as written, the last validation
metrics):

- ``data``: ``kind`` ("synthetic": the embedded synthetic set; "folder": a data set folder),
  ``name`` (the folder's base name, never a path), ``n`` per split, ``n_skipped``, ``class_names``,
  ``fingerprint_sha256`` and ``fingerprint_rule`` (:data:`FINGERPRINT_RULE`);
- ``protocol``: split seed and fractions, noise and its level, test noise share, label noise,
  imbalance, input size, preprocessing (:attr:`robustmri.data.protocol.ProtocolData.settings`);
- ``recipe``: ``method`` (the method handlers' and loss's classes; "naive" when there are none),
  ``optimizer`` (class and hyper-parameters as the optimizer holds them), ``epochs``,
  ``batch_size`` and the settings the config passes (schedule, warm-up, EMA, augmentation);
- ``code``: ``robustmri_version``, ``git_commit`` and ``git_dirty`` (None outside a git checkout);
- ``training``: ``started_utc``, ``completed``, ``epochs_completed``, ``final_checkpoint``
  (``{"file": "model.pt", "sha256": ...}``, once written);
- ``metrics``: ``validation`` (the last epoch's validation metrics of the weights ``model.pt``
  holds, and the best validation metric with its epoch); export adds ``test`` from the bundle's
  evaluation when it evaluated this very checkpoint (matched by sha256);
- ``demo_model``: true for a model trained on the embedded synthetic set.

A checkpoint calibrated to a site (the bundle's ``calibrating``, :mod:`robustmri.deploy.calibration`)
is read like any other: its folder's ``model_metadata.json`` holds the same ``trained_with`` and
``provenance`` (those of the training run; export marks the calibrated file unbound to it). The
calibration itself (:func:`read_calibration`) is recorded as ``calibrations[<file name>]`` when
the calibrated checkpoint lies beside its source (``models/model_site.pt`` beside ``models/model.pt``),
or as ``calibration`` in the copy of the source's metadata written into another folder
(``--output_dir``): ``file``, ``sha256``, ``date``, ``source_checkpoint`` (``file``, ``sha256``),
``images`` (``n``, ``n_unreadable``, ``sha256`` of the inputs and its rule), ``adapted``,
``batchnorm``, ``abstention`` (site refit, threshold, target and held-out acceptance, pseudo-label counts),
``code``. No paths.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import logging
import os
import subprocess

from ignite.engine import Engine, Events

from robustmri import INTENDED_USE, __version__
from robustmri.data.preprocessing import DEFAULT_PREPROCESS, DESCRIPTIONS, LEGACY_PREPROCESS, check_preprocess
from robustmri.outputs import read_json, write_json

logger = logging.getLogger(__name__)

METADATA_FILE = "model_metadata.json"
#: Beside it, local only: the folder the training data were read from (:func:`write_training_data`).
TRAINING_DATA_FILE = "training_data.json"
#: The calibration of the checkpoint a copied record sits beside (``--output_dir``), and those of checkpoints
#: beside the source, by file name (module docstring).
CALIBRATION_KEY = "calibration"
CALIBRATIONS_KEY = "calibrations"
#: The settings that shape the network and its input, recorded under ``trained_with``.
SETTINGS = ("spatial_size", "network_padding", "preprocess")
#: Settings that records written before they existed lack, with the value those models were trained with.
LEGACY_SETTINGS = {"preprocess": LEGACY_PREPROCESS}
#: Version tag of the ``provenance`` record (module docstring).
PROVENANCE_SCHEMA = "robustmri-provenance-1"
#: How ``data.fingerprint_sha256`` is computed (written beside it).
FINGERPRINT_RULE = ("sha256 of the canonical JSON (keys sorted, no spaces) of the sorted list of [split, file name "
                    "relative to the data set folder (synthetic/<index> for the embedded set), size in bytes (null "
                    "for the embedded set), true label name] over the train, val and test splits")


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def code_version() -> dict:
    """robustmri's version and, in a git checkout, its commit and whether files differ from it (else None)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    commit = dirty = None
    try:
        run = {"cwd": root, "capture_output": True, "text": True, "timeout": 10}
        head = subprocess.run(["git", "rev-parse", "HEAD"], **run)
        if head.returncode == 0:
            commit = head.stdout.strip()
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run)
            dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"robustmri_version": __version__, "git_commit": commit, "git_dirty": dirty}


def data_folder(data) -> str | None:
    """The folder ``data`` (a :class:`~robustmri.data.protocol.ProtocolData`) was read from; None for the embedded set."""
    return data.source if (getattr(data, "settings", None) or {}).get("data_kind") == "folder" else None


def data_provenance(data) -> dict:
    """The ``data`` part of the provenance record for :class:`robustmri.data.protocol.ProtocolData` (no paths)."""
    settings = dict(getattr(data, "settings", None) or {})
    kind = settings.get("data_kind") or "unknown"
    class_names = [str(name) for name in data.class_names]
    root = data_folder(data)
    rows = []
    for split in ("train", "val", "test"):
        for item in data.split(split):
            file = str(item.get("file", item.get("id")))
            size = None
            if root is not None:
                size = os.path.getsize(file) if os.path.isfile(file) else None
                file = os.path.relpath(file, root).replace(os.sep, "/")
            rows.append([split, file, size, class_names[int(item.get("true_label", item["label"]))]])
    rows.sort(key=lambda row: json.dumps(row))
    fingerprint = hashlib.sha256(json.dumps(rows, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    name = {"synthetic": "embedded synthetic set", "folder": os.path.basename(os.path.normpath(root or ""))}
    record = {"kind": kind, "name": name.get(kind, "unknown"),
              "n": {split: len(data.split(split)) for split in ("train", "val", "test")},
              "n_skipped": len(getattr(data, "skipped", []) or []), "class_names": class_names,
              "fingerprint_sha256": fingerprint, "fingerprint_rule": FINGERPRINT_RULE}
    if kind == "synthetic":
        record["synthetic_patients"] = settings.get("synthetic_patients")
    return record


def method_name(method_handlers=(), loss=None) -> str:
    """The training method as its parts name it: the method handlers' and the loss's classes; "naive" for none."""
    parts = [type(handler).__name__ for handler in (method_handlers or [])]
    if loss is not None and type(loss).__module__.startswith("robustmri"):
        parts.append(type(loss).__name__)
    return " + ".join(parts) or "naive"


def optimizer_settings(optimizer) -> dict | None:
    """The optimizer's class and the hyper-parameters of its first parameter group (numbers, text, flags)."""
    if optimizer is None:
        return None
    group = optimizer.param_groups[0] if getattr(optimizer, "param_groups", None) else {}
    settings = {key: (list(value) if isinstance(value, tuple) else value) for key, value in group.items()
                if key not in ("params", "initial_lr") and (isinstance(value, (int, float, str, bool)) or value is None
                                                            or isinstance(value, tuple))}
    return {"name": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}", **settings}


def training_provenance(data=None, optimizer=None, method_handlers=(), loss=None, recipe: dict | None = None) -> dict:
    """The ``provenance`` record as training starts (module docstring); data None: nothing known about the data."""
    data_record = data_provenance(data) if data is not None else {"kind": "unknown", "name": "unknown"}
    protocol = {k: v for k, v in (getattr(data, "settings", None) or {}).items() if k != "data_kind"}
    return {
        "schema": PROVENANCE_SCHEMA,
        "data": data_record,
        "protocol": protocol,
        "recipe": {"method": method_name(method_handlers, loss), "optimizer": optimizer_settings(optimizer),
                   **dict(recipe or {})},
        "code": code_version(),
        "training": {"started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "completed": False},
        "metrics": {},
        "demo_model": data_record["kind"] == "synthetic",
    }


def metadata_path(checkpoint_or_dir: str | os.PathLike) -> str:
    """``model_metadata.json`` in ``checkpoint_or_dir`` (a folder) or beside it (a checkpoint file)."""
    path = os.fspath(checkpoint_or_dir)
    folder = path if os.path.isdir(path) or not os.path.splitext(path)[1] else os.path.dirname(path)
    return os.path.join(folder, METADATA_FILE)


def model_metadata(bundle_metadata: dict | None, spatial_size: int, network_padding: int, network,
                   class_names, data=None, bundle_version: str = "", ema_decay: float | None = None,
                   preprocess: str = DEFAULT_PREPROCESS) -> dict:
    """The bundle metadata with the trained input shape, the intended use (:data:`robustmri.INTENDED_USE`, whatever
    ``bundle_metadata`` says), and a ``trained_with`` record."""
    metadata = copy.deepcopy(dict(bundle_metadata or {}))
    spatial_size = int(spatial_size)
    for tensor in metadata.get("network_data_format", {}).get("inputs", {}).values():
        if isinstance(tensor, dict) and "spatial_shape" in tensor:
            tensor["spatial_shape"] = [spatial_size, spatial_size]
    from robustmri.influence.adapter import unwrap  # a DistributedDataParallel network: the module inside

    network_type = type(unwrap(network))
    metadata["intended_use"] = INTENDED_USE
    metadata["trained_with"] = {
        "spatial_size": spatial_size,
        "network_padding": int(network_padding),
        "preprocess": check_preprocess(preprocess),
        "preprocess_description": DESCRIPTIONS[preprocess],
        "network": f"{network_type.__module__}.{network_type.__qualname__}",
        "class_names": [str(name) for name in class_names],
        "bundle_version": str(bundle_version or metadata.get("version", "")),
        # which weights model.pt holds (the checkpoint-selection study, docs/results.md, chose the last epoch)
        "model_weights": (f"moving average of the weights (decay {float(ema_decay):g} per iteration) after the last "
                          "epoch" if ema_decay is not None else "the weights after the last epoch"),
        "ema_decay": None if ema_decay is None else float(ema_decay),
        # the data set by name only (never an absolute path); provenance["data"] says more
        "data": {"source": (os.path.basename(os.path.normpath(data_folder(data))) if data_folder(data)
                            else getattr(data, "source", None)),
                 "n": {name: len(data.split(name)) for name in ("train", "val", "test")} if data is not None else None},
    }
    return metadata


def write_training_data(folder: str | os.PathLike, data) -> str:
    """Write :data:`TRAINING_DATA_FILE` into ``folder``: where the training data lie on this machine.

    The folder's absolute path (None for the embedded synthetic set), so that evaluation and export
    read the data the model was trained on (:func:`evaluation_dataset_dir`). It is a file of its own,
    not part of ``model_metadata.json``, because a path may name a site or a patient and the model
    metadata travels: export copies it into ONNX models and ``ckpt_export --meta_file`` into TorchScript.
    """
    source = data_folder(data)
    path = os.path.join(os.fspath(folder), TRAINING_DATA_FILE)
    write_json(path, {"dataset_dir": os.path.abspath(source) if source else None})
    return path


def recorded_dataset_dir(checkpoint: str | os.PathLike) -> tuple[bool, str | None]:
    """(whether a record exists, the training data folder or None for the embedded set) beside ``checkpoint``."""
    path = os.path.join(os.path.dirname(metadata_path(checkpoint)), TRAINING_DATA_FILE)
    if not os.path.isfile(path):
        return False, None
    return True, read_json(path).get("dataset_dir")


class ModelMetadataWriter:
    """Trainer handler: writes ``model_metadata.json`` into ``ckpt_dir`` when training starts, completes it at the end.

    ``optimizer``, ``method_handlers``, ``loss`` and ``recipe`` (settings of the config, e.g. the
    learning-rate schedule) describe the recipe in ``provenance``; ``evaluator`` (the validation
    evaluator) gives the validation metrics; ``final_checkpoint`` is the file the trained model is
    saved to on completion (its sha256 binds the record to it; attach this handler after the saver).
    """

    def __init__(self, ckpt_dir: str, spatial_size: int, network_padding: int, network, class_names,
                 bundle_metadata: dict | None = None, data=None, ema_decay: float | None = None,
                 preprocess: str = DEFAULT_PREPROCESS, optimizer=None, method_handlers=(), loss=None,
                 recipe: dict | None = None, evaluator: Engine | None = None, final_checkpoint: str | None = None):
        self.path = os.path.join(ckpt_dir, METADATA_FILE)
        self.data = data
        self.content = model_metadata(bundle_metadata, spatial_size, network_padding, network, class_names, data,
                                      ema_decay=ema_decay, preprocess=preprocess)
        self.content["provenance"] = training_provenance(data, optimizer, method_handlers, loss,
                                                         {**dict(recipe or {}), "ema_decay": ema_decay})
        self.network = network
        # the learning rate as set, before a schedule scaled it (the record holds the optimiser's own, scaled one)
        groups = getattr(optimizer, "param_groups", None) or [{}]
        self.learning_rate = groups[0].get("initial_lr", groups[0].get("lr"))
        self.evaluator = evaluator
        self.final_checkpoint = final_checkpoint or os.path.join(ckpt_dir, "model.pt")

    def run_settings(self) -> dict:
        """What makes this training run the one it is, flat and by option name where there is one: the network,
        its input and preprocessing, the data (fingerprint) and protocol, the method and recipe. A resumed run
        must have the same (:mod:`robustmri.engine.training_state`); the requested precision is left out (the
        precision a run trained in is recorded and reused on its own)."""
        trained, provenance = self.content["trained_with"], self.content["provenance"]
        settings = {key: trained[key] for key in ("spatial_size", "network_padding", "preprocess", "network",
                                                  "class_names", "ema_decay")}
        settings["data fingerprint"] = provenance["data"].get("fingerprint_sha256")
        settings.update({key: value for key, value in provenance["protocol"].items()})
        for key, value in provenance["recipe"].items():
            if key == "optimizer" and isinstance(value, dict):
                settings.update({f"optimizer.{name}": v for name, v in value.items() if name != "lr"})
                settings["learning_rate"] = self.learning_rate
            elif key != "precision":
                settings[key] = value
        return json.loads(json.dumps(settings, default=str))  # plain values (tuples as lists), as saved and loaded

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def __call__(self, engine: Engine) -> None:
        from robustmri.engine.distributed import is_main_process
        from robustmri.influence.adapter import unwrap

        # read when the run starts: a resumed run trains on in the precision its training state recorded
        network = unwrap(self.network)
        self.content["trained_with"].update(precision=getattr(network, "robustmri_precision", None),
                                            precision_reason=getattr(network, "robustmri_precision_reason", None))
        recipe = self.content["provenance"]["recipe"]
        recipe.setdefault("epochs", int(engine.state.max_epochs))
        loader = getattr(engine, "data_loader", None) or getattr(engine.state, "dataloader", None)
        if getattr(loader, "batch_size", None) is not None:
            recipe.setdefault("batch_size", int(loader.batch_size))
        if is_main_process():  # under torchrun rank 0 writes
            write_json(self.path, self.content)
            write_training_data(os.path.dirname(self.path), self.data)

    def completed(self, engine: Engine) -> None:
        """Record how training ended, the final checkpoint's sha256 and the validation metrics."""
        from robustmri.engine.distributed import is_main_process

        provenance = self.content["provenance"]
        finished = engine.state.epoch >= engine.state.max_epochs
        provenance["training"].update(
            completed=bool(finished), epochs_completed=int(engine.state.epoch),
            completed_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        if finished and os.path.isfile(self.final_checkpoint):
            provenance["training"]["final_checkpoint"] = {"file": os.path.basename(self.final_checkpoint),
                                                          "sha256": file_sha256(self.final_checkpoint)}
        state = getattr(self.evaluator, "state", None)
        if state is not None and getattr(state, "metrics", None):
            provenance["metrics"]["validation"] = {
                "n": len(getattr(self.evaluator.data_loader, "dataset", []) or []) or None,
                "last_epoch": {k: float(v) for k, v in state.metrics.items() if isinstance(v, (int, float))},
                "best": {"metric": float(state.best_metric) if state.best_metric is not None and
                         state.best_metric != -1 else None, "epoch": int(getattr(state, "best_metric_epoch", -1))},
            }
        if is_main_process():
            write_json(self.path, self.content)


def read_trained(checkpoint_or_dir: str | os.PathLike) -> dict | None:
    """The ``trained_with`` record beside a checkpoint, or None when there is none."""
    path = metadata_path(checkpoint_or_dir)
    if not os.path.isfile(path):
        return None
    record = read_json(path).get("trained_with")
    required = [key for key in SETTINGS if key not in LEGACY_SETTINGS]
    if not isinstance(record, dict) or any(key not in record for key in required):
        raise ValueError(f"{path}: no trained_with record with {', '.join(required)}; delete it or retrain")
    record = {**LEGACY_SETTINGS, **record}
    # a model is never fed images prepared differently from its training
    check_preprocess(record["preprocess"], record.get("preprocess_description"), source=path)
    return record


def read_calibration(checkpoint: str | os.PathLike) -> dict | None:
    """The site calibration recorded for ``checkpoint`` (module docstring), or None for an uncalibrated one.

    A record whose ``sha256`` is not the file's describes other weights (the file was replaced or
    recalibrated elsewhere): ``ValueError``.
    """
    checkpoint = os.fspath(checkpoint)
    path = metadata_path(checkpoint)
    if not os.path.isfile(path):
        return None
    content, name = read_json(path), os.path.basename(checkpoint)
    record = content.get(CALIBRATION_KEY)
    if not (isinstance(record, dict) and record.get("file") == name):
        record = (content.get(CALIBRATIONS_KEY) or {}).get(name)
    if not isinstance(record, dict):
        return None
    if record.get("sha256") != file_sha256(checkpoint):
        raise ValueError(f"{path} records a calibration of other weights than {name}: recalibrate")
    return record


def trained_setting(checkpoint: str | os.PathLike, key: str, default):
    """``key`` as the checkpoint was trained with; ``default`` (the caller's training default, ``train.json``'s
    for the bundle) when nothing is recorded.

    A checkpoint without a record that predates a setting of :data:`LEGACY_SETTINGS` was trained
    with its legacy value (min-max scaling); with no checkpoint at all (a model still to be
    trained) ``default`` applies.
    """
    if key not in SETTINGS:
        raise KeyError(f"{key!r} is not a recorded training setting; expected one of {SETTINGS}")
    record = read_trained(checkpoint)
    if record is not None:
        return record[key]
    if key in LEGACY_SETTINGS and os.path.isfile(checkpoint):  # a checkpoint from before the setting existed
        return LEGACY_SETTINGS[key]
    logger.info("no %s beside %s: %s = %s (the training default)", METADATA_FILE, checkpoint, key, default)
    return default


def evaluation_dataset_dir(checkpoint: str | os.PathLike, dataset_dir: str | None = None) -> str:
    """The data set to evaluate or export ``checkpoint`` on: the one it was trained on unless ``dataset_dir`` is given.

    ``dataset_dir`` None: the folder recorded beside the checkpoint ("" for the embedded
    synthetic set, and when nothing is recorded). Given (even ""), it is used, and a warning
    names both data sets when the model was trained on another one.
    """
    from robustmri.data.protocol import DATA_ENV, resolve_dataset_dir

    found, trained = recorded_dataset_dir(checkpoint)
    if not found:  # no record, or one from before the folder was recorded
        return dataset_dir or ""
    chosen = (trained or "") if dataset_dir is None else dataset_dir
    used = resolve_dataset_dir(chosen)
    if used != trained:
        how = "dataset_dir" if dataset_dir is not None else f"${DATA_ENV}"
        logger.warning("%s was trained on %s but this run uses %s (%s)", checkpoint,
                       trained or "the embedded synthetic set", used or "the embedded synthetic set", how)
    return chosen
