"""Export a checkpoint the bundle trained, as the bundle's inference config rebuilds it, with its detector.

The network is the bundle's ``network_def`` (``configs/inference.json``, which reads ``train.json``),
rebuilt as the checkpoint was trained: the spatial size and network padding come from
``model_metadata.json`` beside the checkpoint (training writes it; ``train.json``'s defaults when
there is none). The detector is fitted on the data the checkpoint was trained on: ``seed``, ``noise``
and ``synthetic_patients`` default to what the training recorded, and a warning says when the loaded
splits differ from the recorded fingerprint. ``scripts/export_onnx.py`` is its command line.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import sys

from robustmri.deploy.onnx.export import (
    bundle_version,
    checkpoint_provenance,
    export_onnx,
    parity_requested,
    split_arrays,
    split_images,
)
from robustmri.abstention.mahalanobis import TARGET_ACCEPTANCE
from robustmri.deploy.onnx.ood import SERIES_MAX_NOT_ASSESSABLE
from robustmri.engine.model_metadata import data_provenance, metadata_path, read_trained
from robustmri.engine.workflow import load_workflow
from robustmri.evaluation.checkpoints import load_weights
from robustmri.outputs import read_json

logger = logging.getLogger("export_onnx")


def monai_logs_to_stderr() -> None:
    """MONAI's loggers print to stdout; move them to stderr, so that stdout is the JSON report alone."""
    for name, monai_logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith("monai") and isinstance(monai_logger, logging.Logger):
            for handler in monai_logger.handlers:
                if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
                    handler.setStream(sys.stderr)


def parse_network_def(value) -> dict:
    """A ``network_def`` from the command line: a dict (fire parses Python literals), or JSON or Python text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError) as error:
                raise ValueError(f"--network_def is neither JSON nor a Python dict literal: {value!r}") from error
    if not isinstance(value, dict) or "_target_" not in value:
        raise ValueError(f"--network_def must be a dict with a '_target_' (a network class), got {value!r}")
    return value


def export_config(bundle_dir: str | os.PathLike, checkpoint: str, spatial_size: int | None = None,
                  network_padding: int | None = None, network_def=None, **overrides):
    """The inference config of the bundle in ``bundle_dir`` for ``checkpoint`` (MONAI's ConfigParser), as the
    bundle's export reads it.

    ``spatial_size`` and ``network_padding`` are read from ``model_metadata.json`` beside the
    checkpoint unless given; ``network_def`` and ``overrides`` replace those ids of the config.
    """
    settings = {"checkpoint": os.path.abspath(checkpoint), **overrides}
    if spatial_size is not None:
        settings["spatial_size"] = int(spatial_size)
    if network_padding is not None:
        settings["network_padding"] = int(network_padding)
    if network_def is not None:
        settings["network_def"] = parse_network_def(network_def)
    return load_workflow(bundle_dir, ["inference.json"], settings, workflow_type=None).parser


def check_trained_network(network, checkpoint: str) -> None:
    """Refuse a network of another class than ``model_metadata.json`` records for ``checkpoint``."""
    record = read_trained(checkpoint)
    built = f"{type(network).__module__}.{type(network).__qualname__}"
    trained = (record or {}).get("network")
    if trained and trained != built:
        raise ValueError(f"{checkpoint} was trained with {trained} (model_metadata.json) but network_def builds "
                         f"{built}: pass the training network with --network_def")


def recorded_provenance(checkpoint: str) -> dict:
    """The ``provenance`` record of ``model_metadata.json`` beside the checkpoint; {} when there is none."""
    try:
        return read_json(metadata_path(checkpoint), missing={}).get("provenance") or {}
    except ValueError:  # unreadable JSON: read_trained (the network check) says so
        return {}


def recorded_protocol(provenance: dict) -> dict:
    """The protocol settings (seed, noise, synthetic_patients) the training run recorded in its provenance."""
    return {**(provenance.get("protocol") or {}),
            **{k: v for k, v in (provenance.get("data") or {}).items() if k == "synthetic_patients"}}


def warn_if_other_data(data, provenance: dict, checkpoint: str) -> None:
    """Warn when the data loaded here are not the data the checkpoint was trained on (by the recorded fingerprint):
    the detector would be fitted, and its threshold calibrated, on other splits."""
    recorded = (provenance.get("data") or {}).get("fingerprint_sha256")
    if recorded and data_provenance(data)["fingerprint_sha256"] != recorded:
        logger.warning("the data loaded for export are not the data %s was trained on (fingerprint differs): the "
                       "out-of-distribution detector and its threshold are fitted on these splits; pass --dataset_dir, "
                       "--seed and --noise as in training", os.path.basename(checkpoint))


def export_checkpoint(bundle_dir: str | os.PathLike, checkpoint: str, output: str, spatial_size: int | None = None,
                      network_padding: int | None = None, network_def=None, dataset_dir: str | None = None,
                      parity_split: str = "test", noise: str | None = None, seed: int | None = None,
                      synthetic_patients: int | None = None, model_version: str = "",
                      opset_version: int | None = None, series_rule: dict | None = None, signing_key: str = "",
                      eval_dir: str = "", ood_train_split: str = "train", ood_validation_split: str = "val",
                      target_acceptance: float = TARGET_ACCEPTANCE,
                      series_max_not_assessable: float = SERIES_MAX_NOT_ASSESSABLE) -> dict:
    """Export ``checkpoint`` to ``output`` (:func:`~robustmri.deploy.onnx.export.export_onnx`); what was written
    and the parity figures.

    ``dataset_dir``: None takes the data set the checkpoint was trained on (``model_metadata.json``); given
    (even "" for the embedded set), that one, with a warning when it is another. ``series_rule``: None takes the
    config's; ``eval_dir`` (default: the config's ``output_dir``) holds the
    bundle's test metrics of this checkpoint; ``model_version`` defaults to the bundle's version.
    """
    recorded = recorded_provenance(checkpoint)
    trained = recorded_protocol(recorded)  # the detector must see the training run's splits
    noise = noise if noise is not None else trained.get("noise") or "gaussian"
    seed = int(seed if seed is not None else trained.get("seed") or 0)
    if synthetic_patients is None:
        synthetic_patients = int(trained.get("synthetic_patients") or 300)
    data_options = {"dataset_dir": dataset_dir} if dataset_dir is not None else {}
    config = export_config(bundle_dir, checkpoint, spatial_size, network_padding, network_def, **data_options,
                           noise=noise, seed=seed, synthetic_patients=synthetic_patients)
    size = int(config.get_parsed_content("spatial_size"))
    network = config.get_parsed_content("network_def")  # on the CPU: ``network`` would move it to @device
    check_trained_network(network, checkpoint)
    network = load_weights(network, checkpoint).eval()
    data = config.get_parsed_content("data")
    warn_if_other_data(data, recorded, checkpoint)
    images = split_images(data, parity_split) if parity_requested(parity_split) else None
    detector = parity_requested(ood_train_split)
    provenance = checkpoint_provenance(checkpoint, eval_dir or config.get_parsed_content("output_dir"))
    return export_onnx(network, output, config.get_parsed_content("class_names"), size, checkpoint=checkpoint,
                       model_version=model_version or bundle_version(bundle_dir), parity_images=images,
                       opset_version=opset_version, preprocess=config.get_parsed_content("preprocess"),
                       series_rule=series_rule if series_rule is not None else config.get("series_rule"),
                       provenance=provenance, signing_key=signing_key or None,
                       ood_train=split_arrays(data, ood_train_split) if detector else None,
                       ood_validation=split_arrays(data, ood_validation_split)[0] if detector else None,
                       target_acceptance=target_acceptance, series_max_not_assessable=series_max_not_assessable)
