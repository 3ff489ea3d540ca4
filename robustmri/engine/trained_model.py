"""A checkpoint the bundle trained, rebuilt as it was trained: its config, network and training data.

The network is the bundle's ``network_def`` (``configs/inference.json``, which reads ``train.json``),
rebuilt as the checkpoint was trained: the spatial size and network padding come from
``model_metadata.json`` beside the checkpoint (training writes it; ``train.json``'s defaults when
there is none). The data are those the checkpoint was trained on: the folder recorded in
``training_data.json`` beside it, and ``seed``, ``noise`` and ``synthetic_patients`` as the training
recorded them; a warning says when the loaded splits differ from the recorded fingerprint.
Export (its detector and parity images) and the abstention state fitted after the fact
(:func:`robustmri.abstention.fit.ensure_state`) both read a checkpoint this way.
"""

from __future__ import annotations

import ast
import copy
import json
import logging
import os

from robustmri.engine.checkpoint import load_weights
from robustmri.engine.model_metadata import data_provenance, metadata_path, read_trained
from robustmri.engine.workflow import load_workflow
from robustmri.influence.adapter import unwrap
from robustmri.outputs import read_json

logger = logging.getLogger(__name__)


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


def trained_config(bundle_dir: str | os.PathLike, checkpoint: str, spatial_size: int | None = None,
                   network_padding: int | None = None, network_def=None, **overrides):
    """The inference config of the bundle in ``bundle_dir`` for ``checkpoint`` (MONAI's ConfigParser).

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
    the abstention score would be fitted, and its threshold calibrated, on other splits."""
    recorded = (provenance.get("data") or {}).get("fingerprint_sha256")
    if recorded and data_provenance(data)["fingerprint_sha256"] != recorded:
        logger.warning("the data loaded for %s are not the data it was trained on (fingerprint differs): the "
                       "abstention score and its threshold are fitted on these splits; pass --dataset_dir, "
                       "--seed and --noise as in training", os.path.basename(checkpoint))


def trained_model(bundle_dir: str | os.PathLike, checkpoint: str, spatial_size: int | None = None,
                  network_padding: int | None = None, network_def=None, dataset_dir: str | None = None,
                  noise: str | None = None, seed: int | None = None, synthetic_patients: int | None = None,
                  network=None):
    """``(config, network, data)`` of ``checkpoint``: its inference config, its network with the checkpoint's
    weights (CPU, eval mode) and the protocol data it was trained on.

    ``network``: a network already built (e.g. a config's own ``network_def``), used, on a copy with the
    checkpoint's weights, instead of building the config's ``network_def``.

    ``dataset_dir``: None takes the data set the checkpoint was trained on (``training_data.json``);
    given (even "" for the embedded set), that one, with a warning when it is another. ``noise``,
    ``seed`` and ``synthetic_patients`` default to what the training recorded.
    """
    recorded = recorded_provenance(checkpoint)
    trained = recorded_protocol(recorded)
    noise = noise if noise is not None else trained.get("noise") or "gaussian"
    seed = int(seed if seed is not None else trained.get("seed") or 0)
    if synthetic_patients is None:
        synthetic_patients = int(trained.get("synthetic_patients") or 300)
    data_options = {"dataset_dir": dataset_dir} if dataset_dir is not None else {}
    config = trained_config(bundle_dir, checkpoint, spatial_size, network_padding, network_def, **data_options,
                            noise=noise, seed=seed, synthetic_patients=synthetic_patients)
    if network is None:
        network = config.get_parsed_content("network_def")  # on the CPU: ``network`` would move it to @device
    else:
        network = copy.deepcopy(unwrap(network)).cpu()
    check_trained_network(network, checkpoint)
    network = load_weights(network, checkpoint).eval()
    data = config.get_parsed_content("data")
    warn_if_other_data(data, recorded, checkpoint)
    return config, network, data
