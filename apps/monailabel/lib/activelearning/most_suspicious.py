"""Strategy: the labelled image whose label looks most suspicious, not yet reviewed since scoring."""

from __future__ import annotations

import logging

from fastapi import HTTPException
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.strategy import Strategy

from robustmri.review.orders import DEFAULT_ORDER, DEFAULT_ORDER_REASON, ORDERS

from lib.scoring.influence_review import INFO_KEY, ORDER_CONF, percentile

logger = logging.getLogger(__name__)

#: The order of scores stored before the order was recorded.
UNRECORDED_ORDER = "self_influence"
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
        if best is None or entry["rank"] < best[1]["rank"]:
            best = (image_id, entry)
    return {**counts, "next": best}


def order_reason(order: str) -> str:
    """Why the images come in ``order``, in one sentence: the measured result, or that ``--conf`` chose it."""
    if order == DEFAULT_ORDER:
        return DEFAULT_ORDER_REASON
    return (f"{order} was chosen with --conf {ORDER_CONF}; the default, {DEFAULT_ORDER}, is the order measured best: "
            f"{DEFAULT_ORDER_REASON}")


class MostSuspicious(Strategy):
    """Serve the labelled image ranked first by the review order (rank 1 = most suspicious) not yet reviewed.

    An image whose label was saved again after it was scored counts as reviewed and is skipped
    until the next scoring run, so an annotator walks down the list by saving labels. When
    there is nothing to serve (nothing scored yet, or everything reviewed) the answer is HTTP
    409 with what to do next and the progress counts, never an empty sample.
    """

    def __init__(self):
        super().__init__("Most suspicious label first (the review order's rank, robustmri.review.orders)")

    def __call__(self, request, datastore: Datastore):
        progress = review_progress(datastore)
        best = progress.pop("next")
        if best is None:
            message = TRAIN_OR_SCORE if progress["scored"] == 0 else ALL_REVIEWED
            logger.info("most_suspicious: %s (%s)", message, progress)
            raise HTTPException(status_code=409, detail={"message": message, "progress": progress})
        image_id, entry = best
        order = entry.get("order", UNRECORDED_ORDER)
        logger.info("review next: rank %d of %d by %s (%d pending, %d reviewed)", entry["rank"], entry["of"], order,
                    progress["pending"], progress["reviewed"])
        return {"id": image_id, "score": entry["score"], "influence_score": entry["score"], "rank": entry["rank"],
                "of": entry["of"], "percentile": entry.get("percentile", percentile(entry["rank"], entry["of"])),
                "label": entry["label"], "predicted": entry.get("predicted"),
                "probabilities": entry.get("probabilities"), "order": order, "order_reason": order_reason(order), "explanation": ORDERS[order].explanation,
                **progress}
