"""The MONAI Label app's test fixtures: a tiny labelled study set, a tiny bundle, and the real server on loopback.

:func:`running_server` starts ``monailabel start_server`` as a subprocess in its own process
group and stops that group by the server's PID in a ``finally``, whatever the test does.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest
import torch
from PIL import Image

from robustmri.data.synthetic import generate_slices
from robustmri.engine.model_metadata import METADATA_FILE, model_metadata
from robustmri.networks import PaperCNN
from robustmri.outputs import write_json
from robustmri.review.label_review import write_label_file

from conftest import ROOT
from helpers import write_abstention_state

REPO = str(ROOT)
APP = os.path.join(REPO, "apps", "monailabel")
CLASS_NAMES = ("meningioma", "glioma", "pituitary")
#: Written to the study folder: not an image, never labelled.
BROKEN = "broken.png"


def make_studies(studies, n=12):
    """``n`` tiny PNG slices with JSON labels (patient groups), and one unreadable file without a label."""
    synthetic = generate_slices(n_patients=max(6, n // 2), size=64, seed=0)
    (studies / "labels" / "final").mkdir(parents=True)
    for k, (image, label) in enumerate(zip(synthetic["images"][:n], synthetic["labels"][:n])):
        Image.fromarray((image * 255).astype(np.uint8)).save(studies / f"case{k:02d}.png")
        write_label_file(str(studies / "labels" / "final" / f"case{k:02d}.label.json"), CLASS_NAMES[int(label)],
                         group=str(int(synthetic["groups"][k])))
    (studies / BROKEN).write_bytes(b"not a PNG")
    return studies


def make_bundle(bundle, network=None, network_def=None, padding=2, preprocess="minmax"):
    """The repository's configs and an untrained 64 px checkpoint with its model_metadata.json and abstention state, as
    training writes them (so the app must take spatial size and padding from there); ``network_def`` replaces
    train.json's."""
    shutil.copytree(os.path.join(REPO, "bundle", "configs"), bundle / "configs")
    if network_def is not None:  # as a user would: edit train.json, then regenerate the configs built on it
        from robustmri.engine.configs import write
        from robustmri.methods import config_sources

        edit_config(bundle, "train.json", network_def=network_def)
        write(bundle / "configs", config_sources())
    (bundle / "models").mkdir()
    torch.manual_seed(0)
    network = network if network is not None else PaperCNN(spatial_size=64, padding=padding)
    torch.save(network.state_dict(), bundle / "models" / "model.pt")
    write_json(str(bundle / "models" / METADATA_FILE), model_metadata({}, 64, padding, network, CLASS_NAMES,
                                                                      preprocess=preprocess))
    write_abstention_state(bundle / "models" / "model.pt", network, 64, preprocess)
    return bundle


def edit_config(bundle, name, **values):
    path = bundle / "configs" / name
    config = json.loads(path.read_text())
    config.update(values)
    path.write_text(json.dumps(config, indent=4))


def copy_app(app):
    """The app folder copied (start_server creates model/, logs/, bin/ in it: keep them out of the repo)."""
    shutil.copytree(APP, app, ignore=shutil.ignore_patterns("__pycache__", "model", "logs", "bin"))
    return app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerError(AssertionError):
    """An HTTP error answer: ``status`` and the body's text."""

    def __init__(self, message: str, status: int = 0, body: str = ""):
        super().__init__(message)
        self.status, self.body = status, body


#: Sent with every request by default: the server refuses a state-changing request without it.
REQUESTED_WITH = {"X-Requested-With": "robustmri"}


def _headers(defaults: dict, headers: dict | None) -> dict:
    """``defaults`` updated with ``headers``; a header given as None is left out."""
    merged = {**defaults, **(headers or {})}
    return {k: v for k, v in merged.items() if v is not None}


def request(url, method="GET", timeout=60, body=None, headers=None):
    """JSON in, JSON out, with ``X-Requested-With`` unless ``headers`` sets it to None; an HTTP error raises
    :class:`ServerError` with its status and body."""
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    req = urllib.request.Request(url, method=method, data=data, headers=_headers(
        {"Content-Type": "application/json", **REQUESTED_WITH}, headers))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return json.loads(response.read().decode())
    except urllib.error.HTTPError as err:
        text = err.read().decode(errors="replace")[:2000]
        raise ServerError(f"{method} {url}: HTTP {err.code} {text}", err.code, text) from err


def upload_label(base, image_id, content: bytes, filename: str, timeout=30, tag="final", headers=None):
    """``PUT /datastore/label?image=<id>&tag=<tag>`` with one file (multipart), as clients upload labels
    (``tag`` goes into the URL as given; ``headers`` as in :func:`request`)."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"label\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/json\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(f"{base}/datastore/label?image={image_id}&tag={tag}", method="PUT", data=body,
                                 headers=_headers({"Content-Type": f"multipart/form-data; boundary={boundary}",
                                                   **REQUESTED_WITH}, headers))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return json.loads(response.read().decode())
    except urllib.error.HTTPError as err:
        text = err.read().decode(errors="replace")[:2000]
        raise ServerError(f"PUT label {image_id}: HTTP {err.code} {text}", err.code, text) from err


def tail(path, n=4000):
    with open(path, errors="replace") as handle:
        return handle.read()[-n:]


def wait(condition, deadline, what, process, log_path):
    """Poll ``condition`` until truthy; fail with the server log if the server exits or time runs out."""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited ({process.returncode}) while waiting for {what}:\n{tail(log_path)}")
        try:
            value = condition()
            if value:
                return value
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}:\n{tail(log_path)}")


def server_command(app, studies, port, bundle, *conf):
    """The app README's start command (``--host 127.0.0.1``) with this test's folders and port."""
    return [os.path.join(os.path.dirname(sys.executable), "monailabel"), "start_server", "--app", str(app),
            "--studies", str(studies), "--host", "127.0.0.1", "--port", str(port), "--conf", "models",
            "brain_tumour", "--conf", "bundle_path", str(bundle), *conf]


@contextlib.contextmanager
def running_server(command, workdir, deadline, port, ready=None):
    """Run ``command`` (a start_server command line) and yield ``(base URL, process, log path)`` once ``/info/``
    answers (or ``ready(base URL)`` is truthy: a server with authentication on answers /info/ with 401); the
    server's process group is stopped by its PID when the block ends, in any case."""
    env = {**os.environ, "MONAILABEL_PYEXE": sys.executable, "OMP_NUM_THREADS": "1",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    log_path = workdir / f"server-{port}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir,
                                   start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait(lambda: ready(base) if ready else request(f"{base}/info/", timeout=5), deadline, "the server", process,
             log_path)
        yield base, process, log_path
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    """Stop a server started in its own session (``start_new_session=True``): its whole process group, by PID."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)
