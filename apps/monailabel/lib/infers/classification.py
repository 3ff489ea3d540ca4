"""Infer task: class and probabilities of one study image, preprocessed exactly as in training."""

import logging
from typing import Any, Callable, Dict, Sequence

import torch
from monai.inferers import Inferer, SimpleInferer
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.bundle import BundleConstants, BundleInferTask

from robustmri.data.preprocessing import preprocess
from robustmri.data.readers import ImageReadError, read_image

from lib.bundle import INFER_CONFIGS, bundle_overrides, class_names, read_bundle_config

logger = logging.getLogger(__name__)


class ReadAndPreprocessd:
    """Replace ``data["image"]`` (a file path) by the network input [1, S, S] (robustmri.data.preprocessing)."""

    def __init__(self, spatial_size: int):
        self.spatial_size = int(spatial_size)

    def __call__(self, data: Dict[str, Any]) -> Dict[str, Any]:
        path = data["image"]
        try:
            image = preprocess(read_image(path), self.spatial_size)
        except ImageReadError as err:
            raise ValueError(f"{path}: cannot classify ({err.reason})") from err
        data["image"] = torch.from_numpy(image)[None]
        return data


class ClassificationInfer(BundleInferTask):
    """The bundle's classifier as a MONAI Label classification model.

    MONAI Label infers "classification" only from a bundle folder name containing it, so the type
    is set here. The bundle's own inference reads files itself (robustmri.deploy.inference), so the pre-
    and post-processing are given here with the same library functions.
    """

    def __init__(self, path: str, conf: Dict[str, str], **kwargs):
        self.overrides = bundle_overrides(conf)
        super().__init__(path, conf, type=InferType.CLASSIFICATION, add_post_restore=False, pre_filter=None,
                         post_filter=None, load_strict=True, **kwargs)
        if self.valid:
            self.spatial_size = int(self.bundle_config.get_parsed_content("spatial_size"))
            self.class_names = class_names(self.bundle_config)

    def _load_bundle_config(self, path, config):
        return read_bundle_config(path, INFER_CONFIGS, self.overrides)

    def pre_transforms(self, data=None) -> Sequence[Callable]:
        return [ReadAndPreprocessd(self.spatial_size)]

    def inferer(self, data=None) -> Inferer:
        return SimpleInferer()

    def post_transforms(self, data=None) -> Sequence[Callable]:
        return []

    def writer(self, data: Dict[str, Any], extension=None, dtype=None):
        probabilities = torch.softmax(torch.as_tensor(data[self.output_label_key]).float().reshape(-1), 0).tolist()
        best = max(range(len(probabilities)), key=probabilities.__getitem__)
        return None, {
            "class": self.class_names[best],
            "probabilities": dict(zip(self.class_names, probabilities)),
            "prediction": [{"idx": k, "label": name, "score": p}
                           for k, (name, p) in enumerate(zip(self.class_names, probabilities))],
        }


__all__ = ["ClassificationInfer", "ReadAndPreprocessd", "BundleConstants"]
