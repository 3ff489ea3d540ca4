"""Export a trained checkpoint to ONNX, with metadata, checked against PyTorch on the test split.

    python scripts/export_onnx.py --checkpoint bundle/models/model.pt --output bundle/models/model.onnx
    python scripts/export_onnx.py --checkpoint model.pt --output model.onnx --spatial_size 128 --network_padding 2 \
        --dataset_dir /data/figshare-brain-tumor
    python scripts/export_onnx.py --checkpoint model.pt --output model.onnx --parity_split none

The network is the bundle's PaperCNN (pass the same --spatial_size / --network_padding as in
training). The parity images are the protocol's split (``test`` by default: noisy test images,
as evaluated) of --dataset_dir, or of the embedded synthetic set when none is given. The bundle
does the same with ``python -m monai.bundle run exporting --config_file
"['configs/train.json','configs/export.json']"`` from ``bundle/``.
"""

from __future__ import annotations

import json
import logging
import os

import fire

from robustmri import CLASS_NAMES
from robustmri.deploy.export import bundle_version, export_onnx, parity_requested, split_images
from robustmri.evaluation.checkpoints import load_weights
from robustmri.networks import PaperCNN

BUNDLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "bundle")


def main(checkpoint: str = os.path.join(BUNDLE, "models", "model.pt"),
         output: str = os.path.join(BUNDLE, "models", "model.onnx"), spatial_size: int = 256,
         network_padding: int = 0, dataset_dir: str = "", parity_split: str = "test", noise: str = "gaussian",
         seed: int = 0, synthetic_patients: int = 300, model_version: str = "", opset_version: int | None = None):
    """Export ``checkpoint`` to ``output``; print what was written and the parity figures as JSON."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx"):  # their INFO lines are rewrite-pass chatter
        logging.getLogger(noisy).setLevel(logging.WARNING)
    network = load_weights(PaperCNN(spatial_size=spatial_size, padding=network_padding), checkpoint).eval()
    images = None
    if parity_requested(parity_split):
        from robustmri.data.protocol import build_protocol

        data = build_protocol(dataset_dir or None, spatial_size=spatial_size, noise=noise, seed=seed,
                              synthetic_patients=synthetic_patients)
        images = split_images(data, parity_split)
    result = export_onnx(network, output, CLASS_NAMES, spatial_size, checkpoint=checkpoint,
                         model_version=model_version or bundle_version(BUNDLE), parity_images=images,
                         opset_version=opset_version)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    fire.Fire(main)
