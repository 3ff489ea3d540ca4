"""The studies folder as MONAI Label's local datastore, with class labels checked at upload.

A label is one ``<image id>.label.json`` file (robustmri.review.label_review): ``{"label":
"glioma", "group": "p17"}``. :meth:`ClassLabelDatastore.save_label` accepts an upload only if
the image exists, the file is named ``*.label.json`` and it parses as a label of one of the
bundle's classes; anything else raises :class:`LabelRejected` (HTTP 422 with the reason, the
datastore untouched). The saved label's class name is kept in the label info (``label``), so
the review progress (reviewed, corrected) is counted without reading every file, and each save
appends one line to the label's history (lib.history), with the review fields ``unsure`` and
``note`` checked.
"""

from __future__ import annotations

import logging
import os

from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore

from robustmri.review.label_review import LABEL_SUFFIX, LabelFileError, read_label_file

from lib import history

logger = logging.getLogger(__name__)


class LabelRejected(HTTPException, ValueError):
    """An uploaded label that cannot be saved: HTTP 422 with the reason."""

    def __init__(self, reason: str):
        super().__init__(status_code=422, detail=reason)

    def __str__(self) -> str:
        return self.detail


class ClassLabelDatastore(LocalDatastore):
    """LocalDatastore whose labels are class labels of ``class_names`` (``*.label.json`` files)."""

    def __init__(self, datastore_path: str, class_names: tuple[str, ...], **kwargs):
        super().__init__(datastore_path, **kwargs)
        self.class_names = tuple(class_names)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict) -> str:
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

    def update_image_infos(self, infos: dict[str, dict]) -> None:
        """``update_image_info`` of many images with one write of the datastore file (not one per image)."""
        missing = sorted(set(infos) - set(self._datastore.objects))
        if missing:
            raise KeyError(f"images not in the studies: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        for image_id, info in infos.items():
            self._datastore.objects[image_id].image.info.update(info)
        self._update_datastore_file()
