"""Train task: the bundle's ISP workflow (configs/isp.json) on the studies' labelled images."""

import json
import logging
import os
import time
from typing import Dict

from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.train.bundle import BundleConstants, BundleTrainTask

from robustmri.review.label_review import (
    LABEL_SUFFIX,
    LabelFileError,
    LabelledImage,
    read_label_file,
    write_training_catalog,
)

from lib.bundle import TRAIN_CONFIG, bundle_overrides, read_config
from lib.train_request import validate_train_request

logger = logging.getLogger(__name__)

#: Folder under the bundle that receives the studies' labels.csv (``dataset_dir`` points there).
CATALOG_DIR = os.path.join("eval", "monailabel_studies")
#: Fields MONAI Label's task runner adds to a train request before the task sees it: ``bundle_path``
#: (``AsyncTask.run``: the app's own bundle) and ``local_rank`` (``monailabel.interfaces.utils.app``, the
#: task process's ``--local_rank``). The HTTP routes check the client's request before the runner adds
#: them, so a client cannot send either.
RUNNER_FIELDS = ("bundle_path", "local_rank")
#: The last training's metrics (written after each training run by this task, shown in ``/info/``).
STATS_FILE = os.path.join("eval", "monailabel_train_stats.json")


class ISPConstants(BundleConstants):
    def configs(self):
        return [TRAIN_CONFIG]  # isp.json stands alone (train.json and the influence settings written in)


class ISPTrain(BundleTrainTask):
    """Retrain with Influence-based Sample Perturbation on the annotated studies.

    MONAI Label's own BundleTrainTask runs ``configs/isp.json`` with its stock overrides:
    ``train#trainer#max_epochs``, ``train#handlers`` (with the CheckpointLoader of the
    pretrained ``model.pt``), ``device`` and experiment tracking. Two things are this app's:

    - the data: the stock task hands the bundle ``train#dataset#data`` and does not turn
      classification label files into class indices. Here the labelled studies become a
      ``labels.csv`` (file, label_name, anonymous group) that the bundle's own data layer reads
      (``dataset_dir``), so the patient-grouped split and the preprocessing are the bundle's;
      ``val_split`` sets ``split_fractions`` (ISP needs a validation set);
    - ``influence_epoch``: by default the bundle's ratio of ``influence_epoch`` to ``epochs``
      (isp.json) applied to ``max_epochs``.

    Images are trained on as they are (``noise`` "none" unless ``--conf noise gaussian``);
    spatial size and padding are those of the checkpoint (lib.bundle).

    Every request is checked against lib.train_request's allow-list before anything runs (the
    server checks it too, and answers 422). After a run, the last epoch's metrics, the best
    validation accuracy and the ISP summary go to ``<bundle>/eval/monailabel_train_stats.json``,
    which :meth:`stats` (``/info/`` ``train_stats``) reports.
    """

    def __init__(self, path: str, conf: Dict[str, str], **kwargs):
        super().__init__(path, conf, const=ISPConstants(), load_strict=True, **kwargs)
        self.noise = conf.get("noise", "none")
        self.models = tuple(m.strip() for m in conf.get("models", "brain_tumour").split(",") if m.strip())
        self.tracking_settings = conf.get("tracking_settings", "")
        self._request: Dict = {}

    def _load_bundle_config(self, path, config):
        return read_config(path, TRAIN_CONFIG, self.conf)

    def config(self):
        options = super().config()
        options.update({"max_epochs": self._bundle_int("epochs"), "influence_epoch": 0, "val_split": 0.2,
                        "multi_gpu": False})
        return options

    def __call__(self, request, datastore: Datastore):
        self._check_runner_fields(request)
        validate_train_request({k: v for k, v in request.items() if k not in RUNNER_FIELDS}, self.models,
                               self.tracking_settings)
        started = time.time()
        # a fresh config per run: trained settings may have changed, and the stock task adds its
        # CheckpointLoader to the config's own train#handlers list
        self.bundle_config = self._load_bundle_config(self.bundle_path, self.bundle_config_path)
        # the bundle has no multi_gpu_train.json: the stock task would skip training on a multi-GPU machine
        request = {"max_epochs": self._bundle_int("epochs"), **request, "multi_gpu": False, "force_multi_gpu": False}
        self._request = request
        result = super().__call__(request, datastore)
        self._write_stats(started)
        return result

    def _check_runner_fields(self, request) -> None:
        """The values :data:`RUNNER_FIELDS` may have: this app's bundle, a process rank."""
        if request.get("bundle_path") not in (None, self.bundle_path):
            raise ValueError(f"train request: bundle_path must be this app's bundle, got {request['bundle_path']!r}")
        rank = request.get("local_rank", 0)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < 1024:
            raise ValueError(f"train request: local_rank must be a process rank (0..1023), got {rank!r}")

    def stats(self):
        """The last training run's metrics (``/info/`` ``train_stats``); ``{}`` before any."""
        path = os.path.join(self.bundle_path, STATS_FILE)
        if not os.path.isfile(path):
            return {}
        try:
            with open(path) as handle:
                return json.load(handle)
        except (OSError, json.JSONDecodeError) as err:
            return {"error": f"{path}: cannot read ({err})"}

    def _write_stats(self, started: float) -> None:
        """Summarise the run's ``history.json`` and ``influence_summary.json`` (written by the bundle) to STATS_FILE."""
        output_dir = os.path.join(self.bundle_path, "eval")
        history, summary = [], {}
        for name in ("history.json", "influence_summary.json"):
            path = os.path.join(output_dir, name)
            if os.path.isfile(path) and os.path.getmtime(path) >= started:  # written by this run
                with open(path) as handle:
                    if name == "history.json":
                        history = json.load(handle)
                    else:
                        summary = json.load(handle)
        accuracies = [(h["val_accuracy"], h["epoch"]) for h in history if h.get("val_accuracy") is not None]
        stats = {"finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "duration_s": round(time.time() - started, 1), "epochs": len(history),
                 "last_epoch": history[-1] if history else None,
                 "best_val_accuracy": max(accuracies)[0] if accuracies else None,
                 "best_epoch": max(accuracies)[1] if accuracies else None,
                 "n_train": summary.get("n_train"), "n_val": summary.get("n_val"),
                 "method": summary.get("method"), "influence_epoch": summary.get("epoch")}
        path = os.path.join(self.bundle_path, STATS_FILE)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as handle:
            json.dump(stats, handle, indent=2)

    def _bundle_int(self, config_id: str) -> int:
        return int(self.bundle_config.get_parsed_content(config_id))

    def _load_checkpoint(self, model_pytorch, pretrained, train_handlers):
        if pretrained:  # the stock method fails on os.path.exists(None) when asked not to load one
            super()._load_checkpoint(model_pytorch, pretrained, train_handlers)

    def _fetch_datalist(self, request, datastore: Datastore):
        """Labelled images with class indices; unusable label files are skipped and counted."""
        names = self.bundle_config.get_parsed_content("class_names")
        datalist, skipped = [], 0
        for item in datastore.datalist():
            try:
                label, group = read_label_file(item["label"], names)
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
        return datalist

    def _partition_datalist(self, datalist, request, shuffle=False):
        return datalist, None  # the bundle splits by patient group itself (split_fractions, below)

    def _update_overrides(self, overrides):
        request = self._request
        # the bundle's data layer reads the studies from labels.csv, not from a list of paths
        datalist = overrides.pop(self.const.key_train_dataset_data())
        catalog_dir = os.path.join(self.bundle_path, CATALOG_DIR)
        write_training_catalog([LabelledImage(d["id"], d["image"], d["label"], d["group"]) for d in datalist],
                               catalog_dir, self.bundle_config.get_parsed_content("class_names"))
        epochs = int(request["max_epochs"])
        influence_epoch = int(request.get("influence_epoch") or 0) or max(1, round(
            epochs * self._bundle_int("influence_epoch") / self._bundle_int("epochs")))
        if not 1 <= influence_epoch <= epochs:
            raise ValueError(f"influence_epoch must lie in 1..max_epochs ({epochs}), got {influence_epoch}")
        overrides.update({**bundle_overrides(self.bundle_path, self.conf), "dataset_dir": catalog_dir,
                          "influence_epoch": influence_epoch, "noise": self.noise, "on_error": "skip"})
        val_split = float(request.get("val_split", 0.2))
        if val_split >= 0:  # -1: the bundle's own split_fractions, as in MONAI Label's stock task
            if not 0.0 < val_split < 1.0:
                raise ValueError(f"val_split must lie in (0, 1), or be -1 for the bundle's split: ISP needs a "
                                 f"validation split, got {val_split}")
            overrides["split_fractions"] = [1.0 - val_split, val_split, 0.0]
        return overrides
