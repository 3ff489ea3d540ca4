"""Label review: which annotated images an expert should look at first.

The experts-in-the-loop relabelling idea of "Active Label Refinement for Robust Training of
Imbalanced Medical Image Classification Tasks in the Presence of High Label Noise" (MICCAI
2024): the current model scores every labelled image, and the images are served in a review
order of :mod:`robustmri.review.orders` (``loss``, ``confident_learning``, ``self_influence``,
``random``; :data:`~robustmri.review.orders.DEFAULT_ORDER` unless told otherwise, the one
measured best on figshare with flipped labels).

An annotation project has no clean validation set, so validation-set ``influence`` is refused
here. Scoring an image against the other labelled images does not work either with a model
trained on all of them: at the (regularised) optimum the other images' mean loss gradient is
minus the image's own, so such a score mostly measures the image against itself, with the sign
flipped (we measured mislabelled images coming out as the most *helpful*). Self-influence
(Koh and Liang 2017, section 5.4, "fixing mislabeled examples") is that idea done right:

    score_i = -g_i . (H + lambda I)^-1 g_i / N   (<= 0)

the first-order change of the image's own training loss if it were up-weighted, i.e. how
far the model had to bend to fit this label. g_i and H are the closed forms on the final layer,
from the same feature pass that gives the model's probabilities (and so the loss and the
confident-learning orders).

Labels live in one small JSON file per image, ``<image id>.label.json``:
``{"label": "glioma"}``, optionally with ``"group"`` (a pseudonymous patient key, so that
slices of one patient share a split; never a patient name or id). No MONAI Label import here:
the app under ``apps/monailabel`` stays a thin adapter.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from robustmri import CLASS_NAMES
from robustmri.data.preprocessing import DEFAULT_PREPROCESS, read_preprocessed
from robustmri.influence import DEFAULT_DAMPING, ExactSolver, last_layer_problem
from robustmri.influence.scores import self_influence_of
from robustmri.review.orders import (
    DEFAULT_ORDER,
    ORDERS,
    ReviewOrder,
    ReviewOrderError,
    ReviewValues,
    rank,
    ranks_of,
    review_order,
)

logger = logging.getLogger(__name__)

#: Suffix of the per-image label files in an annotation datastore.
LABEL_SUFFIX = ".label.json"


class LabelFileError(ValueError):
    """A label file that cannot be used (not JSON, no ``label``, unknown class)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


@dataclass
class LabelledImage:
    image_id: str
    file: str  # image path
    label: int  # class index
    group: str | None = None  # pseudonymous patient key; None: the image is its own group


def read_label_file(path: str, class_names=CLASS_NAMES) -> tuple[int, str | None]:
    """Class index and optional group of one ``*.label.json`` file.

    ``label`` may be a class name (case-insensitive) or a class index.
    """
    class_names = tuple(name.lower() for name in class_names)
    try:
        with open(path) as handle:
            content = json.load(handle)
    except OSError as err:
        raise LabelFileError(path, f"cannot read label file ({err.strerror})") from err
    except json.JSONDecodeError as err:
        raise LabelFileError(path, f"not JSON ({err.msg} at line {err.lineno})") from err
    if not isinstance(content, dict) or "label" not in content:
        raise LabelFileError(path, 'expected a JSON object with a "label" key, e.g. {"label": "glioma"}')
    label = content["label"]
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise LabelFileError(path, f"label must be a class name or index, got {label!r}")
    if isinstance(label, int):
        if not 0 <= label < len(class_names):
            raise LabelFileError(path, f"class index {label} outside 0..{len(class_names) - 1}")
        index = label
    elif label.strip().lower() in class_names:
        index = class_names.index(label.strip().lower())
    else:
        raise LabelFileError(path, f"unknown class {label!r} (expected one of {', '.join(class_names)})")
    group = content.get("group")
    return index, None if group in (None, "") else str(group)


def write_label_file(path: str, label: str, group: str | None = None) -> None:
    """Write a ``*.label.json`` file (used by scripts and tests that prepare studies)."""
    content = {"label": label} if group is None else {"label": label, "group": str(group)}
    with open(path, "w") as handle:
        json.dump(content, handle)


def write_training_catalog(items: list[LabelledImage], folder: str, class_names=CLASS_NAMES) -> str:
    """Write ``labels.csv`` (file, label_name, group) so the bundle's catalog reads the studies.

    Groups are written as anonymous integers (order of first appearance), never as given.
    """
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "labels.csv")
    anonymous: dict[str, int] = {}
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label_name", "group"])
        for item in items:
            key = item.group if item.group is not None else f"image:{item.image_id}"
            writer.writerow([os.path.abspath(item.file), class_names[item.label], anonymous.setdefault(key, len(anonymous))])
    return path


def load_images(items: list[LabelledImage], spatial_size: int,
                preprocess: str = DEFAULT_PREPROCESS) -> tuple[np.ndarray, list[LabelledImage], list]:
    """Read and preprocess as in training (``preprocess``: the model's preprocessing by name): [N, 1, S, S]
    images, the items kept, (id, reason) skipped."""
    images, kept, skipped = [], [], []
    for item in tqdm(items, desc="reading labelled images", unit="img", leave=False, disable=len(items) < 200):
        image, reason = read_preprocessed(item.file, int(spatial_size), preprocess)
        if image is None:
            skipped.append((item.image_id, reason))
        else:
            images.append(image)
            kept.append(item)
    for image_id, reason in skipped:
        logger.warning("not scored: image %s (%s)", image_id, reason)
    stacked = np.stack(images)[:, None] if images else np.zeros((0, 1, int(spatial_size), int(spatial_size)), np.float32)
    return stacked.astype(np.float32), kept, skipped


def labelled_review_order(name: str) -> ReviewOrder:
    """The review order ``name`` if labelled images alone can be ranked by it (not one needing a validation set)."""
    order = review_order(name)
    if order.needs_validation_set:
        usable = ", ".join(n for n, o in ORDERS.items() if not o.needs_validation_set)
        raise ReviewOrderError(f"review order {name!r} needs a trusted validation set, which labelled images alone do "
                               f"not give; use one of {usable}")
    return order


def score_labelled_images(model: torch.nn.Module, items: list[LabelledImage], spatial_size: int,
                          damping: float = DEFAULT_DAMPING, device="cpu", preprocess: str = DEFAULT_PREPROCESS,
                          order: str = DEFAULT_ORDER, seed: int = 0) -> dict:
    """Score the labelled images with the current model in the review order ``order`` (``seed``: of ``random``):
    ``{"order": name, "scores": {id: {...}}, "skipped": [...]}``.

    Each entry holds ``score`` (the value the order ranks by, in its unit: ``ORDERS[order].score``), ``rank``
    (1 = review first), ``label`` (given), ``predicted`` (the model's class) and ``probabilities`` (per class);
    counts go to the log. The damping is used by ``self_influence`` only.
    """
    chosen = labelled_review_order(order)  # an unusable order or damping is refused before any work
    solver = ExactSolver(damping) if "self_influence" in chosen.needs else None
    images, kept, skipped = load_images(items, spatial_size, preprocess)
    if len(kept) < 2:
        raise ValueError(f"need at least 2 readable labelled images to score, got {len(kept)} "
                         f"({len(skipped)} unreadable)")
    labels = np.array([item.label for item in kept], dtype=np.int64)
    problem = last_layer_problem(model, images, labels, device=device)
    logits = problem.features @ problem.theta.T
    values = ReviewValues(labels, probabilities=problem.probabilities.numpy(),
                          losses=torch.nn.functional.cross_entropy(logits, problem.labels, reduction="none").numpy(),
                          self_influence=None if solver is None else
                          self_influence_of(problem, solver.factor(problem)).numpy())
    ranking = rank(order, values, seed)
    ranks = ranks_of(ranking.positions)
    logger.info("label review (%s): %d labelled images scored, %d unreadable skipped", order, len(kept), len(skipped))
    return {"order": order,
            "scores": {item.image_id: {"score": float(ranking.scores[k]), "rank": int(ranks[k]),
                                       "label": int(item.label), "predicted": int(values.probabilities[k].argmax()),
                                       "probabilities": [float(p) for p in values.probabilities[k]]}
                       for k, item in enumerate(kept)},
            "skipped": [{"id": image_id, "reason": reason} for image_id, reason in skipped]}
