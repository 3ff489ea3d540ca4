"""The node's durable store: every received instance on disk and every study's state in SQLite, so that a kill -9
loses nothing that was acknowledged and a restart resumes every study not yet delivered.

Layout of the work folder::

    incoming/<study key>/<instance key>.dcm   each instance as received (written atomically, then synced)
    results/<study key>/                      infer_dicom's outputs for the study (SRs, JSON, summary.json)
    queue.sqlite3                             the studies and instances (rollback journal, synchronous=FULL)

Keys are sha256 digests of the UIDs (fixed length, safe as file names, no header text in a path).

States of a study: ``receiving`` (instances arriving) -> ``ready`` (no instance for the study timeout) ->
``answered`` (infer_dicom wrote its outputs) -> ``delivered`` (every SR stored by the destination). An
instance received in any state puts the study back to ``receiving`` (a resend is answered again; its SR
carries the same UIDs, so the PACS replaces it). ``failed``: inference raised an unexpected error (kept,
with the error's type, for the operator; a new instance of the study retries it).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass

from robustmri.outputs import write_bytes

RECEIVING, READY, ANSWERED, DELIVERED, FAILED = "receiving", "ready", "answered", "delivered", "failed"
STATES = (RECEIVING, READY, ANSWERED, DELIVERED, FAILED)
DATABASE = "queue.sqlite3"
INCOMING, RESULTS = "incoming", "results"
#: Prefix of a purged study's folders while they are removed (renamed first, so no later instance lands in them).
PURGING = ".purging-"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_key TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    state TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0,
    last_received REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    n_sr INTEGER NOT NULL DEFAULT 0,
    outcome TEXT,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
    study_key TEXT NOT NULL,
    instance_key TEXT NOT NULL,
    n_bytes INTEGER NOT NULL,
    PRIMARY KEY (study_key, instance_key)
);
"""


class QueueFull(OSError):
    """Storing the instance would take the work folder's received data over its size cap."""


def key(uid: str) -> str:
    """The file-name key of a UID (sha256, hexadecimal)."""
    return hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()


@dataclass(frozen=True)
class Study:
    """One row of the queue."""

    study_key: str
    study_uid: str
    state: str
    generation: int
    last_received: float
    attempts: int
    next_attempt: float
    n_sr: int
    outcome: str | None
    updated: float
    n_instances: int = 0
    n_bytes: int = 0


def _sync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable (the file's own fsync does not cover its directory entry)."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class StudyQueue:
    """The work folder's queue; thread-safe (the C-STORE handlers and the worker share it)."""

    def __init__(self, work_dir: str | os.PathLike, max_bytes: int | None = None, read_only: bool = False):
        self.work_dir = os.path.abspath(os.fspath(work_dir))
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        path = os.path.join(self.work_dir, DATABASE)
        if read_only:
            self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
            return
        for folder in (INCOMING, RESULTS):
            os.makedirs(os.path.join(self.work_dir, folder), exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=DELETE")
        self._db.execute("PRAGMA synchronous=FULL")  # a commit is on the disk before the C-STORE is acknowledged
        with self._db:
            self._db.executescript(_SCHEMA)
        self._remove_purged()  # what a purge killed midway left

    def _remove_purged(self) -> None:
        for folder in (INCOMING, RESULTS):
            for name in os.listdir(os.path.join(self.work_dir, folder)):
                if name.startswith(PURGING):
                    shutil.rmtree(os.path.join(self.work_dir, folder, name), ignore_errors=True)

    def close(self) -> None:
        self._db.close()

    def study_folder(self, study_key: str) -> str:
        return os.path.join(self.work_dir, INCOMING, study_key)

    def result_folder(self, study_key: str) -> str:
        return os.path.join(self.work_dir, RESULTS, study_key)

    def used_bytes(self) -> int:
        with self._lock:
            return self._used_bytes()

    def _used_bytes(self) -> int:
        return self._db.execute("SELECT COALESCE(SUM(n_bytes), 0) FROM instances").fetchone()[0]

    def add_instance(self, study_uid: str, sop_uid: str, data: bytes, now: float | None = None) -> str:
        """Store one received instance durably (file written and synced, then its row committed); the study key.
        :class:`QueueFull` when it would exceed the size cap (an instance already held is replaced, not added)."""
        now = time.time() if now is None else now
        study_key, instance_key = key(study_uid), key(sop_uid)
        with self._lock:
            held = self._db.execute("SELECT n_bytes FROM instances WHERE study_key=? AND instance_key=?",
                                    (study_key, instance_key)).fetchone()
            after = self._used_bytes() - (held[0] if held else 0) + len(data)
            if self.max_bytes is not None and after > self.max_bytes:
                raise QueueFull(f"the work folder's size cap ({self.max_bytes} bytes of received instances) is reached")
            folder = self.study_folder(study_key)
            os.makedirs(folder, exist_ok=True)
            write_bytes(os.path.join(folder, instance_key + ".dcm"), data)
            _sync_folder(folder)
            with self._db:
                self._db.execute("INSERT OR REPLACE INTO instances VALUES (?, ?, ?)", (study_key, instance_key,
                                                                                      len(data)))
                self._db.execute(
                    "INSERT INTO studies (study_key, study_uid, state, generation, last_received, updated) "
                    "VALUES (?, ?, ?, 1, ?, ?) ON CONFLICT(study_key) DO UPDATE SET state=excluded.state, "
                    "generation=generation+1, last_received=excluded.last_received, attempts=0, next_attempt=0, "
                    "updated=excluded.updated", (study_key, study_uid, RECEIVING, now, now))
        return study_key

    def promote_complete(self, timeout: float, now: float | None = None) -> int:
        """Studies with no instance for ``timeout`` seconds become ``ready``; how many."""
        now = time.time() if now is None else now
        with self._lock, self._db:
            return self._db.execute("UPDATE studies SET state=?, updated=? WHERE state=? AND last_received<=?",
                                    (READY, now, RECEIVING, now - timeout)).rowcount

    def next_ready(self) -> Study | None:
        """The ready study received first, or None."""
        return self._first("state=? ORDER BY last_received", (READY,))

    def next_due(self, now: float | None = None) -> Study | None:
        """The answered study whose next delivery attempt is due, or None."""
        now = time.time() if now is None else now
        return self._first("state=? AND next_attempt<=? ORDER BY next_attempt, last_received", (ANSWERED, now))

    def _first(self, where: str, args: tuple) -> Study | None:
        with self._lock:
            row = self._db.execute(f"SELECT * FROM studies WHERE {where} LIMIT 1", args).fetchone()
        return Study(*row) if row else None

    def _set(self, study: Study, state: str, now: float | None, **columns) -> bool:
        """Move ``study`` to ``state`` unless an instance arrived since it was read (its generation changed)."""
        now = time.time() if now is None else now
        names = "".join(f", {name}=?" for name in columns)
        with self._lock, self._db:
            return self._db.execute(f"UPDATE studies SET state=?, updated=?{names} WHERE study_key=? AND generation=?",
                                    (state, now, *columns.values(), study.study_key, study.generation)).rowcount == 1

    def mark_answered(self, study: Study, n_sr: int, outcome: str, now: float | None = None) -> bool:
        return self._set(study, ANSWERED, now, n_sr=n_sr, outcome=outcome, attempts=0, next_attempt=0)

    def mark_failed(self, study: Study, outcome: str, now: float | None = None) -> bool:
        return self._set(study, FAILED, now, outcome=outcome)

    def mark_delivered(self, study: Study, now: float | None = None) -> bool:
        return self._set(study, DELIVERED, now)

    def mark_retry(self, study: Study, delay: float, now: float | None = None) -> bool:
        """Keep the study ``answered``, its next delivery attempt ``delay`` seconds from now."""
        now = time.time() if now is None else now
        return self._set(study, ANSWERED, now, attempts=study.attempts + 1, next_attempt=now + delay)

    def purge_delivered(self, older_than: float, now: float | None = None) -> int:
        """Remove the studies delivered at least ``older_than`` seconds ago (their instances, results and rows);
        how many. Under the queue's lock, so no instance of such a study is stored meanwhile; a study sent again
        later is a new study (answered on the instances then received)."""
        now = time.time() if now is None else now
        with self._lock:
            keys = [row[0] for row in self._db.execute("SELECT study_key FROM studies WHERE state=? AND updated<=?",
                                                       (DELIVERED, now - older_than))]
            for study_key in keys:
                for folder in (self.study_folder(study_key), self.result_folder(study_key)):
                    if os.path.isdir(folder):  # renamed first: its rows then go, and a kill leaves only the trash
                        os.rename(folder, os.path.join(os.path.dirname(folder), PURGING + study_key))
                with self._db:
                    self._db.execute("DELETE FROM instances WHERE study_key=?", (study_key,))
                    self._db.execute("DELETE FROM studies WHERE study_key=?", (study_key,))
            self._remove_purged()
        return len(keys)

    def studies(self) -> list[Study]:
        """Every study with its instance count and bytes, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT s.*, COUNT(i.instance_key), COALESCE(SUM(i.n_bytes), 0) FROM studies s LEFT JOIN instances i "
                "ON i.study_key = s.study_key GROUP BY s.study_key ORDER BY s.last_received").fetchall()
        return [Study(*row) for row in rows]
