"""What a checkpoint was trained with, written beside it: ``<ckpt_dir>/model_metadata.json``.

``configs/metadata.json`` describes the bundle as shipped (a 256 x 256 input). A trained
model can differ: ``make demo`` trains at 64 x 64 with ``network_padding`` 2, and export,
inference and ``ckpt_export`` must rebuild the network as it was trained. So training
writes, into ``ckpt_dir`` when it starts, the bundle metadata of the trained model (the
bundle's metadata with the input shape as trained, so ``ckpt_export`` and
``verify_net_in_out`` take it as ``--meta_file``) plus ``trained_with``: the spatial size,
the network padding, the preprocessing (its name and exact description), the network's class,
the class names, the bundle version and where the training data came from.

Deployment configs read the settings back with :func:`trained_setting`: the value written
beside the checkpoint, else ``train.json``'s own default (a checkpoint from before this file
existed), and an explicit command-line value always wins.
"""

from __future__ import annotations

import copy
import logging
import os

from ignite.engine import Engine, Events

from robustmri.data.preprocessing import DESCRIPTIONS, LEGACY_PREPROCESS, check_preprocess
from robustmri.outputs import read_json, write_json

logger = logging.getLogger(__name__)

METADATA_FILE = "model_metadata.json"
#: The settings that shape the network and its input, recorded under ``trained_with``.
SETTINGS = ("spatial_size", "network_padding", "preprocess")
#: Settings that records written before they existed lack, with the value those models were trained with.
LEGACY_SETTINGS = {"preprocess": LEGACY_PREPROCESS}


def metadata_path(checkpoint_or_dir: str | os.PathLike) -> str:
    """``model_metadata.json`` in ``checkpoint_or_dir`` (a folder) or beside it (a checkpoint file)."""
    path = os.fspath(checkpoint_or_dir)
    folder = path if os.path.isdir(path) or not os.path.splitext(path)[1] else os.path.dirname(path)
    return os.path.join(folder, METADATA_FILE)


def model_metadata(bundle_metadata: dict | None, spatial_size: int, network_padding: int, network,
                   class_names, data=None, bundle_version: str = "", ema_decay: float | None = None,
                   preprocess: str = LEGACY_PREPROCESS) -> dict:
    """The bundle metadata with the trained input shape, and a ``trained_with`` record."""
    metadata = copy.deepcopy(dict(bundle_metadata or {}))
    spatial_size = int(spatial_size)
    for tensor in metadata.get("network_data_format", {}).get("inputs", {}).values():
        if isinstance(tensor, dict) and "spatial_shape" in tensor:
            tensor["spatial_shape"] = [spatial_size, spatial_size]
    from robustmri.influence.adapter import unwrap  # a DistributedDataParallel network: the module inside

    network_type = type(unwrap(network))
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
        "data": {"source": getattr(data, "source", None),
                 "n": {name: len(data.split(name)) for name in ("train", "val", "test")} if data is not None else None},
    }
    return metadata


class ModelMetadataWriter:
    """Trainer handler: writes ``model_metadata.json`` into ``ckpt_dir`` when training starts."""

    def __init__(self, ckpt_dir: str, spatial_size: int, network_padding: int, network, class_names,
                 bundle_metadata: dict | None = None, data=None, ema_decay: float | None = None,
                 preprocess: str = LEGACY_PREPROCESS):
        self.path = os.path.join(ckpt_dir, METADATA_FILE)
        self.content = model_metadata(bundle_metadata, spatial_size, network_padding, network, class_names, data,
                                      ema_decay=ema_decay, preprocess=preprocess)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        from robustmri.engine.distributed import is_main_process

        if is_main_process():  # under torchrun rank 0 writes
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


def trained_setting(checkpoint: str | os.PathLike, key: str, bundle_root: str | os.PathLike):
    """``key`` as the checkpoint was trained with; ``train.json``'s default when nothing is recorded.

    A checkpoint without a record that predates a setting of :data:`LEGACY_SETTINGS` was trained
    with its legacy value (min-max scaling); with no checkpoint at all (a model still to be
    trained) the default of ``train.json`` applies.
    """
    if key not in SETTINGS:
        raise KeyError(f"{key!r} is not a recorded training setting; expected one of {SETTINGS}")
    record = read_trained(checkpoint)
    if record is not None:
        return record[key]
    if key in LEGACY_SETTINGS and os.path.isfile(checkpoint):  # a checkpoint from before the setting existed
        return LEGACY_SETTINGS[key]
    from monai.bundle import ConfigParser

    default = ConfigParser.load_config_file(os.path.join(bundle_root, "configs", "train.json"))[key]
    logger.info("no %s beside %s: %s = %s (train.json's default)", METADATA_FILE, checkpoint, key, default)
    return default
