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
images, as evaluated) of the data set the model was trained on (``training_data.json`` beside the
checkpoint; the embedded synthetic set for a model trained on it) unless --dataset_dir
names another, and then a warning names both (``--dataset_dir ""``: the embedded set). The
bundle does the same with ``python -m monai.bundle run exporting --config_file configs/export.json``
from ``bundle/``.

The model's metadata records what trained it (``provenance``, from ``model_metadata.json`` beside
the checkpoint, with the bundle's test metrics of this checkpoint from ``--eval_dir``, default
``bundle/eval``) and an integrity digest that every load verifies; ``--signing_key`` (an Ed25519
private key, PEM: ``scripts/model_keys.py``) signs it.

The out-of-distribution detector (``robustmri.abstention.mahalanobis``, the ``ood_score`` output) is the checkpoint's
abstention state (``model_abstention.pt`` beside ``model.pt``, written when training ended or by a site
calibration), exported as is with its threshold; ``--series_max_not_assessable`` (0.5) is the abstention rule written
beside it. A checkpoint without a state gets one first, fitted on the protocol's training split
(``--ood_train_split``), its threshold calibrated on the validation split (``--ood_validation_split``) to accept
``--target_acceptance`` of it (0.95), and saved beside the checkpoint. They need the data the model was trained on (by default; ``--seed``, ``--noise`` and ``--synthetic_patients`` default to what the checkpoint's training recorded in
``model_metadata.json``, and a warning says when the loaded splits differ from the recorded fingerprint). ``--ood_train_split none`` exports without a detector: DICOM
inference refuses such a model.
"""

from __future__ import annotations

import json
import logging
import os

import fire

from robustmri.deploy.onnx.export_checkpoint import export_checkpoint, monai_logs_to_stderr
from robustmri.abstention.mahalanobis import TARGET_ACCEPTANCE
from robustmri.deploy.onnx.ood import SERIES_MAX_NOT_ASSESSABLE

BUNDLE = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "bundle"))


def _series_rule(path: str) -> dict:
    """The series rule of a JSON file (``--series_rule``): plain values, never evaluated."""
    with open(path) as handle:
        values = json.load(handle)
    if not isinstance(values, dict):
        raise SystemExit(f"{path}: the series rule must be a JSON object")
    return values


def main(checkpoint: str = os.path.join(BUNDLE, "models", "model.pt"),
         output: str = os.path.join(BUNDLE, "models", "model.onnx"), spatial_size: int | None = None,
         network_padding: int | None = None, network_def=None, dataset_dir: str | None = None,
         parity_split: str = "test",
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
    result = export_checkpoint(BUNDLE, checkpoint, output, spatial_size, network_padding, network_def,
                               dataset_dir=dataset_dir, parity_split=parity_split, noise=noise, seed=seed,
                               synthetic_patients=synthetic_patients, model_version=model_version,
                               opset_version=opset_version,
                               series_rule=_series_rule(series_rule) if series_rule else None,
                               signing_key=signing_key, eval_dir=eval_dir, ood_train_split=ood_train_split,
                               ood_validation_split=ood_validation_split, target_acceptance=target_acceptance,
                               series_max_not_assessable=series_max_not_assessable)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda result: None)  # main prints its JSON; fire would print the dict again
