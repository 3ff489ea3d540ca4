"""Export a trained checkpoint to ONNX, with metadata, checked against PyTorch on the test split.

    python scripts/export_onnx.py --checkpoint bundle/models/model.pt --output bundle/models/model.onnx
    python scripts/export_onnx.py --checkpoint model.pt --output model.onnx --dataset_dir /data/figshare-brain-tumor
    python scripts/export_onnx.py --checkpoint model.pt --output model.onnx \
        --network_def "{'_target_': 'DenseNet121', 'spatial_dims': 2, 'in_channels': 1, 'out_channels': 3}"
    python scripts/export_onnx.py --checkpoint model.pt --output model.onnx --spatial_size 128 --network_padding 2
    python scripts/export_onnx.py --checkpoint model.pt --output model.onnx --parity_split none
    python scripts/export_onnx.py --checkpoint model.pt --output model.onnx --signing_key keys/model_signing.pem

The network is the bundle's ``network_def`` (``configs/inference.json``, which reads ``train.json``),
rebuilt as the checkpoint was trained: the spatial size and network padding come from
``model_metadata.json`` beside the checkpoint (training writes it; ``train.json``'s defaults when
there is none), so right after ``make demo`` no size argument is needed. ``--spatial_size`` and
``--network_padding`` override them; ``--network_def`` replaces the network (as on the bundle's
command line: a dict, or its JSON or Python text) and must be given for a checkpoint trained with
another network. The parity images are the protocol's split (``test`` by default: noisy test
images, as evaluated) of --dataset_dir, or of the embedded synthetic set when none is given. The
bundle does the same with ``python -m monai.bundle run exporting --config_file configs/export.json``
from ``bundle/``.

The model's metadata records what trained it (``provenance``, from ``model_metadata.json`` beside
the checkpoint, with the bundle's test metrics of this checkpoint from ``--eval_dir``, default
``bundle/eval``) and an integrity digest that every load verifies; ``--signing_key`` (an Ed25519
private key, PEM: ``scripts/model_keys.py``) signs it.

The out-of-distribution detector (``robustmri.deploy.ood``, the ``ood_score`` output) is fitted on the
protocol's training split (``--ood_train_split``) and its threshold calibrated on the validation split
(``--ood_validation_split``) to accept ``--target_acceptance`` of it (0.95); ``--series_max_not_assessable``
(0.5) is the abstention rule written beside it. Give the data the model was trained on (``--dataset_dir``;
``--seed``, ``--noise`` and ``--synthetic_patients`` default to what the checkpoint's training recorded in
``model_metadata.json``, and a warning says when the loaded splits differ from the recorded fingerprint). ``--ood_train_split none`` exports without a detector: DICOM
inference refuses such a model.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import sys

import fire

from robustmri.deploy.export import (
    bundle_version,
    checkpoint_provenance,
    export_onnx,
    parity_requested,
    split_arrays,
    split_images,
)
from robustmri.deploy.ood import SERIES_MAX_NOT_ASSESSABLE, TARGET_ACCEPTANCE
from robustmri.engine.model_metadata import metadata_path, read_trained
from robustmri.engine.workflow import load_workflow
from robustmri.evaluation.checkpoints import load_weights
from robustmri.outputs import read_json

BUNDLE = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "bundle"))


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


def export_config(checkpoint: str, spatial_size: int | None = None, network_padding: int | None = None,
                  network_def=None, **overrides):
    """The bundle's inference config for ``checkpoint`` (MONAI's ConfigParser), as the bundle's export reads it.

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
    return load_workflow(BUNDLE, ["inference.json"], settings, workflow_type=None).parser


def check_trained_network(network, checkpoint: str) -> None:
    """Refuse a network of another class than ``model_metadata.json`` records for ``checkpoint``."""
    record = read_trained(checkpoint)
    built = f"{type(network).__module__}.{type(network).__qualname__}"
    trained = (record or {}).get("network")
    if trained and trained != built:
        raise ValueError(f"{checkpoint} was trained with {trained} (model_metadata.json) but network_def builds "
                         f"{built}: pass the training network with --network_def")


def monai_logs_to_stderr() -> None:
    """MONAI's loggers print to stdout; move them to stderr, so that stdout is the JSON report alone."""
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith("monai") and isinstance(logger, logging.Logger):
            for handler in logger.handlers:
                if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
                    handler.setStream(sys.stderr)


def _series_rule(path: str) -> dict:
    """The series rule of a JSON file (``--series_rule``): plain values, never evaluated."""
    with open(path) as handle:
        values = json.load(handle)
    if not isinstance(values, dict):
        raise SystemExit(f"{path}: the series rule must be a JSON object")
    return values


def _recorded_provenance(checkpoint: str) -> dict:
    """The ``provenance`` record of ``model_metadata.json`` beside the checkpoint; {} when there is none."""
    try:
        return read_json(metadata_path(checkpoint), missing={}).get("provenance") or {}
    except ValueError:  # unreadable JSON: read_trained (the network check) says so
        return {}


def _recorded_protocol(provenance: dict) -> dict:
    """The protocol settings (seed, noise, synthetic_patients) the training run recorded in its provenance."""
    return {**(provenance.get("protocol") or {}),
            **{k: v for k, v in (provenance.get("data") or {}).items() if k == "synthetic_patients"}}


def _check_same_data(data, provenance: dict, checkpoint: str) -> None:
    """Warn when the data loaded here are not the data the checkpoint was trained on (by the recorded fingerprint):
    the detector would be fitted, and its threshold calibrated, on other splits."""
    from robustmri.engine.model_metadata import data_provenance

    recorded = (provenance.get("data") or {}).get("fingerprint_sha256")
    if recorded and data_provenance(data)["fingerprint_sha256"] != recorded:
        logging.getLogger("export_onnx").warning(
            "the data loaded for export are not the data %s was trained on (fingerprint differs): the "
            "out-of-distribution detector and its threshold are fitted on these splits; pass --dataset_dir, "
            "--seed and --noise as in training", os.path.basename(checkpoint))


def main(checkpoint: str = os.path.join(BUNDLE, "models", "model.pt"),
         output: str = os.path.join(BUNDLE, "models", "model.onnx"), spatial_size: int | None = None,
         network_padding: int | None = None, network_def=None, dataset_dir: str = "", parity_split: str = "test",
         noise: str | None = None, seed: int | None = None, synthetic_patients: int | None = None,
         model_version: str = "",
         opset_version: int | None = None, series_rule: str = "", signing_key: str = "", eval_dir: str = "",
         ood_train_split: str = "train", ood_validation_split: str = "val",
         target_acceptance: float = TARGET_ACCEPTANCE,
         series_max_not_assessable: float = SERIES_MAX_NOT_ASSESSABLE) -> dict:
    """Export ``checkpoint`` to ``output``; print what was written and the parity figures as JSON, and return them."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx"):  # their INFO lines are rewrite-pass chatter
        logging.getLogger(noisy).setLevel(logging.WARNING)
    monai_logs_to_stderr()
    recorded = _recorded_provenance(checkpoint)
    trained = _recorded_protocol(recorded)  # the detector must see the training run's splits
    noise = noise if noise is not None else trained.get("noise") or "gaussian"
    seed = int(seed if seed is not None else trained.get("seed") or 0)
    if synthetic_patients is None:
        synthetic_patients = int(trained.get("synthetic_patients") or 300)
    config = export_config(checkpoint, spatial_size, network_padding, network_def, dataset_dir=dataset_dir,
                           noise=noise, seed=seed, synthetic_patients=synthetic_patients)
    size = int(config.get_parsed_content("spatial_size"))
    network = config.get_parsed_content("network_def")  # on the CPU: ``network`` would move it to @device
    check_trained_network(network, checkpoint)
    network = load_weights(network, checkpoint).eval()
    data = config.get_parsed_content("data")
    _check_same_data(data, recorded, checkpoint)
    images = split_images(data, parity_split) if parity_requested(parity_split) else None
    detector = parity_requested(ood_train_split)
    provenance = checkpoint_provenance(checkpoint, eval_dir or config.get_parsed_content("output_dir"))
    result = export_onnx(network, output, config.get_parsed_content("class_names"), size, checkpoint=checkpoint,
                         model_version=model_version or bundle_version(BUNDLE), parity_images=images,
                         opset_version=opset_version, preprocess=config.get_parsed_content("preprocess"),
                         series_rule=_series_rule(series_rule) if series_rule else config.get("series_rule"),
                         provenance=provenance, signing_key=signing_key or None,
                         ood_train=split_arrays(data, ood_train_split) if detector else None,
                         ood_validation=split_arrays(data, ood_validation_split)[0] if detector else None,
                         target_acceptance=target_acceptance, series_max_not_assessable=series_max_not_assessable)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda result: None)  # main prints its JSON; fire would print the dict again
