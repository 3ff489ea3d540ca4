"""Strategy: the labelled image whose label looks most suspicious, not yet reviewed since scoring."""

from __future__ import annotations

import logging

from fastapi import HTTPException
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.strategy import Strategy

from lib.scoring.influence_review import INFO_KEY, percentile

logger = logging.getLogger(__name__)

#: What the suspicion means, in one line (shown by the review page).
EXPLANATION = ("the model's fit to this label depends most on this image: the label may be wrong, or the image "
               "unusual")
TRAIN_OR_SCORE = ("no labelled image has been scored yet: train (POST /train/brain_tumour) or, with a trained "
                  "model, score (POST /scoring/influence_review?run_sync=true), then ask again")
ALL_REVIEWED = ("every scored label has been reviewed since the last scoring: retrain (POST /train/brain_tumour) "
                "and score again (POST /scoring/influence_review) to review the next batch")


def review_progress(datastore: Datastore) -> dict:
    """Counts of the labelled images under the current scores, and the most suspicious one not yet reviewed.

    An image counts as *reviewed* when its final label was saved after it was scored, and as
    *corrected* when that label's class differs from the class it was scored with (the class is
    kept in the label info by lib.datastore at upload). ``next`` is ``(image id, score entry)``
    or ``None``.
    """
    best, counts = None, {"labelled": 0, "scored": 0, "pending": 0, "reviewed": 0, "corrected": 0}
    for image_id in datastore.get_labeled_images(DefaultLabelTag.FINAL):
        counts["labelled"] += 1
        entry = datastore.get_image_info(image_id).get(INFO_KEY)
        if not entry:
            continue
        counts["scored"] += 1
        label_info = datastore.get_label_info(image_id, DefaultLabelTag.FINAL)
        if label_info.get("ts", 0) > entry["ts"]:
            counts["reviewed"] += 1
            saved = label_info.get("label")
            if saved is not None and str(saved).lower() != str(entry["label"]).lower():
                counts["corrected"] += 1
            continue
        counts["pending"] += 1
        if best is None or entry["score"] < best[1]["score"]:
            best = (image_id, entry)
    return {**counts, "next": best}


class MostSuspicious(Strategy):
    """Serve the labelled image with the most negative influence review score.

    An image whose label was saved again after it was scored counts as reviewed and is skipped
    until the next scoring run, so an annotator walks down the list by saving labels. When
    there is nothing to serve (nothing scored yet, or everything reviewed) the answer is HTTP
    409 with what to do next and the progress counts, never an empty sample.
    """

    def __init__(self):
        super().__init__("Most suspicious label first (influence review score, most negative first)")

    def __call__(self, request, datastore: Datastore):
        progress = review_progress(datastore)
        best = progress.pop("next")
        if best is None:
            message = TRAIN_OR_SCORE if progress["scored"] == 0 else ALL_REVIEWED
            logger.info("most_suspicious: %s (%s)", message, progress)
            raise HTTPException(status_code=409, detail={"message": message, "progress": progress})
        image_id, entry = best
        logger.info("review next: rank %d of %d (%d pending, %d reviewed)", entry["rank"], entry["of"],
                    progress["pending"], progress["reviewed"])
        return {"id": image_id, "influence_score": entry["score"], "rank": entry["rank"], "of": entry["of"],
                "percentile": entry.get("percentile", percentile(entry["rank"], entry["of"])), "label": entry["label"],
                "explanation": EXPLANATION, **progress}

