"""The label history (lib.history) in process: the datastore's saves, the review fields' checks and its routes.

The browser test (test_monailabel_review_page.py) checks the same files through the review page.
"""

import json
import sys
from types import SimpleNamespace

import pytest

pytest.importorskip("monailabel", reason="MONAI Label is the optional [label] extra")

from label_server import APP, CLASS_NAMES, make_studies  # noqa: E402  (tests/apps/label_server.py)


@pytest.fixture
def lib(monkeypatch):
    """The app's ``lib.datastore`` and ``lib.history`` (importable as start_server makes them), forgotten afterwards."""
    monkeypatch.syspath_prepend(APP)
    from lib import datastore, history

    yield SimpleNamespace(datastore=datastore, history=history)
    for name in [n for n in sys.modules if n == "lib" or n.startswith("lib.")]:
        del sys.modules[name]


def _store(lib, studies):
    from monailabel.config import settings

    return lib.datastore.ClassLabelDatastore(str(studies), CLASS_NAMES, auto_reload=False,
                                             extensions=[*settings.MONAI_LABEL_DATASTORE_FILE_EXT, "*.label.json"])


def _upload(tmp_path, image_id, label):
    path = tmp_path / "upload" / f"{image_id}.label.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"label": label}))
    return str(path)


def _lines(studies, image_id):
    path = studies / "labels" / "final" / f"{image_id}.history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.monailabel
def test_each_save_appends_one_history_line_and_keeps_unsure_and_note(tmp_path, lib):
    studies = make_studies(tmp_path / "studies", n=4)
    store = _store(lib, studies)
    before = json.loads((studies / "labels" / "final" / "case00.label.json").read_text())["label"]
    other = next(name for name in CLASS_NAMES if name != before)
    store.save_label("case00", _upload(tmp_path, "case00", other), "final",
                     {"unsure": True, "note": "faint rim", "annotator": "ana"})
    store.save_label("case00", _upload(tmp_path, "case00", before), "final", {"action": "undo", "annotator": "ana"})
    store.save_label("case00", _upload(tmp_path, "case00", before), "final", {})  # no user: MONAI Label's default
    lines = _lines(studies, "case00")
    assert [(e["annotator"], e["old"], e["new"], e["unsure"], e["note"], e["action"]) for e in lines] == [
        ("ana", before, other, True, "faint rim", "save"), ("ana", other, before, False, "", "undo"),
        ("admin", before, before, False, "", "save")]
    assert all(e["ts"].endswith("+00:00") for e in lines)
    info = store.get_label_info("case00", "final")
    assert (info["label"], info["unsure"], info["note"], info["annotator"]) == (before, False, "", "admin")
    assert "action" not in info  # kept in the history only
    assert _lines(studies, "case01") == []


@pytest.mark.monailabel
@pytest.mark.parametrize("fields, reason", [
    ({"action": "delete"}, "action 'delete': one of save, undo"),
    ({"unsure": "yes"}, "unsure 'yes': true or false"),
    ({"note": "x" * 2001}, "note: text of at most 2000 characters"),
    ({"note": 7}, "note: text of at most 2000 characters"),
])
def test_review_fields_outside_the_contract_are_refused_and_nothing_is_saved(tmp_path, lib, fields, reason):
    studies = make_studies(tmp_path / "studies", n=4)
    store = _store(lib, studies)
    label_file = studies / "labels" / "final" / "case01.label.json"
    before = label_file.read_text()
    other = next(name for name in CLASS_NAMES if name != json.loads(before)["label"])
    with pytest.raises(lib.history.ReviewFieldRejected) as caught:
        store.save_label("case01", _upload(tmp_path, "case01", other), "final", fields)
    assert (caught.value.status_code, caught.value.detail) == (422, reason)
    assert label_file.read_text() == before and _lines(studies, "case01") == []


@pytest.mark.monailabel
def test_a_history_path_takes_a_plain_tag_only(tmp_path, lib):
    store = _store(lib, make_studies(tmp_path / "studies", n=2))
    assert lib.history.history_path(store, "case00", "final").endswith("labels/final/case00.history.jsonl")
    for tag in ("../x", "/tmp/x", "a/b", ".hidden", ""):
        with pytest.raises(lib.history.ReviewFieldRejected, match="a plain name"):
            lib.history.history_path(store, "case00", tag)


@pytest.mark.monailabel
def test_the_server_names_the_annotator_whatever_the_client_sends(tmp_path, lib, monkeypatch):
    """``PUT /datastore/label`` of lib.history: the authenticated user (auth off: MONAI Label's default) as annotator."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from monailabel.endpoints import datastore as stock_datastore

    studies = make_studies(tmp_path / "studies", n=3)
    store = _store(lib, studies)
    app = SimpleNamespace(datastore=lambda: store, on_save_label=lambda image, label: {})
    monkeypatch.setattr(stock_datastore, "app_instance", lambda: app)
    server = FastAPI()
    server.include_router(lib.history.routes(app))
    client = TestClient(server)
    label = next(name for name in CLASS_NAMES
                 if name != json.loads((studies / "labels" / "final" / "case02.label.json").read_text())["label"])

    def put(params):
        return client.put("/datastore/label?image=case02&tag=final", headers={"X-Requested-With": "robustmri"},
                          data={"params": params},
                          files={"label": ("case02.label.json", json.dumps({"label": label}), "application/json")})

    assert put(json.dumps({"annotator": "mallory", "note": "checked twice"})).status_code == 200
    assert put("[1, 2]").json()["detail"] == "params: a JSON object (label info such as unsure and note)"
    assert put("{not json").status_code == 422
    history = client.get("/review/history?image=case02").json()
    assert [(e["annotator"], e["new"], e["note"]) for e in history["history"]] == [("admin", label, "checked twice")]
    assert store.get_label_info("case02", "final")["annotator"] == "admin"
    forged = client.put("/datastore/label/info?label=case02&tag=final", headers={"X-Requested-With": "robustmri"},
                        data={"info": json.dumps({"annotator": "mallory"})})
    assert (forged.status_code, forged.json()["detail"]) == (
        422, "annotator: set by the server when a label is saved, not by a client")
    assert client.put("/datastore/label/info?label=case02&tag=final", headers={"X-Requested-With": "robustmri"},
                      data={"info": json.dumps({"reviewed_by_eye": True})}).status_code == 200
    assert store.get_label_info("case02", "final")["annotator"] == "admin"
    assert client.get("/review/history?image=../case02").status_code == 404
    assert client.get("/review/history?image=case02&tag=../../x").status_code == 422
