"""Infer task: class and probabilities of one study image, with the bundle's inference.json."""

import logging
from typing import Any, Callable, Dict, Sequence

import torch
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.bundle import BundleInferTask

from robustmri import INTENDED_USE

from lib.bundle import INFER_CONFIG, class_names, read_config

logger = logging.getLogger(__name__)


def raise_on_unreadable(parser) -> list[str]:
    """Make the bundle's file-reading transforms raise on an unreadable image; return the ids set.

    inference.json's ``preprocessing`` marks unreadable files and goes on (a batch of many
    files); one requested image must fail instead, with the error naming the file.
    """
    preprocessing = parser["preprocessing"]
    transforms = preprocessing.get("transforms", []) if isinstance(preprocessing, dict) else []
    ids = [f"preprocessing#transforms#{k}#on_error" for k, t in enumerate(transforms)
           if isinstance(t, dict) and "on_error" in t]
    for config_id in ids:
        parser[config_id] = "raise"
    return ids


class ClassificationInfer(BundleInferTask):
    """The bundle's classifier as a MONAI Label classification model.

    Everything comes from ``inference.json`` (read by lib.bundle, so with the trained
    ``spatial_size`` and ``network_padding``): the pre-transforms are its ``preprocessing``
    (robustmri.data.transforms.LoadPreprocessd, the preprocessing of training, set to raise on
    an unreadable image), the network is ``network_def``, the inferer ``inferer`` and the
    post-transforms ``postprocessing`` (softmax). MONAI Label infers "classification" only from
    a bundle folder name containing it, so the type is given here; the writer turns the
    probabilities into class names.
    """

    def __init__(self, path: str, conf: Dict[str, str], **kwargs):
        self.app_conf = dict(conf)  # read by _load_bundle_config, which the base class calls
        super().__init__(path, conf, type=InferType.CLASSIFICATION, add_post_restore=False, pre_filter=None,
                         post_filter=None, load_strict=True, **kwargs)
        if self.valid:
            self.class_names = class_names(self.bundle_config)

    def info(self) -> Dict[str, Any]:
        return {**super().info(), "intended_use": INTENDED_USE}

    def _load_bundle_config(self, path, config):
        parser = read_config(path, INFER_CONFIG, self.app_conf)
        raise_on_unreadable(parser)
        return parser

    def post_transforms(self, data=None) -> Sequence[Callable]:
        post = super().post_transforms(data)  # the base class unpacks a Compose, not a single transform
        return list(post) if isinstance(post, (list, tuple)) else [post]

    def writer(self, data: Dict[str, Any], extension=None, dtype=None):
        probabilities = torch.as_tensor(data[self.output_label_key]).float().reshape(-1).tolist()
        if len(probabilities) != len(self.class_names):
            raise ValueError(f"{self.bundle_config_path}: the network gives {len(probabilities)} outputs for "
                             f"{len(self.class_names)} class_names")
        best = max(range(len(probabilities)), key=probabilities.__getitem__)
        return None, {
            "class": self.class_names[best],
            "probabilities": dict(zip(self.class_names, probabilities)),
            "prediction": [{"idx": k, "label": name, "score": p}
                           for k, (name, p) in enumerate(zip(self.class_names, probabilities))],
            "intended_use": INTENDED_USE,
        }
