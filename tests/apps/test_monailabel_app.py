"""The MONAI Label app, served for real: ``monailabel start_server`` on 127.0.0.1.

Needs the ``[label]`` extra (``make test`` installs it); skipped, and counted, without it.
The rest of the suite never imports monailabel.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from robustmri.data.synthetic import generate_slices
from robustmri.networks import PaperCNN
from robustmri.review.label_review import write_label_file

from conftest import ROOT

pytest.importorskip("monailabel", reason="MONAI Label is the optional [label] extra")

REPO = str(ROOT)
CLASS_NAMES = ("meningioma", "glioma", "pituitary")
DEADLINE_S = 150


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerError(AssertionError):
    pass


def _request(url, method="GET", timeout=60, body=None):
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    request = urllib.request.Request(url, method=method, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read().decode())
    except urllib.error.HTTPError as err:
        raise ServerError(f"{method} {url}: HTTP {err.code} {err.read().decode(errors='replace')[:2000]}") from err


def _score_unless_busy(base):
    try:
        return _request(f"{base}/scoring/influence_review?run_sync=true", "POST")
    except ServerError as err:
        if "HTTP 429" in str(err):  # "Scoring Task is Already Running"
            return None
        raise


def _wait(condition, deadline, what, process, log_path):
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited ({process.returncode}) while waiting for {what}:\n{_tail(log_path)}")
        try:
            value = condition()
            if value:
                return value
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}:\n{_tail(log_path)}")


def _tail(path, n=4000):
    with open(path, errors="replace") as handle:
        return handle.read()[-n:]


@pytest.mark.slow
@pytest.mark.monailabel
def test_server_infers_scores_and_serves_the_most_suspicious_label(tmp_path):
    # studies: 12 tiny PNG slices with JSON labels, one of them deliberately wrong
    synthetic = generate_slices(n_patients=6, size=64, seed=0)
    studies = tmp_path / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for k, (image, label) in enumerate(zip(synthetic["images"][:12], synthetic["labels"][:12])):
        Image.fromarray((image * 255).astype(np.uint8)).save(studies / f"case{k:02d}.png")
        write_label_file(str(studies / "labels" / "final" / f"case{k:02d}.label.json"), CLASS_NAMES[int(label)],
                         group=str(int(synthetic["groups"][k])))
    # a local bundle: the repository's configs and an untrained quick-profile checkpoint (64 px, padding 2)
    bundle = tmp_path / "bundle"
    shutil.copytree(os.path.join(REPO, "bundle", "configs"), bundle / "configs")
    (bundle / "models").mkdir()
    torch.manual_seed(0)
    torch.save(PaperCNN(spatial_size=64, padding=2).state_dict(), bundle / "models" / "model.pt")
    app = tmp_path / "app"  # start_server creates model/, logs/, bin/ in the app folder: keep them out of the repo
    shutil.copytree(os.path.join(REPO, "apps", "monailabel"), app,
                    ignore=shutil.ignore_patterns("__pycache__", "model", "logs", "bin"))

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MONAILABEL_PYEXE": sys.executable, "OMP_NUM_THREADS": "1",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    command = [os.path.join(os.path.dirname(sys.executable), "monailabel"), "start_server", "--app", str(app),
               "--studies", str(studies), "--host", "127.0.0.1", "--port", str(port), "--conf", "models",
               "brain_tumour", "--conf", "bundle_path", str(bundle), "--conf", "spatial_size", "64",
               "--conf", "network_padding", "2"]
    log_path = tmp_path / "server.log"
    deadline = time.monotonic() + DEADLINE_S
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                                   start_new_session=True)
    try:
        _exercise(base, deadline, process, log_path, bundle)
    except ServerError as err:
        pytest.fail(f"{err}\nserver log:\n{_tail(log_path)}")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=15)


def _exercise(base, deadline, process, log_path, bundle):
    """/info/, infer on a study image, ISP training, influence scoring, then the active-learning strategy."""
    info = _wait(lambda: _request(f"{base}/info/", timeout=5), deadline, "/info/", process, log_path)
    assert info["models"]["brain_tumour"]["type"] == "classification"
    assert set(info["strategies"]) >= {"most_suspicious"} and "influence_review" in info["scoring"]

    result = _request(f"{base}/infer/brain_tumour?image=case03&output=json", "POST")
    probabilities = result["probabilities"]
    assert list(probabilities) == list(CLASS_NAMES)
    assert abs(sum(probabilities.values()) - 1.0) < 1e-5
    assert result["class"] == max(probabilities, key=probabilities.get)

    assert not (bundle / "models" / "model_final.pt").exists()
    _request(f"{base}/train/brain_tumour?run_sync=true", "POST", timeout=120,
             body={"max_epochs": 2, "influence_epoch": 1, "val_split": 0.34, "device": "cpu"})
    assert (bundle / "models" / "model_final.pt").is_file()  # the bundle's ISP run wrote its checkpoints
    with open(bundle / "eval" / "influence_summary.json") as handle:
        summary = json.load(handle)
    assert summary["method"] == "ISP" and summary["n_train"] + summary["n_val"] == 12

    # training starts a background scoring run; score again, synchronously, once it is done
    scoring = _wait(lambda: _score_unless_busy(base), deadline, "the post-training scoring", process, log_path)
    assert scoring["scored"] == 12 and scoring["skipped"] == []
    sample = _request(f"{base}/activelearning/most_suspicious", "POST")
    scores = {f"case{k:02d}": _request(f"{base}/datastore/image/info?image=case{k:02d}")["influence_review"]["score"]
              for k in range(12)}
    assert sample["id"] == min(scores, key=scores.get)
    assert sample["influence_score"] == pytest.approx(scores[sample["id"]])
    assert sample["rank"] == 1 and sample["of"] == 12
    assert all(score <= 0 for score in scores.values())
