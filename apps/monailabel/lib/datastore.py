"""The studies folder as MONAI Label's local datastore, with class labels checked at upload.

A label is one ``<image id>.label.json`` file (robustmri.review.label_review): ``{"label":
"glioma", "group": "p17"}``. :meth:`ClassLabelDatastore.save_label` accepts an upload only if
the image exists, the file is named ``*.label.json`` and it parses as a label of one of the
bundle's classes; anything else raises :class:`LabelRejected` (HTTP 422 with the reason, the
datastore untouched). The saved label's class name is kept in the label info (``label``), so
the review progress (reviewed, corrected) is counted without reading every file, and each save
appends one line to the label's history (lib.history), with the review fields ``unsure`` and
``note`` checked.

Before that, the tag must be a label tag (lib.label_tags: ``final``, ``original`` or a plain
name; MONAI Label joins it to the labels folder, so ``../../x`` would write anywhere) and the
file at most ``--conf max_label_bytes`` (:func:`label_size_limit`): HTTP 422 and 413.
"""

from __future__ import annotations

import logging
import os
import re

from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore

from robustmri.review.label_review import LABEL_SUFFIX, LabelFileError, read_label_file

from lib import history
from lib.label_tags import LABEL_TAG_RULE, valid_label_tag

logger = logging.getLogger(__name__)

#: ``--conf`` key: the largest label file accepted, in bytes.
MAX_LABEL_CONF = "max_label_bytes"
DEFAULT_MAX_LABEL_BYTES = 65536


def label_size_limit(conf: dict) -> int:
    """``--conf max_label_bytes`` (default 65536), a positive integer."""
    value = conf.get(MAX_LABEL_CONF, DEFAULT_MAX_LABEL_BYTES)
    try:
        limit = int(value)
    except (TypeError, ValueError):
        limit = 0
    if limit <= 0:
        raise ValueError(f"--conf {MAX_LABEL_CONF} must be a positive number of bytes, got {value!r}")
    return limit


class LabelRejected(HTTPException, ValueError):
    """An uploaded label that cannot be saved: HTTP 422 with the reason."""

    def __init__(self, reason: str):
        super().__init__(status_code=422, detail=reason)

    def __str__(self) -> str:
        return self.detail


class LabelTooLarge(LabelRejected):
    """A label file over the size cap: HTTP 413."""

    def __init__(self, size: int, limit: int):
        super().__init__(f"label file of {size} bytes: over --conf {MAX_LABEL_CONF} ({limit} bytes)")
        self.status_code = 413


def check_label_tag(tag) -> str:
    if not valid_label_tag(tag):
        raise LabelRejected(f"label tag {str(tag)[:100]!r}: must be {LABEL_TAG_RULE}")
    return tag


class ClassLabelDatastore(LocalDatastore):
    """LocalDatastore whose labels are class labels of ``class_names`` (``*.label.json`` files)."""

    def __init__(self, datastore_path: str, class_names: tuple[str, ...],
                 max_label_bytes: int = DEFAULT_MAX_LABEL_BYTES, **kwargs):
        super().__init__(datastore_path, **kwargs)
        self.class_names = tuple(class_names)
        self.max_label_bytes = max_label_bytes

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict) -> str:
        check_label_tag(label_tag)
        size = os.path.getsize(label_filename)
        if size > self.max_label_bytes:  # the server refuses a longer body before reading it; this is the file
            raise LabelTooLarge(size, self.max_label_bytes)
        if not image_id or image_id not in self._datastore.objects:
            raise LabelRejected(f"image {image_id!r}: no such image in the studies; a label must belong to an "
                                "existing image (GET /datastore/?output=all lists them)")
        if not str(label_filename).endswith(LABEL_SUFFIX):
            # MONAI Label names the saved file <image id> + the upload's suffixes: "label.json" would
            # become a stray "<image id>.json" beside the real "<image id>.label.json"
            raise LabelRejected(f"image {image_id!r}: a label file must be named <image id>{LABEL_SUFFIX}, got a "
                                f"file ending in {os.path.basename(str(label_filename))[-20:]!r}")
        try:
            index, _ = read_label_file(label_filename, self.class_names)
        except LabelFileError as err:
            raise LabelRejected(f"image {image_id!r}: {err.reason}") from err
        info = {**(label_info or {}), "label": self.class_names[index]}
        return history.save_with_history(self, super().save_label, image_id, label_filename, label_tag, info)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        super().remove_label(label_id, check_label_tag(label_tag))

    def update_label_info(self, label_id: str, label_tag: str, info: dict) -> None:
        super().update_label_info(label_id, check_label_tag(label_tag), info)

    def update_image_infos(self, infos: dict[str, dict]) -> None:
        """``update_image_info`` of many images with one write of the datastore file (not one per image)."""
        missing = sorted(set(infos) - set(self._datastore.objects))
        if missing:
            raise KeyError(f"images not in the studies: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        for image_id, info in infos.items():
            self._datastore.objects[image_id].image.info.update(info)
        self._update_datastore_file()
