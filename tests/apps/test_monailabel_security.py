"""The MONAI Label app closed by default, over HTTP: every attack of the app README's "What the server refuses".

One real server (``monailabel start_server`` as the app README documents it) serves every
check; it is stopped by its PID in a ``finally`` (label_server.running_server). Two more starts
check the refusal to serve beyond loopback. The tests share the server's state: the train test,
which starts the first training and scoring tasks, comes last.
"""

import hashlib
import http.client
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
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
    """The documented command on a tiny study set, after a ``--host 0.0.0.0`` that its ``--host 127.0.0.1``
    overrides: (base URL, process, log path, studies, env of the command, bundle)."""
    tmp_path = tmp_path_factory.mktemp("label_security")
    studies = make_studies(tmp_path / "studies")
    bundle = make_bundle(tmp_path / "bundle")
    app = copy_app(tmp_path / "app")
    port = free_port()
    command, env = documented_command(app, studies, port, bundle)
    # a --host before the documented one: MONAI Label binds the last, and so must the exposure guard judge
    command[2:2] = ["--host", "0.0.0.0"]
    os.environ.update(env)  # the documented environment (restricted CORS origins) for the server started below
    try:
        with running_server(command, tmp_path, time.monotonic() + DEADLINE_S, port) as (base, process, log_path):
            yield base, process, log_path, studies, env, bundle
    finally:
        for key in env:
            os.environ.pop(key, None)


@pytest.mark.slow
@pytest.mark.monailabel
def test_the_documented_server_listens_on_loopback_only(server):
    base, process, log_path, *_ = server
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
    base, process, log_path, *_ = server
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
    base, _, _, studies, *_ = server
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


def send(url, method="GET", data=None, headers=None, timeout=30):
    """One request with exactly ``headers`` (urllib adds Host from the URL unless given): (status, body text)."""
    req = urllib.request.Request(url, method=method, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def detail(text: str):
    return json.loads(text)["detail"]


def tree(root: Path) -> dict:
    """Every file and folder under ``root``: path -> sha256 (None for a folder)."""
    return {str(p.relative_to(root)): None if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if "logs" not in p.parts and p.suffix != ".log"
            and p.name != "datastore_v2.json"}


def multipart(field: str, filename: str, content: bytes) -> tuple[bytes, str]:
    boundary = "robustmri-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


@pytest.mark.slow
@pytest.mark.monailabel
@pytest.mark.parametrize("tag", ["../../x", "..%2F..%2Fx", "%2E%2E%2F%2E%2E%2Fx", "%252E%252E%252Fx", "{root}/abs",
                                 "final%2F..%2F..%2Fx", ".hidden", "a" * 65])
def test_a_label_tag_outside_the_allow_list_writes_nothing(server, tag):
    base, _, _, studies, *_ = server
    root = studies.parent
    before, tags_before = tree(root), request(f"{base}/datastore/")["label_tags"]
    tag = tag.format(root=urllib.parse.quote(str(root)))
    with pytest.raises(ServerError) as err:
        upload_label(base, "case01", b'{"label": "glioma"}', "case01.label.json", tag=tag)
    assert err.value.status == 422, err.value
    assert "label tag" in detail(err.value.body)
    for method, route in (("DELETE", f"/datastore/label?id=case01&tag={tag}"),
                          ("PUT", f"/datastore/label/info?label=case01&tag={tag}"),
                          ("GET", f"/datastore/label?label=case01&tag={tag}")):
        with pytest.raises(ServerError) as err:
            request(base + route, method)
        assert err.value.status == 422, (route, err.value)
    assert tree(root) == before  # no file written or removed, no folder made
    assert request(f"{base}/datastore/")["label_tags"] == tags_before


@pytest.mark.slow
@pytest.mark.monailabel
def test_plain_label_tags_are_accepted(server):
    base, _, _, studies, *_ = server
    saved = upload_label(base, "case02", b'{"label": "glioma"}', "case02.label.json", tag="second_reader-1")
    assert saved["label"] == "case02"
    assert (studies / "labels" / "second_reader-1" / "case02.label.json").is_file()
    assert "second_reader-1" in request(f"{base}/datastore/")["label_tags"]


@pytest.mark.slow
@pytest.mark.monailabel
def test_a_foreign_host_name_is_refused_on_every_route(server):
    """DNS rebinding: a page on rebind.attacker.example whose name now points at 127.0.0.1 reads nothing."""
    base = server[0]
    port = base.rsplit(":", 1)[1]
    routes = [("GET", "/datastore/?output=all"), ("GET", "/info/"), ("GET", "/"), ("GET", "/docs"),
              ("GET", "/openapi.json"), ("GET", "/review/"), ("GET", "/review/image?image=case00"),
              ("GET", "/datastore/image?image=case00"), ("GET", "/model/brain_tumour"), ("GET", "/logs/"),
              ("POST", "/activelearning/most_suspicious"), ("DELETE", "/datastore/label?id=case00&tag=final")]
    for name in ("rebind.attacker.example", f"rebind.attacker.example:{port}", ""):
        for method, route in routes:
            status, text = send(base + route, method, headers={"Host": name, "X-Requested-With": "robustmri"})
            assert status == 400, (name, route, status, text[:300])
            assert "not a name of this server" in detail(text)
    for name in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}"):
        assert send(f"{base}/info/", headers={"Host": name})[0] == 200, name
    assert (server[3] / "labels" / "final" / "case00.label.json").is_file()


@pytest.mark.slow
@pytest.mark.monailabel
def test_a_cross_site_simple_request_is_refused_and_starts_nothing(server):
    """What any web page can send without a CORS preflight: a text/plain POST from its own origin."""
    base, _, _, studies, *_ = server
    simple = {"Content-Type": "text/plain", "Origin": "https://evil.example"}
    for route, body in (("/train/brain_tumour", b'{"max_epochs": 1}'), ("/scoring/influence_review", b"{}"),
                        ("/train/?run_sync=true", b"{}"), ("/activelearning/most_suspicious", b"{}")):
        status, text = send(base + route, "POST", data=body, headers=simple)
        assert status == 403 and "X-Requested-With" in detail(text), (route, status, text)
    for what in ("train", "scoring"):  # no task was ever started
        with pytest.raises(ServerError) as err:
            request(f"{base}/{what}/", timeout=10)
        assert err.value.status == 404 and "Tasks Found" in err.value.body, err.value
    label = studies / "labels" / "final" / "case04.label.json"
    original = label.read_bytes()
    assert send(f"{base}/datastore/label?id=case04&tag=final", "DELETE", headers=simple)[0] == 403
    body, content_type = multipart("label", "case04.label.json", b'{"label": "pituitary"}')
    assert send(f"{base}/datastore/label?image=case04&tag=final", "PUT", data=body,
                headers={**simple, "Content-Type": content_type})[0] == 403
    assert label.read_bytes() == original


@pytest.mark.slow
@pytest.mark.monailabel
def test_model_upload_and_delete_are_off_and_the_model_keeps_serving(server):
    base, *_, bundle = server
    checkpoint = bundle / "models" / "model.pt"
    original = checkpoint.read_bytes()
    body, content_type = multipart("file", "model.pt", os.urandom(4096))
    status, text = send(f"{base}/model/brain_tumour", "PUT", data=body,
                        headers={"Content-Type": content_type, "X-Requested-With": "robustmri"})
    assert status == 403 and "allow_model_upload" in detail(text), (status, text)
    with pytest.raises(ServerError) as err:
        request(f"{base}/model/brain_tumour", "DELETE")
    assert err.value.status == 403
    assert checkpoint.read_bytes() == original
    assert not list(checkpoint.parent.glob("*.deleted"))
    result = request(f"{base}/infer/brain_tumour?image=case00&output=json", "POST")
    assert set(result["probabilities"]) == {"meningioma", "glioma", "pituitary"}


@pytest.mark.slow
@pytest.mark.monailabel
def test_inference_takes_study_ids_only_and_answers_alike_for_anything_else(server, tmp_path):
    base, _, _, studies, *_ = server
    outside = tmp_path / "outside.png"
    outside.write_bytes((studies / "case00.png").read_bytes())  # a readable image outside the studies
    answers = set()
    for image in (str(outside), "/etc/passwd", "/no/such/file.png", "case99", "../case00", str(studies / "case00.png")):
        with pytest.raises(ServerError) as err:
            request(f"{base}/infer/brain_tumour?image={urllib.parse.quote(image)}&output=json", "POST")
        answers.add((err.value.status, err.value.body))
    assert len(answers) == 1 and answers.pop()[0] == 404  # no oracle: the same answer whatever the file
    body, content_type = multipart("file", "upload.png", outside.read_bytes())
    status, text = send(f"{base}/infer/brain_tumour?image=case00&output=json", "POST", data=body,
                        headers={"Content-Type": content_type, "X-Requested-With": "robustmri"})
    assert status == 422 and "file uploads are not accepted" in detail(text)
    for params in ({"image": str(outside)}, {"model_filename": "../../model.pt"}, {"save_label": True},
                   {"label_tag": "original"}):
        form = urllib.parse.urlencode({"params": json.dumps(params)}).encode()
        status, text = send(f"{base}/infer/brain_tumour?image=case00&output=json", "POST", data=form,
                            headers={"Content-Type": "application/x-www-form-urlencoded",
                                     "X-Requested-With": "robustmri"})
        assert status == 422 and "infer params" in detail(text), (params, status, text)
    with pytest.raises(ServerError) as err:
        request(f"{base}/infer/brain_tumour?image=case00&session_id=abc&output=json", "POST")
    assert err.value.status == 422
    result = request(f"{base}/infer/brain_tumour?image=case00&output=json", "POST")
    assert result["class"] in result["probabilities"]


@pytest.mark.slow
@pytest.mark.monailabel
def test_routes_a_review_deployment_does_not_need_are_closed(server):
    base, _, _, studies, *_ = server
    png, content_type = multipart("file", "new.png", (studies / "case00.png").read_bytes())
    closed = [("PUT", "/session/", png, content_type), ("GET", "/session/abc", None, None),
              ("DELETE", "/session/abc", None, None), ("POST", "/batch/infer/brain_tumour", b"{}", "application/json"),
              ("GET", "/batch/infer", None, None), ("GET", "/proxy/dicom/studies", None, None),
              ("GET", "/ohif/", None, None), ("POST", "/reload", b"", None),
              ("PUT", "/datastore/image?image=../../planted", png, content_type),
              ("PUT", "/datastore/?image=planted", png, content_type),
              ("DELETE", "/datastore/image?id=case00", None, None),
              ("POST", "/infer/wsi_v2/brain_tumour?image=case00", b"", None),
              ("POST", "/infer/wsi/brain_tumour?image=case00", b"{}", "application/json")]
    before = tree(studies.parent)
    for method, route, data, kind in closed:
        headers = {"X-Requested-With": "robustmri", **({"Content-Type": kind} if kind else {})}
        status, text = send(base + route, method, data=data, headers=headers)
        assert status == 403 and ("not offered" in detail(text) or "studies folder" in detail(text)), (route, text)
    assert tree(studies.parent) == before
    assert "case00" in request(f"{base}/datastore/?output=all")["objects"]


@pytest.mark.slow
@pytest.mark.monailabel
def test_a_label_over_the_size_cap_is_refused_before_and_after_reading_and_nothing_is_written(server):
    base, _, _, studies, *_ = server
    label = studies / "labels" / "final" / "case05.label.json"
    original, before = label.read_bytes(), tree(studies.parent)
    host, port = base.rsplit("/", 1)[1].split(":")
    # a 52 MB upload: refused from its Content-Length, before the body is sent
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.putrequest("PUT", "/datastore/label?image=case05&tag=final")
    for name, value in (("Content-Type", "multipart/form-data; boundary=x"), ("Content-Length", str(52 * 10**6)),
                        ("X-Requested-With", "robustmri")):
        connection.putheader(name, value)
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413, response.read()
    connection.close()
    # a label file just over the cap with a small envelope: read, then refused by its size
    padded = b'{"label": "glioma", "note": "' + b"x" * 70000 + b'"}'
    with pytest.raises(ServerError) as err:
        upload_label(base, "case05", padded, "case05.label.json")
    assert err.value.status == 413 and "max_label_bytes" in detail(err.value.body)
    # no Content-Length (chunked): counted while read
    body, content_type = multipart("label", "case05.label.json", b'{"label": "glioma"}' + b" " * 200000)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("PUT", "/datastore/label?image=case05&tag=final", body=iter([body[i:i + 8192] for i in
                                                                                     range(0, len(body), 8192)]),
                       headers={"Content-Type": content_type, "X-Requested-With": "robustmri"}, encode_chunked=True)
    response = connection.getresponse()
    assert response.status == 413, response.read()
    connection.close()
    assert label.read_bytes() == original and tree(studies.parent) == before


@pytest.mark.slow
@pytest.mark.monailabel
@pytest.mark.parametrize("hosts", [[], ["--host", "127.0.0.1", "-i", "0.0.0.0"]], ids=["default", "last-host-wins"])
def test_a_server_on_all_interfaces_without_authentication_refuses_to_start(tmp_path, hosts):
    """MONAI Label's default host (0.0.0.0), or a later ``-i 0.0.0.0`` after ``--host 127.0.0.1`` (MONAI Label
    binds the last), with authentication off: the app stops at start-up and says why, in one line."""
    studies = make_studies(tmp_path / "studies", n=2)
    bundle = make_bundle(tmp_path / "bundle")
    app = copy_app(tmp_path / "app")
    port = free_port()
    command = [os.path.join(os.path.dirname(sys.executable), "monailabel"), "start_server", "--app", str(app),
               "--studies", str(studies), "--port", str(port), *hosts, "--conf", "bundle_path", str(bundle)]
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
    assert "robustmri: refusing to serve on 0.0.0.0 with authentication off" in text, text[-3000:]
    assert process.returncode != 0
    assert "Traceback" not in text and "Uvicorn running" not in text, text[-3000:]


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


@pytest.fixture
def app_lib(monkeypatch):
    """The app's ``lib`` package importable (as start_server makes it), and forgotten afterwards."""
    monkeypatch.syspath_prepend(APP)
    yield
    for name in [n for n in sys.modules if n == "lib" or n.startswith("lib.")]:
        del sys.modules[name]


@pytest.mark.monailabel
def test_exposure_is_judged_on_the_host_monailabel_binds(app_lib):
    from lib.security import bound_host, check_exposure

    start = ["monailabel", "start_server", "--app", "a", "--studies", "s"]
    assert bound_host(start) == "0.0.0.0"  # MONAI Label's default
    assert bound_host([*start, "--host", "10.1.2.3"]) == "10.1.2.3"
    assert bound_host([*start, "--host=::1"]) == "::1"
    assert bound_host([*start, "--host", "127.0.0.1", "-i", "0.0.0.0"]) == "0.0.0.0"  # the last one wins
    assert bound_host([*start, "-i", "0.0.0.0", "--host", "127.0.0.1"]) == "127.0.0.1"
    assert bound_host([*start, "--host", "10.1.2.3", "-i127.0.0.1"]) == "127.0.0.1"
    assert bound_host(["uvicorn", "monailabel.app:app", "--host", "0.0.0.0"]) is None  # left to the socket check
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]", "::ffff:127.0.0.1"):
        check_exposure(host, auth_enabled=False, conf={})
    for host in ("0.0.0.0", "::", "10.1.2.3", "myhost.example"):
        with pytest.raises(RuntimeError, match=f"refusing to serve on {re.escape(host)} with authentication off"):
            check_exposure(host, auth_enabled=False, conf={"serve_unauthenticated": "no"})
    check_exposure("10.1.2.3", auth_enabled=True, conf={})
    check_exposure("0.0.0.0", auth_enabled=False, conf={"serve_unauthenticated": "true"})


@pytest.mark.monailabel
def test_the_listening_sockets_of_a_process_are_found(app_lib):
    """What the post-start check reads: this process's listening sockets, loopback and not."""
    from lib.security import check_exposure, listening_hosts

    with socket.socket() as loopback, socket.socket() as everywhere:
        loopback.bind(("127.0.0.1", 0))
        loopback.listen()
        assert "127.0.0.1" in listening_hosts()
        everywhere.bind(("0.0.0.0", 0))
        everywhere.listen()
        hosts = listening_hosts()
        assert "0.0.0.0" in hosts
        with pytest.raises(RuntimeError, match="refusing to serve on 0.0.0.0"):
            for host in hosts:
                check_exposure(host, auth_enabled=False, conf={})


@pytest.mark.monailabel
def test_host_names_accepted(app_lib):
    from lib.security import allowed_hosts, host_name, is_loopback

    assert host_name("Example.ORG.:8000") == "example.org" and host_name("[::1]:8000") == "::1"
    assert host_name("::1") == "::1" and host_name("localhost") == "localhost"
    hosts = allowed_hosts("10.1.2.3", {"allowed_hosts": "label.example.org, Viewer.Example.org"})
    assert {"10.1.2.3", "label.example.org", "viewer.example.org", "localhost", "127.0.0.1", "::1"} <= hosts
    assert "rebind.attacker.example" not in hosts
    assert allowed_hosts(None, {}) == {"localhost", "127.0.0.1", "::1"}
    assert not is_loopback("rebind.attacker.example") and is_loopback("127.3.2.1")


@pytest.mark.monailabel
def test_an_uploaded_model_must_load_into_the_bundles_network(app_lib, tmp_path):
    """What ``PUT /model/...`` checks where it is turned on: a state dict of the network, read without running code."""
    import torch

    from lib.security import ModelRejected, verify_checkpoint
    from robustmri.networks import PaperCNN

    network = PaperCNN(spatial_size=64, padding=2)
    good = tmp_path / "good.pt"
    torch.save(network.state_dict(), good)
    verify_checkpoint(str(good), PaperCNN(spatial_size=64, padding=2))
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"model": network.state_dict()}, wrapped)
    verify_checkpoint(str(wrapped), PaperCNN(spatial_size=64, padding=2))

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    rejected = {"bytes": os.urandom(4096), "code": None, "other size": None, "not tensors": None}
    for name in rejected:
        path = tmp_path / f"{name}.pt"
        if name == "bytes":
            path.write_bytes(rejected[name])
        elif name == "code":
            torch.save({"weight": Payload()}, path)
        elif name == "other size":
            torch.save(PaperCNN(spatial_size=32, padding=2).state_dict(), path)
        else:
            torch.save({"weight": [1, 2, 3]}, path)
        with pytest.raises(ModelRejected) as err:
            verify_checkpoint(str(path), PaperCNN(spatial_size=64, padding=2))
        assert err.value.status_code == 422 and "the model was not changed" in err.value.detail, name
    assert not marker.exists()


@pytest.mark.monailabel
def test_model_upload_where_turned_on_replaces_the_checkpoint_only_with_a_loadable_one(app_lib, tmp_path):
    """``--conf allow_model_upload true``: the routes lib.security adds, in process (authentication off: admin)."""
    import torch
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib.security import routes
    from robustmri.networks import PaperCNN

    checkpoint = tmp_path / "model.pt"
    torch.save(PaperCNN(spatial_size=64, padding=2).state_dict(), checkpoint)

    class App:
        def infer_models(self):
            return ["brain_tumour"]

        def model_file(self, model, validate=True):
            return str(checkpoint)

        def model_network(self, model):
            return PaperCNN(spatial_size=64, padding=2)

    server = FastAPI()
    server.include_router(routes(App(), model_upload=True))
    client = TestClient(server)
    original = checkpoint.read_bytes()
    for content in (os.urandom(4096), b"", original[: len(original) // 2]):
        response = client.put("/model/brain_tumour", files={"file": ("model.pt", content)})
        assert response.status_code == 422 and "the model was not changed" in response.json()["detail"]
        assert checkpoint.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no upload left behind
    assert client.put("/model/other", files={"file": ("model.pt", original)}).status_code == 404
    torch.manual_seed(1)
    replacement = tmp_path / "replacement.pt"
    torch.save(PaperCNN(spatial_size=64, padding=2).state_dict(), replacement)
    response = client.put("/model/brain_tumour", files={"file": ("model.pt", replacement.read_bytes())})
    assert response.status_code == 200, response.text
    assert checkpoint.read_bytes() == replacement.read_bytes()
    assert client.delete("/model/brain_tumour").status_code == 200
    assert not checkpoint.exists() and len(list(tmp_path.glob("model.pt.*.deleted"))) == 1


@pytest.mark.monailabel
def test_the_train_task_drops_exactly_the_runners_fields(app_lib, tmp_path):
    """``bundle_path`` and ``local_rank`` come from MONAI Label's runner: accepted with their values, nothing else."""
    from lib.train_request import TrainRequestRejected, validate_train_request
    from lib.trainers.isp import RUNNER_FIELDS, ISPTrain

    task = ISPTrain(str(make_bundle(tmp_path / "bundle")), {})
    assert RUNNER_FIELDS == ("bundle_path", "local_rank")
    task._check_runner_fields({"bundle_path": task.bundle_path, "local_rank": 0, "max_epochs": 1})
    for bad in ({"bundle_path": "/tmp"}, {"local_rank": "0"}, {"local_rank": -1}):
        with pytest.raises(ValueError):
            task._check_runner_fields(bad)
    with pytest.raises(TrainRequestRejected, match="local_rank: not an accepted field"):  # from a client
        validate_train_request({"local_rank": 0}, ("brain_tumour",))


@pytest.mark.slow
@pytest.mark.monailabel
def test_the_asynchronous_train_reaches_done_while_the_server_keeps_answering(server):
    """``POST /train/brain_tumour`` as documented (no run_sync): MONAI Label's runner trains in a process of its
    own, the task ends DONE, ``/info/`` answers within 5 s meanwhile, and the review scores are started after."""
    base, process, log_path, *_ = server
    task = request(f"{base}/train/brain_tumour", "POST", timeout=30,
                   body={"max_epochs": 1, "val_split": 0.34, "device": "cpu"})
    assert task["status"] in ("SUBMITTED", "RUNNING"), task
    deadline, answers, status = time.monotonic() + 300, [], None
    while time.monotonic() < deadline:
        status = request(f"{base}/train/", timeout=10)
        if status["status"] not in ("SUBMITTED", "RUNNING"):
            break
        started = time.monotonic()
        request(f"{base}/info/", timeout=5)
        answers.append(time.monotonic() - started)
        time.sleep(1)
    assert status["id"] == task["id"] and status["status"] == "DONE", (status, tail(log_path))
    assert answers and max(answers) < 5, answers  # /info/ answered while the task ran
    stats = request(f"{base}/info/")["train_stats"]["brain_tumour"]
    assert stats["epochs"] == 1 and stats["method"] == "ISP"
    scoring = None
    while time.monotonic() < deadline and scoring is None:  # the task process asked the server to score
        try:
            scoring = request(f"{base}/scoring/", timeout=10)
        except ServerError:
            time.sleep(1)
    assert scoring is not None and scoring["request"]["method"] == "influence_review", tail(log_path)
