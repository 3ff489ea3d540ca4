"""The node's durable queue, its worker's failure paths, its back-off and its option parsing, without a PACS or a
model (fast)."""

import os
import socket
import sqlite3
import time
from types import SimpleNamespace

import pydicom
import pytest

from robustmri.deploy.dicom.sr import BASIC_TEXT_SR_STORAGE, new_instance
from robustmri.deploy.node import scp
from robustmri.deploy.node.cli import parse_listen, parse_size
from robustmri.deploy.node.queue import (
    ANSWERED,
    DATABASE,
    DELIVERED,
    FAILED,
    READY,
    RECEIVING,
    QueueFull,
    StudyQueue,
    key,
)
from robustmri.deploy.node.sender import Destination, backoff
from robustmri.deploy.node.worker import Worker


def _state(queue, study_uid):
    return {s.study_uid: s for s in queue.studies()}[study_uid]


def test_a_study_goes_receiving_ready_answered_delivered(tmp_path):
    queue = StudyQueue(tmp_path)
    for n, sop in enumerate(("1.2.3.1", "1.2.3.2")):
        queue.add_instance("1.2.3", sop, b"x" * 10, now=100.0 + n)
    study = _state(queue, "1.2.3")
    assert (study.state, study.n_instances, study.n_bytes, study.generation) == (RECEIVING, 2, 20, 2)
    assert queue.promote_complete(timeout=5, now=105.9) == 0  # 4.9 s after the last instance: still receiving
    assert queue.promote_complete(timeout=5, now=106.0) == 1
    ready = queue.next_ready()
    assert ready.state == READY and queue.next_due() is None
    assert queue.mark_answered(ready, n_sr=1, outcome="ok")
    answered = queue.next_due()
    assert (answered.state, answered.n_sr, answered.outcome) == (ANSWERED, 1, "ok")
    assert queue.mark_delivered(answered)
    assert _state(queue, "1.2.3").state == DELIVERED and queue.next_due() is None and queue.next_ready() is None


def test_each_instance_is_a_file_under_hashed_names_before_its_row(tmp_path):
    queue = StudyQueue(tmp_path)
    queue.add_instance("1.2.3", "1.2.3.9", b"payload")
    path = os.path.join(queue.study_folder(key("1.2.3")), key("1.2.3.9") + ".dcm")
    with open(path, "rb") as handle:
        assert handle.read() == b"payload"
    assert os.path.relpath(path, tmp_path) == os.path.join("incoming", key("1.2.3"), key("1.2.3.9") + ".dcm")
    assert len(key("1.2.3")) == 64  # no UID text in a path: sha256 digests
    assert [n for n in os.listdir(os.path.dirname(path)) if n.endswith(".partial")] == []


def test_an_instance_received_while_the_study_is_answered_wins_over_the_answer(tmp_path):
    queue = StudyQueue(tmp_path)
    queue.add_instance("1.2.3", "1.2.3.1", b"a", now=0.0)
    queue.promote_complete(timeout=1, now=10.0)
    in_hand = queue.next_ready()
    queue.add_instance("1.2.3", "1.2.3.2", b"b", now=11.0)  # arrives while the worker classifies
    assert not queue.mark_answered(in_hand, n_sr=1, outcome="ok")  # that answer is for an older study
    assert _state(queue, "1.2.3").state == RECEIVING


def test_a_resend_after_delivery_is_answered_again(tmp_path):
    queue = StudyQueue(tmp_path)
    queue.add_instance("1.2.3", "1.2.3.1", b"a", now=0.0)
    queue.promote_complete(timeout=1, now=5.0)
    queue.mark_answered(queue.next_ready(), 1, "ok")
    queue.mark_delivered(queue.next_due())
    queue.add_instance("1.2.3", "1.2.3.1", b"a", now=20.0)  # the same instance again: replaced, not added
    study = _state(queue, "1.2.3")
    assert (study.state, study.n_instances, study.n_bytes) == (RECEIVING, 1, 1)


def test_the_queue_survives_a_reopen(tmp_path):
    queue = StudyQueue(tmp_path)
    queue.add_instance("1.2.3", "1.2.3.1", b"a", now=0.0)
    queue.add_instance("1.2.4", "1.2.4.1", b"b", now=0.0)
    queue.promote_complete(timeout=1, now=5.0)
    queue.mark_answered(queue.next_ready(), 1, "ok")
    del queue  # no close: what a kill leaves (every change was committed)
    reopened = StudyQueue(tmp_path)
    assert sorted(s.state for s in reopened.studies()) == [ANSWERED, READY]
    with sqlite3.connect(tmp_path / DATABASE) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_the_size_cap_refuses_what_would_exceed_it_and_counts_a_replacement_once(tmp_path):
    queue = StudyQueue(tmp_path, max_bytes=25)
    queue.add_instance("1.2.3", "1.2.3.1", b"x" * 10)
    queue.add_instance("1.2.3", "1.2.3.2", b"x" * 10)
    queue.add_instance("1.2.3", "1.2.3.2", b"x" * 15)  # replaces 10 bytes: 25 in all, at the cap
    with pytest.raises(QueueFull, match="size cap"):
        queue.add_instance("1.2.3", "1.2.3.3", b"x")
    assert queue.used_bytes() == 25
    assert len(os.listdir(queue.study_folder(key("1.2.3")))) == 2


def test_a_retry_keeps_the_study_answered_and_schedules_it(tmp_path):
    queue = StudyQueue(tmp_path)
    queue.add_instance("1.2.3", "1.2.3.1", b"a", now=0.0)
    queue.promote_complete(timeout=1, now=5.0)
    queue.mark_answered(queue.next_ready(), 1, "ok")
    assert queue.mark_retry(queue.next_due(now=6.0), delay=backoff(0), now=6.0)
    assert queue.next_due(now=6.5) is None
    study = queue.next_due(now=7.0)
    assert (study.state, study.attempts) == (ANSWERED, 1)


def test_backoff_doubles_and_is_capped():
    assert [backoff(n, first=1.0, cap=10.0) for n in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert backoff(10_000) == 60.0


@pytest.mark.parametrize("text, expected", [("PACS@127.0.0.1:4242", ("PACS", "127.0.0.1", 4242)),
                                            ("A@host.example:104", ("A", "host.example", 104))])
def test_destination_parses(text, expected):
    destination = Destination.parse(text)
    assert (destination.ae_title, destination.host, destination.port) == expected


@pytest.mark.parametrize("text", ["PACS127.0.0.1:4242", "PACS@127.0.0.1", "@h:1", "PACS@h:0", "PACS@h:x",
                                  "A" * 17 + "@h:1"])
def test_a_bad_destination_is_one_line(text):
    with pytest.raises(ValueError, match="AET@HOST:PORT"):
        Destination.parse(text)


def test_sizes_and_listen_addresses_parse():
    assert [parse_size(t) for t in ("123", "2K", "1.5M", "20G", "3GiB")] == [123, 2048, 1572864, 20 << 30, 3 << 30]
    for bad in ("", "abc", "-1", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert parse_listen("127.0.0.1:11112") == ("127.0.0.1", 11112)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_listen("11112")


def _event(dataset):
    encoded = b"DICM" + dataset.SOPInstanceUID.encode()
    return SimpleNamespace(dataset=dataset, encoded_dataset=lambda include_meta: encoded)


def test_the_store_handler_writes_before_success_and_refuses_when_full_or_unidentified(tmp_path):
    queue = StudyQueue(tmp_path, max_bytes=40)
    handle = scp.store_handler(queue)
    ds = pydicom.Dataset()
    ds.StudyInstanceUID, ds.SOPInstanceUID = "1.2.3", "1.2.3.1"
    assert handle(_event(ds)) == scp.SUCCESS
    assert [s.n_instances for s in queue.studies()] == [1]
    ds.SOPInstanceUID = "1.2.3.2" + "9" * 40  # would take the folder over its cap
    assert handle(_event(ds)) == scp.OUT_OF_RESOURCES
    no_study = pydicom.Dataset()
    no_study.SOPInstanceUID = "1.2.3.3"
    assert handle(_event(no_study)) == scp.CANNOT_UNDERSTAND
    assert [s.n_instances for s in queue.studies()] == [1]


def _delivered(queue, study_uid, sop_uids, now):
    for sop in sop_uids:
        queue.add_instance(study_uid, sop, b"x", now=now)
    queue.promote_complete(timeout=1, now=now + 5)
    study = queue.next_ready()
    os.makedirs(queue.result_folder(study.study_key), exist_ok=True)
    queue.mark_answered(study, 1, "ok", now=now + 5)
    queue.mark_delivered(queue.next_due(now=now + 5), now=now + 6)
    return study.study_key


def test_purge_removes_only_studies_delivered_long_enough_ago_with_their_files(tmp_path):
    queue = StudyQueue(tmp_path)
    old = _delivered(queue, "1.2.3", ["1.2.3.1", "1.2.3.2"], now=0.0)
    recent = _delivered(queue, "1.2.4", ["1.2.4.1"], now=100.0)
    queue.add_instance("1.2.5", "1.2.5.1", b"x", now=0.0)  # never delivered: never purged
    assert queue.purge_delivered(older_than=50, now=110.0) == 1
    assert sorted(s.study_uid for s in queue.studies()) == ["1.2.4", "1.2.5"]
    assert not os.path.exists(queue.study_folder(old)) and not os.path.exists(queue.result_folder(old))
    assert os.path.isdir(queue.study_folder(recent)) and os.path.isdir(queue.result_folder(recent))
    assert queue.used_bytes() == 2
    assert sorted(os.listdir(tmp_path / "incoming")) == sorted([recent, key("1.2.5")])  # no trash left


def test_a_purge_killed_midway_leaves_trash_that_the_next_open_removes(tmp_path):
    queue = StudyQueue(tmp_path)
    trash = tmp_path / "incoming" / ".purging-abc"
    trash.mkdir()
    (trash / "x.dcm").write_bytes(b"x")
    StudyQueue(tmp_path)
    assert not trash.exists()
    assert queue.studies() == []


class _BrokenClassifier:
    def describe(self):
        raise RuntimeError("header value TESTPATIENT^ALICE")  # what an error message could quote


def test_an_inference_error_fails_the_study_and_logs_its_type_only(tmp_path, caplog):
    queue = StudyQueue(tmp_path / "work")
    queue.add_instance("1.2.3", "1.2.3.1", b"x", now=0.0)
    worker = Worker(queue, _BrokenClassifier(), Destination("PACS", "127.0.0.1", 1), "ROBUSTMRI", study_timeout=0)
    with caplog.at_level("INFO"):
        assert worker.step()
    study = _state(queue, "1.2.3")
    assert (study.state, study.outcome) == (FAILED, "failed: RuntimeError")
    assert "RuntimeError" in caplog.text and "TESTPATIENT" not in caplog.text
    queue.add_instance("1.2.3", "1.2.3.2", b"y")  # a new instance retries it
    assert _state(queue, "1.2.3").state == RECEIVING


def test_a_destination_that_cannot_be_reached_keeps_the_study_answered_with_back_off(tmp_path):
    queue = StudyQueue(tmp_path / "work")
    queue.add_instance("1.2.3", "1.2.3.1", b"x", now=0.0)
    queue.promote_complete(timeout=1, now=5.0)
    study = queue.next_ready()
    sr = new_instance(BASIC_TEXT_SR_STORAGE)
    sr.StudyInstanceUID = "1.2.3"
    os.makedirs(queue.result_folder(study.study_key))
    sr.save_as(os.path.join(queue.result_folder(study.study_key), "1.2.3.sr.dcm"), enforce_file_format=True)
    queue.mark_answered(study, 1, "ok")
    with socket.socket() as closed:  # a port with nothing listening
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    worker = Worker(queue, None, Destination("PACS", "127.0.0.1", port), "ROBUSTMRI", study_timeout=1)
    started = time.time()
    assert worker.step()
    study = _state(queue, "1.2.3")
    assert (study.state, study.attempts) == (ANSWERED, 1)
    assert started + backoff(0) <= study.next_attempt <= time.time() + backoff(0)
    assert not worker.step()  # not due yet: nothing to do
