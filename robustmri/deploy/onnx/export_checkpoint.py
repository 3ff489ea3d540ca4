"""Export a checkpoint the bundle trained, as the bundle's inference config rebuilds it, with its detector.

The network is the bundle's ``network_def`` (``configs/inference.json``, which reads ``train.json``),
rebuilt as the checkpoint was trained: the spatial size and network padding come from
``model_metadata.json`` beside the checkpoint (training writes it; ``train.json``'s defaults when
there is none) (:mod:`robustmri.engine.trained_model`). The detector is the checkpoint's abstention state
(``model_abstention.pt`` beside ``model.pt``, written when training ended or by a site calibration); a
checkpoint without one gets it fitted on the data it was trained on and saved beside it first
(:func:`robustmri.abstention.fit.ensure_state`): ``seed``, ``noise`` and ``synthetic_patients`` default to what
the training recorded, and a warning says when the loaded splits differ from the recorded fingerprint.
``scripts/export_onnx.py`` is its command line.
"""

from __future__ import annotations

import logging
import os
import sys

from robustmri.deploy.onnx.export import (
    bundle_version,
    checkpoint_provenance,
    export_onnx,
    parity_requested,
    split_images,
)
from robustmri.abstention.fit import ensure_state
from robustmri.abstention.mahalanobis import TARGET_ACCEPTANCE
from robustmri.deploy.onnx.ood import SERIES_MAX_NOT_ASSESSABLE
from robustmri.engine.trained_model import trained_model

logger = logging.getLogger("export_onnx")


def monai_logs_to_stderr() -> None:
    """MONAI's loggers print to stdout; move them to stderr, so that stdout is the JSON report alone."""
    for name, monai_logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith("monai") and isinstance(monai_logger, logging.Logger):
            for handler in monai_logger.handlers:
                if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
                    handler.setStream(sys.stderr)




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

    ``target_acceptance``, ``ood_train_split`` and ``ood_validation_split`` apply only when the checkpoint has no
    abstention state yet (``ood_train_split`` "none": no detector).
    ``dataset_dir``: None takes the data set the checkpoint was trained on (``model_metadata.json``); given
    (even "" for the embedded set), that one, with a warning when it is another. ``series_rule``: None takes the
    config's; ``eval_dir`` (default: the config's ``output_dir``) holds the
    bundle's test metrics of this checkpoint; ``model_version`` defaults to the bundle's version.
    """
    config, network, data = trained_model(bundle_dir, checkpoint, spatial_size, network_padding, network_def,
                                          dataset_dir=dataset_dir, noise=noise, seed=seed,
                                          synthetic_patients=synthetic_patients)
    images = split_images(data, parity_split) if parity_requested(parity_split) else None
    # the checkpoint's abstention state as saved beside it (a site calibration's threshold included); fitted on
    # the training data and saved there first when the checkpoint has none
    state = (ensure_state(checkpoint, network=network, data=data, target_acceptance=target_acceptance,
                          train_split=ood_train_split, validation_split=ood_validation_split)
             if parity_requested(ood_train_split) else None)
    provenance = checkpoint_provenance(checkpoint, eval_dir or config.get_parsed_content("output_dir"))
    return export_onnx(network, output, config.get_parsed_content("class_names"),
                       int(config.get_parsed_content("spatial_size")), checkpoint=checkpoint,
                       model_version=model_version or bundle_version(bundle_dir), parity_images=images,
                       opset_version=opset_version, preprocess=config.get_parsed_content("preprocess"),
                       series_rule=series_rule if series_rule is not None else config.get("series_rule"),
                       provenance=provenance, signing_key=signing_key or None, abstention=state,
                       series_max_not_assessable=series_max_not_assessable)
