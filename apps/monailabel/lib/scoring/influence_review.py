"""Scoring method: the review order's score and rank of every labelled image, stored in its image info."""

import logging
import os
import time

import torch
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.scoring import ScoringMethod

from robustmri.review.label_review import (
    LabelFileError,
    LabelledImage,
    labelled_review_order,
    read_label_file,
    score_labelled_images,
)
from robustmri.review.orders import DEFAULT_ORDER, ReviewOrderError

from lib.bundle import INFER_CONFIG, TRAIN_CONFIG, class_names, load_network, read_config

logger = logging.getLogger(__name__)

#: Key of the per-image entry in the datastore's image info.
INFO_KEY = "influence_review"
#: ``--conf`` key naming the review order (robustmri.review.orders); the default is the measured one.
ORDER_CONF = "review_order"


def configured_order(conf: dict) -> str:
    """The review order ``--conf review_order`` names (default: the measured one), checked: an unknown name or
    one that needs a validation set is a one-line error naming the usable ones."""
    name = str(conf.get(ORDER_CONF, DEFAULT_ORDER)).strip()
    try:
        labelled_review_order(name)
    except ReviewOrderError as err:
        raise ValueError(f"--conf {ORDER_CONF}: {err}") from None
    return name


def percentile(rank: int, of: int) -> float:
    """Share of the scored images at least as suspicious as rank ``rank`` of ``of``, in percent
    (rank 1 of 200: 0.5, "in the most suspicious 0.5 %")."""
    return round(100.0 * rank / of, 2)


def labelled_images(datastore: Datastore, names) -> tuple[list[LabelledImage], list[dict]]:
    """Every image with a final label, label parsed; unusable label files listed with the reason."""
    items, skipped = [], []
    for image_id in datastore.get_labeled_images(DefaultLabelTag.FINAL):
        label_path = datastore.get_label_uri(image_id, DefaultLabelTag.FINAL)
        try:
            label, group = read_label_file(label_path, names)
        except LabelFileError as err:
            skipped.append({"id": image_id, "reason": err.reason})
            continue
        items.append(LabelledImage(image_id, datastore.get_image_uri(image_id), label, group))
    return items, skipped


class InfluenceReviewScoring(ScoringMethod):
    """Every labelled image ranked by the review order (``--conf review_order``, robustmri.review.label_review).

    The network, its checkpoint and the trained spatial size come from the bundle's
    inference.json, the damping (of the ``self_influence`` order) from isp.json, the config the app trains
    with (``influence_damping``, the setting ISR, ISP and the audit share; ``--conf influence_damping``
    overrides it). Both are read at each run, so a retrained model or an edited bundle is used without a
    restart. Each image's info gets the order's ``score``, ``rank``, ``of``, ``percentile``, the given
    ``label``, the ``order``, and the model's ``predicted`` class and ``probabilities``.
    """

    def __init__(self, bundle_path: str, conf: dict):
        self.order = configured_order(conf)
        super().__init__(f"Label review: every labelled image ranked by the {self.order!r} order with the current "
                         "model; rank 1 = label most suspicious")
        self.bundle_path = bundle_path
        self.conf = dict(conf)

    def damping(self) -> float:
        return float(read_config(self.bundle_path, TRAIN_CONFIG, self.conf).get_parsed_content("influence_damping"))

    def __call__(self, request, datastore: Datastore):
        device = "cuda" if torch.cuda.is_available() and request.get("device", "cuda") != "cpu" else "cpu"
        parser = read_config(self.bundle_path, INFER_CONFIG, self.conf)
        network = load_network(parser, device)
        damping = self.damping()
        names = class_names(parser)
        items, skipped = labelled_images(datastore, names)
        if len(items) < 2:
            logger.warning("label review: %d usable labelled image(s); nothing scored", len(items))
            return {"scored": 0, "skipped": skipped, "order": self.order}
        result = score_labelled_images(network, items, int(parser.get_parsed_content("spatial_size")), damping,
                                       device, preprocess=parser.get_parsed_content("preprocess"), order=self.order)
        now = int(time.time())
        model_ts = int(os.path.getmtime(parser.get_parsed_content("checkpoint")))
        total = len(result["scores"])
        infos = {image_id: {INFO_KEY: {
            "score": entry["score"], "rank": entry["rank"], "of": total, "percentile": percentile(entry["rank"], total),
            "label": names[entry["label"]], "order": self.order, "predicted": names[entry["predicted"]],
            "probabilities": dict(zip(names, entry["probabilities"])), "damping": damping, "model_ts": model_ts,
            "ts": now}}
            for image_id, entry in result["scores"].items()}
        if hasattr(datastore, "update_image_infos"):  # lib.datastore: one write for all images
            datastore.update_image_infos(infos)
        else:
            for image_id, info in infos.items():
                datastore.update_image_info(image_id, info)
        skipped += result["skipped"]
        order = sorted(result["scores"].items(), key=lambda kv: kv[1]["rank"])
        return {"scored": total, "skipped": skipped, "damping": damping, "order": self.order,
                "most_suspicious": [{"id": i, "score": e["score"], "rank": e["rank"], "percentile": percentile(e["rank"], total)}
                                for i, e in order[:10]]}
