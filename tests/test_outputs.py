"""Atomic output files: two writers of one name, a concurrent reader, a full disk."""

import errno
import json
import multiprocessing
import os
import threading

import pytest

from robustmri import outputs
from robustmri.outputs import locked, read_json, write_bytes, write_json


def _write_many(path: str, writer: int, n: int, errors) -> None:
    for k in range(n):
        try:
            write_json(path, {"writer": writer, "k": k, "padding": "x" * (2000 + 37 * writer)})
        except Exception as err:  # noqa: BLE001 - the test counts every failure
            errors.put(f"{type(err).__name__}: {err}")


def test_two_processes_and_a_reader_never_see_a_torn_file(tmp_path):
    path = str(tmp_path / "summary.json")
    write_json(path, {"writer": -1, "k": -1, "padding": ""})
    context = multiprocessing.get_context("spawn")
    errors = context.Queue()
    writers = [context.Process(target=_write_many, args=(path, w, 150, errors)) for w in range(2)]
    for process in writers:
        process.start()
    reads, torn = 0, []
    while any(p.is_alive() for p in writers):
        with open(path) as handle:
            text = handle.read()
        reads += 1
        try:
            payload = json.loads(text)
            assert payload["padding"] == "x" * (2000 + 37 * payload["writer"]) if payload["writer"] >= 0 else True
        except (json.JSONDecodeError, AssertionError):
            torn.append(len(text))
    for process in writers:
        process.join(timeout=120)
        assert process.exitcode == 0
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    assert failures == [] and torn == [] and reads > 0
    assert read_json(path)["k"] == 149
    assert sorted(os.listdir(tmp_path)) == ["summary.json"]  # no temporary left by either writer


def test_threads_writing_one_name(tmp_path):
    path = str(tmp_path / "a.json")
    errors = []

    def run(writer):
        for k in range(100):
            try:
                write_json(path, {"writer": writer, "k": k})
            except Exception as err:  # noqa: BLE001
                errors.append(err)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and read_json(path)["k"] == 99 and os.listdir(tmp_path) == ["a.json"]


@pytest.mark.parametrize("failing", ["write", "fsync"])
def test_full_disk_leaves_the_old_file_whole_and_no_temporary(tmp_path, monkeypatch, failing):
    old = tmp_path / "report.sr.dcm"
    write_bytes(old, b"old content")

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if failing == "fsync":
        monkeypatch.setattr(outputs.os, "fsync", no_space)
        writer = lambda handle: handle.write(b"new content")  # noqa: E731
    else:
        def writer(handle):
            handle.write(b"half of the ")
            no_space()

    with pytest.raises(OSError) as raised:
        outputs.write_atomic(old, writer)
    assert raised.value.errno == errno.ENOSPC
    assert old.read_bytes() == b"old content"  # never torn under its final name
    with pytest.raises(OSError):
        outputs.write_atomic(tmp_path / "new.json", writer)
    assert sorted(os.listdir(tmp_path)) == ["report.sr.dcm"]  # no new file, no temporary


def test_unserialisable_payload_writes_nothing(tmp_path):
    with pytest.raises(TypeError):
        write_json(tmp_path / "a.json", {"x": object()})
    assert os.listdir(tmp_path) == []


def test_written_files_have_ordinary_permissions(tmp_path):
    path = write_json(tmp_path / "a.json", {"a": 1})
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~outputs._UMASK


def test_a_figure_is_written_whole_and_closed(tmp_path):
    fig, axis = outputs.plt.subplots()
    axis.plot([0, 1], [1, 0])
    outputs.save_figure(fig, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not outputs.plt.fignum_exists(fig.number) and os.listdir(tmp_path) == ["curve.png"]


def test_a_second_holder_of_the_lock_waits_for_the_first(tmp_path):
    """``locked``: the second run to reach a missing file waits until the first has written it, then sees it."""
    target, order, held = tmp_path / "state.pt", [], threading.Event()

    def first():
        with locked(target):
            held.set()
            threading.Event().wait(0.3)  # the first run computing the file
            write_bytes(target, b"state")
            order.append("first wrote")

    thread = threading.Thread(target=first)
    thread.start()
    held.wait(5)
    with locked(target):  # a separate open file: blocks while the first holds the lock
        order.append(f"second sees {target.read_bytes()!r}")
    thread.join(5)
    assert order == ["first wrote", "second sees b'state'"]
