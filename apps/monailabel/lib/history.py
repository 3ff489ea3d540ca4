"""The history of each label: one append-only JSON line per save, beside the label, and who saved it.

A saved label keeps only its latest class; the history keeps every save, so a slip can be seen
and undone: ``labels/<tag>/<image id>.history.jsonl``, one line per save,
``{"ts": ISO-8601 UTC, "annotator": ..., "old": class or null, "new": class, "unsure": bool,
"note": str, "action": "save" | "undo"}``. Lines are only ever appended.

The review fields a save may carry in its ``params`` (MONAI Label's label info) are checked here:
``unsure`` (bool), ``note`` (text of at most :data:`NOTE_MAX` characters) and ``action``
(``save`` or ``undo``, kept in the history only). ``annotator`` is the authenticated user's name,
set by the server (:func:`routes` replaces MONAI Label's ``PUT /datastore/label``, which reads
the user but does not hand it to the datastore); whatever a client sends as ``annotator`` is
replaced, and ``PUT /datastore/label/info`` may not set it.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from typing import Callable, Optional

from fastapi import APIRouter, BackgroundTasks, Depends, File, Form, HTTPException, UploadFile
from monailabel.config import settings
from monailabel.endpoints import datastore as stock_datastore
from monailabel.endpoints.user.auth import DEFAULT_USER, RBAC, User
from monailabel.interfaces.datastore import DefaultLabelTag

from robustmri.review.label_review import LabelFileError, read_label_file

from lib.label_tags import LABEL_TAG_RULE, valid_label_tag

#: Beside ``<image id>.label.json`` in the tag's folder.
HISTORY_SUFFIX = ".history.jsonl"
#: Longest note kept with a label, in characters.
NOTE_MAX = 2000
#: What a history line records: a save of the annotator's choice, or the undo of the last one.
ACTIONS = ("save", "undo")


class ReviewFieldRejected(HTTPException):
    """A review field of a label save that cannot be kept: HTTP 422 with the reason, nothing saved."""

    def __init__(self, reason: str):
        super().__init__(status_code=422, detail=reason)


def review_fields(info: Optional[dict]) -> tuple[dict, str]:
    """The label info to save (``unsure`` and ``note`` checked, ``annotator`` defaulted) and the history action."""
    fields = dict(info or {})
    action = fields.pop("action", "save")
    if action not in ACTIONS:
        raise ReviewFieldRejected(f"action {action!r}: one of {', '.join(ACTIONS)}")
    unsure = fields.get("unsure", False)
    if not isinstance(unsure, bool):
        raise ReviewFieldRejected(f"unsure {unsure!r}: true or false")
    note = fields.get("note", "")
    if not isinstance(note, str) or len(note) > NOTE_MAX:
        raise ReviewFieldRejected(f"note: text of at most {NOTE_MAX} characters")
    annotator = fields.get("annotator") or DEFAULT_USER.username
    return {**fields, "unsure": unsure, "note": note, "annotator": str(annotator)}, action


def history_path(datastore, image_id: str, tag: str) -> str:
    """``labels/<tag>/<image id>.history.jsonl`` of a LocalDatastore; a tag that is not a plain name is refused."""
    if not valid_label_tag(tag):
        raise ReviewFieldRejected(f"tag {str(tag)[:80]!r}: must be {LABEL_TAG_RULE}")
    return os.path.join(datastore._datastore.label_path(tag), f"{image_id}{HISTORY_SUFFIX}")


def current_class(datastore, image_id: str, tag: str) -> Optional[str]:
    """The class of the image's saved label (label info, else the file), or None without a usable label."""
    saved = datastore.get_label_info(image_id, tag).get("label")
    if saved is not None:
        return str(saved)
    path = datastore.get_label_uri(image_id, tag)
    if not path or not os.path.isfile(path):
        return None
    try:
        index, _ = read_label_file(path, datastore.class_names)
    except LabelFileError:
        return None
    return datastore.class_names[index]


def read_history(path: str) -> list[dict]:
    """The history lines of one label, oldest first (none before its first save through the server)."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def save_with_history(datastore, save: Callable[..., str], image_id: str, label_filename: str, tag: str,
                      info: dict) -> str:
    """``save(image_id, label_filename, tag, info)`` (the datastore's own save) with the review fields checked,
    then one history line appended; returns the label id."""
    fields, action = review_fields(info)
    path = history_path(datastore, image_id, tag)
    old = current_class(datastore, image_id, tag)
    label_id = save(image_id, label_filename, tag, fields)
    line = {"ts": datetime.now(timezone.utc).isoformat(timespec="seconds"), "annotator": fields["annotator"],
            "old": old, "new": fields["label"], "unsure": fields["unsure"], "note": fields["note"], "action": action}
    with open(path, "a", encoding="utf-8") as handle:  # one write per line: appended whole
        handle.write(json.dumps(line) + "\n")
    return label_id


def client_fields(params: str) -> dict:
    """The label info a client sent (``params``, a JSON object); ``annotator`` is the server's to set."""
    try:
        fields = json.loads(params) if params else {}
    except ValueError:
        fields = None
    if not isinstance(fields, dict):
        raise ReviewFieldRejected("params: a JSON object (label info such as unsure and note)")
    return fields


def server_params(params: str, username: str) -> str:
    """A label save's ``params`` as MONAI Label's save reads them, with ``annotator`` the authenticated user."""
    return json.dumps({**client_fields(params), "annotator": username})


def update_label_info(label: str, tag: str, info: str, user: User):
    """MONAI Label's label info update, refusing an ``annotator`` (the server's to set when a label is saved)."""
    if "annotator" in client_fields(info):
        raise ReviewFieldRejected("annotator: set by the server when a label is saved, not by a client")
    return stock_datastore.update_label_info(label, tag, info, user.username)


def routes(app) -> APIRouter:
    """``PUT /datastore/label`` with the authenticated user as ``annotator``, ``PUT /datastore/label/info``
    refusing to set it, and ``GET /review/history``."""
    router = APIRouter()

    @router.put("/datastore/label", summary="Save Finished Label (the authenticated user kept as annotator)")
    async def save_label(background_tasks: BackgroundTasks, image: str, params: str = Form("{}"),
                         tag: str = DefaultLabelTag.FINAL.value, label: UploadFile = File(...),
                         user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))):
        return stock_datastore.save_label(background_tasks, image, server_params(params, user.username), tag, label,
                                          user.username)

    @router.put("/datastore/label/info", summary="Update Label Info (admin: it holds the class and who saved it; "
                                                 "never the annotator)")
    def put_label_info(label: str, tag: str, info: str = Form("{}"),
                       user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
        return update_label_info(label, tag, info, user)

    @router.get("/review/history", summary="History of an image's label, oldest first")
    def label_history(image: str, tag: str = DefaultLabelTag.FINAL.value,
                      user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
        datastore = app.datastore()
        if image not in datastore.list_images():
            raise HTTPException(status_code=404, detail=f"image {image!r}: no such image in the studies")
        return {"image": image, "tag": tag, "history": read_history(history_path(datastore, image, tag))}

    return router
