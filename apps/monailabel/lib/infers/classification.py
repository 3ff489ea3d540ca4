"""Infer task: class, probabilities and assessability of one study image, with the bundle's inference.json."""

import logging
import os
from typing import Any, Callable, Dict, Sequence

import torch
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.bundle import BundleInferTask

from robustmri import INTENDED_USE
from robustmri.abstention.fit import describe_state, ensure_state, scores_of
from robustmri.deploy.inference import NOT_ASSESSABLE
from robustmri.engine.model_metadata import file_sha256, read_calibration

from lib.bundle import INFER_CONFIG, class_names, read_config, served_checkpoint

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

    Abstention, as in the bundle's file inference: the checkpoint's abstention state
    (``models/model_abstention.pt``, fitted when training ended, or fitted on first use from the
    training data the checkpoint records; :func:`robustmri.abstention.fit.ensure_state`) scores the
    prepared image; the result holds ``assessable``, ``abstention_score`` and ``abstention`` (score
    name, threshold, where it was calibrated), and a not-assessable image gets ``"class": null``
    and a ``reason`` (its probabilities stay, for the annotator to see what the network computed).
    Where no state can be had (a model trained here on too few labels to fit it: a class without
    training images), ``assessable`` is null and ``abstention`` holds the ``error``.
    """

    def __init__(self, path: str, conf: Dict[str, str], **kwargs):
        self.app_conf = dict(conf)  # read by _load_bundle_config, which the base class calls
        super().__init__(path, conf, type=InferType.CLASSIFICATION, add_post_restore=False, pre_filter=None,
                         post_filter=None, load_strict=True, **kwargs)
        if self.valid:
            self.class_names = class_names(self.bundle_config)
            # MONAI Label serves models/model.pt; --conf checkpoint names another file of models/ (lib.bundle)
            self.path = [served_checkpoint(path, conf)]
            # a request without model_filename gets the first of MONAI Label's list (shortest name first): the
            # served one must lead it, or model.pt would answer after all
            served = os.path.basename(self.path[0])
            names = list(self._config.get("model_filename") or [])
            self._config["model_filename"] = [served] + [name for name in names if name != served]
            self._warn_if_stale()

    def calibration(self) -> Dict[str, Any] | None:
        """The served checkpoint's site calibration in brief, or None: when, on how many images, and whether it
        was calibrated from the ``model.pt`` there now (training or an upload replaces ``model.pt``, never the
        calibrated file, which then holds the older weights until it is calibrated again)."""
        served = self.get_path()
        record = read_calibration(served) if served and os.path.isfile(served) else None
        if record is None:
            return None
        source = os.path.join(os.path.dirname(served), record["source_checkpoint"]["file"])
        current = os.path.isfile(source) and file_sha256(source) == record["source_checkpoint"]["sha256"]
        return {"file": record["file"], "date": record["date"], "images": record["images"]["n"],
                "source_checkpoint": record["source_checkpoint"]["file"], "source_current": current}

    def _warn_if_stale(self) -> None:
        calibration = self.calibration()
        if calibration and not calibration["source_current"]:
            logger.warning("%s was calibrated from an earlier %s (trained or uploaded since): it serves the older "
                           "weights; calibrate again (configs/calibrate.json)", calibration["file"],
                           calibration["source_checkpoint"])

    def info(self) -> Dict[str, Any]:
        served = self.get_path(validate=False)
        return {**super().info(), "intended_use": INTENDED_USE,
                "checkpoint": os.path.basename(served) if served else None, "calibration": self.calibration()}

    def _load_bundle_config(self, path, config):
        parser = read_config(path, INFER_CONFIG, self.app_conf)
        raise_on_unreadable(parser)
        return parser

    def checkpoint(self, data=None) -> str:
        """The checkpoint the network of this request was loaded from (a valid ``model_filename`` of the request, as
        MONAI Label's ``_get_network`` chooses it, else ``models/model.pt``)."""
        name = (data or {}).get("model_filename") if self._config.get("model_filename") else None
        name = name if isinstance(name, str) or not name else name[0]
        if name:
            chosen = os.path.join(os.path.dirname(self.path[0]), name)
            if os.path.exists(chosen):
                return chosen
        return self.get_path()

    def abstention_state(self, data=None):
        """The abstention state of the request's checkpoint, read (or fitted) again when the checkpoint changes
        (training, an upload)."""
        checkpoint = self.checkpoint(data)
        stamp = (checkpoint, os.stat(checkpoint).st_mtime_ns)
        if getattr(self, "_abstention", (None, None))[0] != stamp:
            self._abstention = (stamp, ensure_state(checkpoint, bundle_dir=self.bundle_path))
        return self._abstention[1]

    def run_inferer(self, data: Dict[str, Any], convert_to_batch=True, device="cuda"):
        data = super().run_inferer(data, convert_to_batch, device)
        try:
            state = self.abstention_state(data)
        except (FileNotFoundError, ValueError) as error:
            # e.g. trained here on too few labels to fit it (a class without training images): the annotator
            # still sees the class, marked as not judged, with the reason
            logger.error("no abstention state: %s", error)
            data["assessable"], data["abstention_score"] = None, None
            data["abstention"] = {"error": f"no abstention state: {error}"}
            return data
        image = torch.as_tensor(data[self.input_key])
        score = float(scores_of(state, self._get_network(device, data), image[None] if convert_to_batch else image)[0])
        data["abstention_score"], data["assessable"] = score, bool(state.accepts([score])[0])
        data["abstention"] = describe_state(state)
        return data

    def post_transforms(self, data=None) -> Sequence[Callable]:
        post = super().post_transforms(data)  # the base class unpacks a Compose, not a single transform
        return list(post) if isinstance(post, (list, tuple)) else [post]

    def writer(self, data: Dict[str, Any], extension=None, dtype=None):
        probabilities = torch.as_tensor(data[self.output_label_key]).float().reshape(-1).tolist()
        if len(probabilities) != len(self.class_names):
            raise ValueError(f"{self.bundle_config_path}: the network gives {len(probabilities)} outputs for "
                             f"{len(self.class_names)} class_names")
        best = max(range(len(probabilities)), key=probabilities.__getitem__)
        assessable = data.get("assessable")
        result = {
            "class": self.class_names[best] if assessable is not False else None,
            "probabilities": dict(zip(self.class_names, probabilities)),
            "prediction": [{"idx": k, "label": name, "score": p}
                           for k, (name, p) in enumerate(zip(self.class_names, probabilities))],
            "intended_use": INTENDED_USE,
            "assessable": assessable,
            "abstention_score": data.get("abstention_score"),
            "abstention": data.get("abstention"),
        }
        if assessable is False:
            result["reason"] = NOT_ASSESSABLE
        return None, result
