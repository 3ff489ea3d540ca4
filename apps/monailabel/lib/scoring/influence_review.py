"""Scoring method: influence review score of every labelled image, stored in its image info."""

import logging
import os
import time

import torch
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.scoring import ScoringMethod

from robustmri.review.label_review import LabelFileError, LabelledImage, read_label_file, score_labelled_images

from lib.bundle import bundle_overrides, class_names, load_network

logger = logging.getLogger(__name__)

#: Key of the per-image entry in the datastore's image info.
INFO_KEY = "influence_review"


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
    """Self-influence of each labelled image under the current model (robustmri.review.label_review)."""

    def __init__(self, bundle_path: str, conf: dict, damping: float = 0.01):
        super().__init__("Influence review: self-influence of every labelled image with the current model; "
                         "most negative = label most suspicious")
        self.bundle_path = bundle_path
        self.overrides = bundle_overrides(conf)
        self.damping = float(conf.get("influence_damping", damping))

    def __call__(self, request, datastore: Datastore):
        device = "cuda" if torch.cuda.is_available() and request.get("device", "cuda") != "cpu" else "cpu"
        checkpoint = os.path.join(self.bundle_path, "models", "model.pt")
        network, parser = load_network(self.bundle_path, self.overrides, device=device)
        names = class_names(parser)
        items, skipped = labelled_images(datastore, names)
        if len(items) < 2:
            logger.warning("influence review: %d usable labelled image(s); nothing scored", len(items))
            return {"scored": 0, "skipped": skipped}
        result = score_labelled_images(network, items, int(parser.get_parsed_content("spatial_size")),
                                       self.damping, device)
        now = int(time.time())
        model_ts = int(os.path.getmtime(checkpoint))
        total = len(result["scores"])
        for image_id, entry in result["scores"].items():
            datastore.update_image_info(image_id, {INFO_KEY: {
                "score": entry["score"], "rank": entry["rank"], "of": total, "label": names[entry["label"]],
                "model_ts": model_ts, "ts": now}})
        skipped += result["skipped"]
        order = sorted(result["scores"].items(), key=lambda kv: kv[1]["rank"])
        return {"scored": total, "skipped": skipped,
                "most_suspicious": [{"id": i, "score": e["score"], "rank": e["rank"]} for i, e in order[:10]]}
