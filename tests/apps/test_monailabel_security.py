"""The MONAI Label app's secure defaults over HTTP: loopback only, train requests on an allow-list, labels checked.

One real server (``monailabel start_server`` as the app README documents it) serves every
check; it is stopped by its PID in a ``finally`` (label_server.running_server).
"""

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("monailabel", reason="MONAI Label is the optional [label] extra")
psutil = pytest.importorskip("psutil")

from label_server import (  # noqa: E402  (tests/apps/label_server.py, after the skip)
    APP,
    ServerError,
    copy_app,
    free_port,
    make_bundle,
    make_studies,
    request,
    running_server,
    tail,
    upload_label,
)

DEADLINE_S = 90
README = Path(APP) / "README.md"


def documented_command(app, studies, port, bundle) -> tuple[list[str], dict]:
    """The app README's start command (its first ``monailabel start_server`` block), with this test's folders,
    port and bundle; the environment variables it sets come back as a dict."""
    text = README.read_text()
    match = re.search(r"^((?:[A-Z_]+=\S+ )*)monailabel start_server (.+?)(?<!\\)$", text.replace("\\\n", " "), re.M)
    assert match, f"{README}: no 'monailabel start_server' command"
    env = dict(item.split("=", 1) for item in shlex.split(match.group(1)))
    args = shlex.split(match.group(2))
    values = {"apps/monailabel": str(app), "/path/to/studies": str(studies), "8000": str(port)}
    args = [values.get(a, a) for a in args]
    executable = os.path.join(os.path.dirname(sys.executable), "monailabel")
    return [executable, "start_server", *args, "--conf", "bundle_path", str(bundle)], env


def listening_addresses(pid: int) -> set:
    """(ip, port) of every listening TCP socket of ``pid`` and its children."""
    processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    found = set()
    for process in processes:
        for conn in process.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN:
                found.add((conn.laddr.ip, conn.laddr.port))
    return found


def non_loopback_addresses() -> list[str]:
    return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family == socket.AF_INET and not a.address.startswith("127.")]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The documented command on a tiny study set: (base URL, process, log path, studies, env of the command)."""
    tmp_path = tmp_path_factory.mktemp("label_security")
    studies = make_studies(tmp_path / "studies")
    bundle = make_bundle(tmp_path / "bundle")
    app = copy_app(tmp_path / "app")
    port = free_port()
    command, env = documented_command(app, studies, port, bundle)
    os.environ.update(env)  # the documented environment (restricted CORS origins) for the server started below
    try:
        with running_server(command, tmp_path, time.monotonic() + DEADLINE_S, port) as (base, process, log_path):
            yield base, process, log_path, studies, env
    finally:
        for key in env:
            os.environ.pop(key, None)


@pytest.mark.slow
@pytest.mark.monailabel
def test_the_documented_server_listens_on_loopback_only(server):
    base, process, log_path, _, _ = server
    port = int(base.rsplit(":", 1)[1])
    addresses = listening_addresses(process.pid)
    assert addresses == {("127.0.0.1", port)}, addresses
    for address in non_loopback_addresses():  # the machine's other addresses do not answer
        with pytest.raises(OSError):
            socket.create_connection((address, port), timeout=2).close()


@pytest.mark.slow
@pytest.mark.monailabel
def test_a_foreign_origin_is_not_allowed_by_cors(server):
    base = server[0]
    preflight = urllib.request.Request(f"{base}/datastore/label?id=case00&tag=final", method="OPTIONS", headers={
        "Origin": "http://attacker.example", "Access-Control-Request-Method": "DELETE"})
    try:
        with urllib.request.urlopen(preflight, timeout=10) as response:
            allowed = response.headers.get("access-control-allow-origin")
    except urllib.error.HTTPError as err:  # Starlette answers a refused preflight with 400
        allowed = err.headers.get("access-control-allow-origin")
    assert allowed is None


@pytest.mark.slow
@pytest.mark.monailabel
@pytest.mark.parametrize("field, value", [
    ("tracking_uri", "$__import__('pathlib').Path(r'{marker}').touch()"),
    ("tracking_experiment_name", "$__import__('pathlib').Path(r'{marker}').touch()"),
    ("tracking_run_name", "%{marker}#x"),
    ("tracking_run_name", "@train#trainer"),
    ("tracking_uri", "file:///tmp/runs#nested"),
    ("tracking", "{marker}.json"),  # a settings file the server was not started with
    ("run_id", "network_def"),
    ("model_filename", "../../elsewhere.pt"),
    ("max_epochs", "$1+1"),
    ("bundle_path", "/tmp"),  # not an accepted field
])
def test_train_requests_outside_the_allow_list_are_rejected_and_nothing_is_evaluated(server, tmp_path, field, value):
    base, process, log_path, _, _ = server
    marker = tmp_path / "evaluated"
    body = {"max_epochs": 1, "device": "cpu", "tracking": "mlflow", field: value.format(marker=marker)}
    with pytest.raises(ServerError) as err:
        request(f"{base}/train/brain_tumour?run_sync=true", "POST", body=body, timeout=30)
    assert err.value.status == 422, err.value
    assert field in json.loads(err.value.body)["detail"]
    with pytest.raises(ServerError) as err:  # the deprecated "train all" route checks the same
        request(f"{base}/train/?run_sync=true", "POST", body={"brain_tumour": body}, timeout=30)
    assert err.value.status == 422
    time.sleep(0.5)
    assert not marker.exists(), f"the request was evaluated:\n{tail(log_path)}"
    with pytest.raises(ServerError) as err:  # no training task was ever started
        request(f"{base}/train/", timeout=10)
    assert err.value.status == 404 and "No Train Tasks Found" in err.value.body


@pytest.mark.slow
@pytest.mark.monailabel
def test_label_uploads_are_checked_against_the_bundles_classes_and_the_studies(server):
    base, _, _, studies, _ = server
    final = studies / "labels" / "final"
    before = sorted(p.name for p in final.iterdir())
    original = (final / "case03.label.json").read_text()
    rejected = {
        "unknown class": ("case03", b'{"label": "astrocytoma"}', "case03.label.json", "unknown class 'astrocytoma'"),
        "no such image": ("case99", b'{"label": "glioma"}', "case99.label.json", "no such image"),
        "stray name": ("case03", b'{"label": "glioma"}', "label.json", "must be named <image id>.label.json"),
        "not JSON": ("case03", b"glioma", "case03.label.json", "not JSON"),
        "index out of range": ("case03", b'{"label": 7}', "case03.label.json", "class index 7 outside 0..2"),
    }
    for what, (image_id, content, filename, reason) in rejected.items():
        with pytest.raises(ServerError) as err:
            upload_label(base, image_id, content, filename)
        assert err.value.status == 422, (what, err.value)
        assert reason in json.loads(err.value.body)["detail"], (what, err.value.body)
    assert sorted(p.name for p in final.iterdir()) == before  # no stray case03.json, nothing for case99
    assert (final / "case03.label.json").read_text() == original

    saved = upload_label(base, "case03", b'{"label": "Pituitary", "group": "7"}', "case03.label.json")
    assert saved["label"] == "case03"
    assert json.loads((final / "case03.label.json").read_text()) == {"label": "Pituitary", "group": "7"}
    assert request(f"{base}/datastore/label/info?label=case03&tag=final")["label"] == "pituitary"


@pytest.mark.slow
@pytest.mark.monailabel
def test_a_server_on_all_interfaces_without_authentication_refuses_to_start(tmp_path):
    """MONAI Label's default host (0.0.0.0) with authentication off: the app stops at start-up and says why."""
    studies = make_studies(tmp_path / "studies", n=2)
    bundle = make_bundle(tmp_path / "bundle")
    app = copy_app(tmp_path / "app")
    port = free_port()
    command = [os.path.join(os.path.dirname(sys.executable), "monailabel"), "start_server", "--app", str(app),
               "--studies", str(studies), "--port", str(port), "--conf", "bundle_path", str(bundle)]
    env = {**os.environ, "MONAILABEL_PYEXE": sys.executable, "OMP_NUM_THREADS": "1",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=DEADLINE_S)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
            process.wait(timeout=15)
    text = output.decode(errors="replace")
    assert "refusing to serve on 0.0.0.0 with authentication off" in text, text[-3000:]
    assert process.returncode != 0


@pytest.mark.monailabel
def test_restrict_cors_allows_the_listed_origins_only(monkeypatch):
    """lib.server.restrict_cors on MONAI Label's own middleware set-up (every origin, with credentials)."""
    from fastapi import FastAPI
    from fastapi.middleware import Middleware
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.testclient import TestClient

    monkeypatch.syspath_prepend(APP)
    from lib.server import restrict_cors

    server = FastAPI(middleware=[Middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=True,
                                            allow_methods=["*"], allow_headers=["*"])])
    server.get("/info/")(lambda: {})

    def allowed(origin):
        response = TestClient(server).options("/info/", headers={"Origin": origin,
                                                                 "Access-Control-Request-Method": "DELETE"})
        return response.headers.get("access-control-allow-origin")

    assert allowed("http://attacker.example") == "http://attacker.example"  # MONAI Label's default
    server.middleware_stack = server.build_middleware_stack()
    assert restrict_cors(server, ["https://viewer.example.org"])
    assert allowed("http://attacker.example") is None
    assert allowed("https://viewer.example.org") == "https://viewer.example.org"
    for name in [n for n in sys.modules if n == "lib" or n.startswith("lib.")]:
        del sys.modules[name]


@pytest.mark.monailabel
def test_the_train_options_the_app_offers_pass_the_allow_list(tmp_path, monkeypatch):
    """What a client sends back from the trainer's options (``/info/`` trainers config) is accepted as it is."""
    monkeypatch.syspath_prepend(APP)
    from lib.train_request import TrainRequestRejected, validate_train_request
    from lib.trainers.isp import ISPTrain

    options = ISPTrain(str(make_bundle(tmp_path / "bundle")), {}).config()
    request_body = {"model": "brain_tumour", **options}
    assert validate_train_request(request_body, ("brain_tumour",)) == request_body
    settings_file = str(tmp_path / "tracking.json")
    assert validate_train_request({"tracking": settings_file}, ("brain_tumour",), settings_file)
    with pytest.raises(TrainRequestRejected, match="tracking"):
        validate_train_request({"tracking": settings_file}, ("brain_tumour",))
    with pytest.raises(TrainRequestRejected, match="tracking_uri: must be a plain value"):  # lists: every element
        validate_train_request({"tracking_uri": ["file:///srv/runs", "$__import__('os')"]}, ("brain_tumour",))
    with pytest.raises(TrainRequestRejected, match="tracking: must be one of"):
        validate_train_request({"tracking": ["mlflow", "/elsewhere.json"]}, ("brain_tumour",))
    for name in [n for n in sys.modules if n == "lib" or n.startswith("lib.")]:
        del sys.modules[name]


@pytest.mark.monailabel
def test_exposure_beyond_loopback_takes_authentication_or_an_explicit_choice(monkeypatch):
    monkeypatch.syspath_prepend(APP)
    from lib.server import bound_host, check_exposure

    assert bound_host(["monailabel", "start_server", "--app", "a"]) == "0.0.0.0"  # MONAI Label's default
    assert bound_host(["monailabel", "start_server", "--host", "10.1.2.3"]) == "10.1.2.3"
    assert bound_host(["monailabel", "start_server", "--host=::1"]) == "::1"
    for host in ("127.0.0.1", "localhost", "::1"):
        check_exposure(host, auth_enabled=False, conf={})
    with pytest.raises(RuntimeError, match="refusing to serve on 10.1.2.3 with authentication off"):
        check_exposure("10.1.2.3", auth_enabled=False, conf={"serve_unauthenticated": "no"})
    check_exposure("10.1.2.3", auth_enabled=True, conf={})
    check_exposure("0.0.0.0", auth_enabled=False, conf={"serve_unauthenticated": "true"})
    for name in [n for n in sys.modules if n == "lib" or n.startswith("lib.")]:
        del sys.modules[name]
