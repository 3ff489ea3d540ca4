"""A PACS on loopback for the DICOM node's tests and benchmark: Orthanc with a temporary configuration, the node
(``robustmri-node``) as a subprocess, dcmtk's ``storescu`` to send it studies, and bounded waits.

Orthanc and ``storescu`` come from the Debian packages ``orthanc`` and ``dcmtk`` (:func:`pacs_tools_missing`).
Every process is started on free 127.0.0.1 ports and stopped by its PID; every wait has a bound.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from robustmri.deploy.node.queue import DATABASE, DELIVERED, StudyQueue

NODE_AET, PACS_AET = "ROBUSTMRI", "PACS"
#: Bound (seconds) of a process starting: Orthanc's HTTP port answering, the node's DICOM port listening.
START_S = 60


def dcmtk_storescu() -> str | None:
    """dcmtk's ``storescu`` on PATH, or None. pynetdicom installs a Python ``storescu`` with other options into a
    virtual environment's ``bin``, which comes first on PATH once the environment is activated: it is skipped."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        found = shutil.which("storescu", path=folder) if folder else None
        if found is None:
            continue
        with open(found, "rb") as handle:
            first_line = handle.readline(200)
        if not (first_line.startswith(b"#!") and b"python" in first_line):
            return found
    return None


def pacs_tools_missing() -> list[str]:
    """The programs a PACS round trip needs that are not on PATH (Orthanc, dcmtk's storescu)."""
    return [name for name, found in (("Orthanc", shutil.which("Orthanc")), ("storescu", dcmtk_storescu()))
            if not found]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float, what: str, interval: float = 0.25):
    """``condition()``'s first truthy value within ``timeout`` seconds; ``TimeoutError`` naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _stop(process: subprocess.Popen, signal_number: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Signal ``process`` (by its PID) and wait for it; SIGKILL when it outlives ``timeout``."""
    if process.poll() is None:
        process.send_signal(signal_number)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def _exited(name: str, process: subprocess.Popen, log: str) -> str:
    """Why a process stopped before it was up: its status and last log line first (the reason), then its log's end."""
    last = (log.strip().splitlines() or ["(no output)"])[-1]
    return f"{name} exited with status {process.returncode}: {last}\n{log[-3000:]}"


class Orthanc:
    """Orthanc on loopback ports with a temporary configuration (PACS's AE title, the node as its one modality)."""

    def __init__(self, folder: Path, node_port: int, dicom_port: int | None = None, tls: dict | None = None):
        self.folder, self.dicom_port, self.http_port = Path(folder), dicom_port or free_port(), free_port()
        self.folder.mkdir(parents=True, exist_ok=True)
        # HTTP authentication off only because HTTP answers 127.0.0.1 alone (RemoteAccessAllowed false); Orthanc 1.10
        # cannot bind its DICOM port to loopback, so it stores only from the node's AE title on 127.0.0.1
        config = {"Name": "robustmri-test", "StorageDirectory": str(self.folder / "db"),
                  "IndexDirectory": str(self.folder / "db"),
                  "DicomAet": PACS_AET, "DicomPort": self.dicom_port, "HttpPort": self.http_port,
                  "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": True,
                  "DicomCheckModalityHost": True,
                  "DicomAlwaysAllowStore": False, "DicomModalities": {"node": [NODE_AET, "127.0.0.1", node_port]},
                  "Plugins": []}
        if tls:  # the PACS's own certificate and key, the CA its peers' certificates chain to; the node over TLS
            config.update(DicomTlsEnabled=True, DicomTlsCertificate=tls["cert"], DicomTlsPrivateKey=tls["key"],
                          DicomTlsTrustedCertificates=tls["ca"], DicomTlsRemoteCertificateRequired=True,
                          DicomModalities={"node": {"AET": NODE_AET, "Host": "127.0.0.1", "Port": node_port,
                                                    "UseDicomTls": True}})
        (self.folder / "orthanc.json").write_text(json.dumps(config))
        self.process = None

    def start(self) -> "Orthanc":
        self.log = open(self.folder / "orthanc.log", "ab")
        self.process = subprocess.Popen(["Orthanc", str(self.folder / "orthanc.json")], stdout=self.log,
                                        stderr=subprocess.STDOUT)
        wait_for(lambda: self._up(), START_S, "Orthanc's HTTP port")
        return self

    def _up(self) -> bool:
        if self.process.poll() is not None:
            log = (self.folder / "orthanc.log").read_text(errors="replace")
            raise RuntimeError(_exited("Orthanc", self.process, log))
        try:
            return self.get("/system")["DicomAet"] == PACS_AET
        except OSError:
            return False

    def get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as response:
            return json.load(response)

    def post(self, path: str, body: dict):
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    def srs(self, study_uid: str) -> list[dict]:
        """The SR instances of the study held by Orthanc (their tags)."""
        found = self.post("/tools/find", {"Level": "Instance", "Expand": True,
                                          "Query": {"StudyInstanceUID": study_uid, "Modality": "SR"}})
        return [self.get(f"/instances/{item['ID']}/simplified-tags") for item in found]

    def sr_ids(self) -> list[str]:
        """Orthanc's identifiers of every SR instance it holds (one query, cheap enough to poll)."""
        return self.post("/tools/find", {"Level": "Instance", "Query": {"Modality": "SR"}})

    def n_instances(self) -> int:
        return self.get("/statistics")["CountInstances"]

    def stop(self) -> None:
        if self.process:
            _stop(self.process)
            self.log.close()


class Node:
    """``robustmri-node`` as a subprocess (``python -m robustmri.deploy.node.cli``), its log in its folder.

    ``extra``: further options, e.g. how the model is trusted (``("--public_key", PEM)``, ``("--allow_unsigned",)``).
    """

    def __init__(self, folder: Path, model: Path, destination_port: int, port: int | None = None,
                 study_timeout: float = 1.0, work_dir: Path | None = None, extra: tuple = ()):
        self.folder, self.port = Path(folder), port or free_port()
        self.work_dir = Path(work_dir) if work_dir else self.folder / "work"
        self.args = [sys.executable, "-m", "robustmri.deploy.node.cli", "--model", str(model),
                     "--listen", f"127.0.0.1:{self.port}",
                     "--ae_title", NODE_AET, "--destination", f"{PACS_AET}@127.0.0.1:{destination_port}",
                     "--work_dir", str(self.work_dir), "--study_timeout", str(study_timeout), *map(str, extra)]
        self.process = None

    def start(self) -> "Node":
        self.folder.mkdir(parents=True, exist_ok=True)
        self.log = open(self.folder / "node.log", "ab")
        self.process = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(self._listening, START_S, "the node's port")
        return self

    def _listening(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(_exited("the node", self.process, self.log_text()))
        with socket.socket() as s:
            s.settimeout(1)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def log_text(self) -> str:
        return (self.folder / "node.log").read_text(errors="replace")

    def studies(self) -> dict:
        """The queue as the node left it on disk: study UID -> its row."""
        if not (self.work_dir / DATABASE).exists():
            return {}
        queue = StudyQueue(self.work_dir, read_only=True)
        try:
            return {s.study_uid: s for s in queue.studies()}
        finally:
            queue.close()

    def delivered(self, study_uid: str, generation: int = 1):
        study = self.studies().get(study_uid)
        return study if study and study.state == DELIVERED and study.generation >= generation else None

    def stop(self) -> int:
        """SIGTERM, and its exit status (the node must stop within the bound)."""
        _stop(self.process, timeout=START_S)
        self.log.close()
        return self.process.returncode

    def kill(self) -> None:
        self.process.kill()  # SIGKILL: nothing of the node runs after it
        self.process.wait(timeout=30)
        self.log.close()


def storescu(folder: Path, port: int, calling: str = PACS_AET, tls: dict | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess:
    """Every DICOM file under ``folder`` to the node, as the PACS would send a study (one association);
    ``tls``: over TLS with that certificate and key, the node's certificate checked against the CA."""
    secure = ["+tls", tls["key"], tls["cert"], "+cf", tls["ca"]] if tls else []
    program = dcmtk_storescu()
    if program is None:
        raise FileNotFoundError("dcmtk's storescu is not on PATH (apt-get install dcmtk)")
    return subprocess.run([program, *secure, "-aet", calling, "-aec", NODE_AET, "+sd", "+r", "127.0.0.1",
                           str(port), str(folder)], capture_output=True, text=True, timeout=timeout)
