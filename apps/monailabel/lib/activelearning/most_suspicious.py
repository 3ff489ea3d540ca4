"""Strategy: the labelled image whose label looks most suspicious, not yet reviewed since scoring."""

import logging

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.strategy import Strategy

from lib.scoring.influence_review import INFO_KEY

logger = logging.getLogger(__name__)


class MostSuspicious(Strategy):
    """Serve the labelled image with the most negative influence review score.

    An image whose label was saved again after it was scored counts as reviewed and is skipped
    until the next scoring run, so an annotator walks down the list by saving labels.
    """

    def __init__(self):
        super().__init__("Most suspicious label first (influence review score, most negative first)")

    def __call__(self, request, datastore: Datastore):
        best, pending, reviewed = None, 0, 0
        for image_id in datastore.get_labeled_images(DefaultLabelTag.FINAL):
            entry = datastore.get_image_info(image_id).get(INFO_KEY)
            if not entry:
                continue
            label_ts = datastore.get_label_info(image_id, DefaultLabelTag.FINAL).get("ts", 0)
            if label_ts > entry["ts"]:
                reviewed += 1
                continue
            pending += 1
            if best is None or entry["score"] < best[1]["score"]:
                best = (image_id, entry)
        if best is None:
            logger.info("no scored label left to review (%d reviewed since scoring); run the "
                        "'influence_review' scoring method after training", reviewed)
            return {}
        image_id, entry = best
        logger.info("review next: rank %d of %d (%d pending, %d reviewed)", entry["rank"], entry["of"], pending,
                    reviewed)
        return {"id": image_id, "influence_score": entry["score"], "rank": entry["rank"], "of": entry["of"],
                "label": entry["label"], "pending": pending}
