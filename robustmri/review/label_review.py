"""Influence-guided label review: which annotated images an expert should look at first.

The experts-in-the-loop relabelling idea of "Active Label Refinement for Robust Training of
Imbalanced Medical Image Classification Tasks in the Presence of High Label Noise" (MICCAI
2024), driven by the last-layer influence engine of :mod:`robustmri.influence`.

An annotation project has no clean validation set, and scoring an image against the other
labelled images does not work with a model trained on all of them: at the (regularised)
optimum the other images' mean loss gradient is minus the image's own, so such a score mostly
measures the image against itself, with the sign flipped (we measured mislabelled images coming
out as the most *helpful*). So the review score is the image's self-influence (Koh and Liang
2017, section 5.4, "fixing mislabeled examples"), written in the engine's sign convention:

    score_i = -g_i . (H + lambda I)^-1 g_i / N   (<= 0)

the first-order change of the image's own training loss if it were up-weighted, i.e. how
far the model had to bend to fit this label. A wrong label is fitted against the evidence of
the other images, so it gets the most negative score: images are served from the most
negative ("most harmful to the fit") up. g_i and H are the closed forms on the final layer.

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
from robustmri.influence import DEFAULT_DAMPING, influence_ranking, self_influence_scores

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


def score_labelled_images(model: torch.nn.Module, items: list[LabelledImage], spatial_size: int,
                          damping: float = DEFAULT_DAMPING, device="cpu", preprocess: str = DEFAULT_PREPROCESS) -> dict:
    """Score the labelled images with the current model: ``{"scores": {id: {...}}, "skipped": [...]}``.

    Each entry holds ``score``, ``rank`` (1 = review first) and ``label``; counts go to the log.
    """
    images, kept, skipped = load_images(items, spatial_size, preprocess)
    if len(kept) < 2:
        raise ValueError(f"need at least 2 readable labelled images to score, got {len(kept)} "
                         f"({len(skipped)} unreadable)")
    labels = np.array([item.label for item in kept], dtype=np.int64)
    scores = self_influence_scores(model, images, labels, damping, device=device)
    rank = np.empty(len(kept), dtype=np.int64)
    rank[influence_ranking(scores)] = np.arange(1, len(kept) + 1)
    logger.info("influence review: %d labelled images scored, %d unreadable skipped", len(kept), len(skipped))
    return {"scores": {item.image_id: {"score": float(scores[k]), "rank": int(rank[k]), "label": int(item.label)}
                       for k, item in enumerate(kept)},
            "skipped": [{"id": image_id, "reason": reason} for image_id, reason in skipped]}
