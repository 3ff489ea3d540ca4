"""Train task: the bundle's ISP workflow (train.json + isp.json) on the studies' labelled images."""

import logging
import os
from typing import Dict

import monai.bundle
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.train.bundle import BundleTrainTask

from robustmri.review.label_review import (
    LABEL_SUFFIX,
    LabelFileError,
    LabelledImage,
    read_label_file,
    write_training_catalog,
)

from lib.bundle import bundle_overrides

logger = logging.getLogger(__name__)

TRAIN_CONFIGS = ("train.json", "isp.json")


class ISPTrain(BundleTrainTask):
    """Retrain with Influence-based Sample Perturbation on the annotated studies.

    The stock task hands the bundle ``train#dataset#data`` and does not turn classification
    labels into class indices. Here the labelled studies become a ``labels.csv`` (file,
    label_name, anonymous group) that the bundle's own data layer reads (``dataset_dir``), so
    the ISP handler, the patient-grouped split and the preprocessing are the bundle's.
    Images are trained on as they are (``noise`` "none" unless ``--conf noise gaussian``).
    """

    def __init__(self, path: str, conf: Dict[str, str], **kwargs):
        super().__init__(path, conf, **kwargs)
        self.overrides = bundle_overrides(conf)
        self.noise = conf.get("noise", "none")
        self.class_names = None
        self._request: Dict = {}

    def config(self):
        options = super().config()
        options.update({"max_epochs": 40, "influence_epoch": 0, "val_split": 0.2, "multi_gpu": False})
        return options

    def __call__(self, request, datastore: Datastore):
        self._request = dict(request)
        return super().__call__(request, datastore)

    def _fetch_datalist(self, request, datastore: Datastore):
        """Labelled images with class indices; unusable label files are skipped and counted."""
        class_names = self.bundle_config.get_parsed_content("class_names")
        datalist, skipped = [], 0
        for item in datastore.datalist():
            try:
                label, group = read_label_file(item["label"], class_names)
            except LabelFileError as err:
                logger.warning("not trained on: %s", err)
                skipped += 1
                continue
            name = os.path.basename(item["label"])
            image_id = name[: -len(LABEL_SUFFIX)] if name.endswith(LABEL_SUFFIX) else os.path.splitext(name)[0]
            datalist.append({"image": item["image"], "label": label, "group": group, "id": image_id})
        logger.info("training on %d labelled image(s); %d label file(s) skipped", len(datalist), skipped)
        if len(datalist) < 2:
            raise ValueError(f"need at least 2 labelled images to train, found {len(datalist)} ({skipped} skipped)")
        self.class_names = tuple(class_names)
        return datalist

    def _partition_datalist(self, datalist, request, shuffle=False):
        return datalist, None  # the bundle splits by patient group itself (split_fractions below)

    def _update_overrides(self, overrides):
        request = self._request
        datalist = overrides.pop(self.const.key_train_dataset_data())
        overrides.pop(self.const.key_validate_dataset_data(), None)
        # isp.json takes "train" from train.json by macro, so ids inside it cannot be overridden:
        # the epoch count goes through "epochs", and the stock task's CheckpointLoader (pretrained)
        # joins the ISP handler in "method_handlers"
        overrides.pop(self.const.key_train_trainer_max_epochs(), None)
        loaders = [h for h in overrides.pop(self.const.key_train_handlers(), [])
                   if isinstance(h, dict) and h.get("_target_") == "CheckpointLoader"]
        overrides["method_handlers"] = [*loaders, "@isp"]
        catalog_dir = os.path.join(self.bundle_path, "eval", "monailabel_studies")
        write_training_catalog([LabelledImage(d["id"], d["image"], d["label"], d["group"]) for d in datalist],
                               catalog_dir, self.class_names)
        epochs = int(request.get("max_epochs", 40))
        influence_epoch = int(request.get("influence_epoch") or max(1, round(0.75 * epochs)))
        val_split = float(request.get("val_split", 0.2))
        if not 0.0 < val_split < 1.0:
            raise ValueError(f"val_split must lie in (0, 1): ISP needs a validation split, got {val_split}")
        overrides.update({"dataset_dir": catalog_dir, "epochs": epochs, "influence_epoch": influence_epoch,
                          "split_fractions": [1.0 - val_split, val_split, 0.0], "noise": self.noise,
                          "on_error": "skip", **self.overrides})
        return overrides

    def run_single_gpu(self, request, overrides):
        monai.bundle.run(run_id="training", meta_file=self.bundle_metadata_path,
                         config_file=[os.path.join(self.bundle_path, "configs", name) for name in TRAIN_CONFIGS],
                         **overrides)
