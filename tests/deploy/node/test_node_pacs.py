"""The DICOM node against a real PACS (Orthanc on loopback ports, studies sent with dcmtk's storescu): a study in
gives exactly one SR in the PACS, under resends, a kill -9, a PACS that is down, and a burst; unknown calling AE
titles are refused; a study refused for integrity gives no SR."""

import datetime
import ipaddress
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from robustmri.bench import pacs
from robustmri.bench.dicom_fixtures import FictitiousPatient, write_mr_series
from robustmri.bench.pacs import PACS_AET, Orthanc, free_port, pacs_tools_missing, storescu

from deploy_helpers import exported_apart, gradient_detector_data, gradient_series, rewrite_metadata, signing_keys

pytestmark = pytest.mark.slow  # an exported model, Orthanc and node processes

NEEDS_PACS = pytest.mark.skipif(bool(pacs_tools_missing()),
                                reason="needs Orthanc and dcmtk's storescu (Debian packages orthanc, dcmtk)")
#: Bounds of every wait (seconds): a study answered and delivered, a burst of 20.
STUDY_S, BURST_S = 60, 150


def wait_for(condition, timeout: float, what: str, interval: float = 0.25):
    """:func:`robustmri.bench.pacs.wait_for`, a timeout reported as the test's failure."""
    try:
        return pacs.wait_for(condition, timeout, what, interval)
    except TimeoutError as error:
        pytest.fail(str(error))


class Node(pacs.Node):
    """The node with a model signed by the tests' key (``signed``: its public key given)."""

    def __init__(self, *args, extra: tuple = (), signed: bool = True, **kwargs):
        super().__init__(*args, extra=(*(["--public_key", signing_keys()[1]] if signed else []), *extra), **kwargs)


def certificates(folder: Path) -> tuple[dict, dict]:
    """A test CA and two certificates it signs for 127.0.0.1 (the PACS's, the node's): PEM file paths."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "robustmri test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    found = []
    for name in ("pacs", "node"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                               critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False).sign(ca_key, hashes.SHA256()))
        (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                               serialization.PrivateFormat.TraditionalOpenSSL,
                                                               serialization.NoEncryption()))
        found.append({"cert": str(folder / f"{name}.pem"), "key": str(folder / f"{name}.key"),
                      "ca": str(folder / "ca.pem")})
    return found[0], found[1]


def write_study(folder: Path, seed: int = 0, n: int = 4, **kwargs) -> str:
    """A small T1 post-contrast series (the model's series rule) in ``folder``; its StudyInstanceUID."""
    paths = write_mr_series(folder, gradient_series(n, seed=seed), **kwargs)
    return str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A signed tiny model whose detector accepts the gradient series (so studies are answered, not abstained)."""
    return exported_apart(tmp_path_factory.mktemp("model"), signed=True, ood=gradient_detector_data(),
                          target_acceptance=1.0)


@pytest.fixture()
def nodes(tmp_path):
    """Start nodes and Orthancs through this; every one still running is stopped at the end (by its PID)."""
    started = []

    def track(process):
        started.append(process)
        return process.start()

    yield track
    for process in reversed(started):
        process.stop() if isinstance(process, Orthanc) else (process.process.poll() is None and process.stop())


def _one_sr(orthanc: Orthanc, study_uid: str, node: Node):
    wait_for(lambda: orthanc.srs(study_uid), STUDY_S,
             f"an SR of the study in Orthanc; node log:\n{node.log_text()[-3000:]}")
    return orthanc.srs(study_uid)


@NEEDS_PACS
def test_round_trip_then_a_resend_gives_one_sr_in_the_pacs(tmp_path, model, nodes):
    node_port = free_port()
    orthanc = nodes(Orthanc(tmp_path / "orthanc", node_port))
    node = nodes(Node(tmp_path / "node", model, orthanc.dicom_port, node_port))
    study_uid = write_study(tmp_path / "study")
    sent = storescu(tmp_path / "study", node.port)
    assert sent.returncode == 0, sent.stderr
    srs = _one_sr(orthanc, study_uid, node)
    assert len(srs) == 1
    assert srs[0]["StudyInstanceUID"] == study_uid and srs[0]["Modality"] == "SR"
    delivered = wait_for(lambda: node.delivered(study_uid), STUDY_S, "the study delivered in the node's queue")
    assert (delivered.n_sr, delivered.outcome, delivered.n_instances) == (1, "ok", 4)
    first_sop = srs[0]["SOPInstanceUID"]

    sent = storescu(tmp_path / "study", node.port)  # the PACS sends the same study again
    assert sent.returncode == 0, sent.stderr
    wait_for(lambda: node.delivered(study_uid, generation=8), STUDY_S, "the resent study answered and delivered")
    srs = orthanc.srs(study_uid)
    assert [s["SOPInstanceUID"] for s in srs] == [first_sop]  # the same SR UIDs: the PACS holds one
    assert "TESTPATIENT" not in node.log_text() and "RMRI-000123" not in node.log_text()  # UIDs, never names/IDs
    assert study_uid in node.log_text()
    assert node.stop() == 0  # SIGTERM: a clean stop


@NEEDS_PACS
def test_kill_9_after_receipt_then_restart_gives_exactly_one_sr(tmp_path, model, nodes):
    node_port = free_port()
    orthanc = nodes(Orthanc(tmp_path / "orthanc", node_port))
    node = nodes(Node(tmp_path / "node", model, orthanc.dicom_port, node_port, 30.0))  # not answered before the kill
    study_uid = write_study(tmp_path / "study", seed=1)
    sent = storescu(tmp_path / "study", node.port)
    assert sent.returncode == 0, sent.stderr
    node.kill()
    held = node.studies()[study_uid]
    assert (held.state, held.n_instances) == ("receiving", 4)  # every acknowledged instance survived the kill
    assert orthanc.srs(study_uid) == []
    restarted = nodes(Node(tmp_path / "node2", model, orthanc.dicom_port, node_port, 1.0, work_dir=node.work_dir))
    srs = _one_sr(orthanc, study_uid, restarted)
    wait_for(lambda: restarted.delivered(study_uid), STUDY_S, "the study delivered after the restart")
    assert len(orthanc.srs(study_uid)) == len(srs) == 1


def _answered_while_the_pacs_is_down(tmp_path, model, nodes, seed: int):
    """A node whose destination port has no PACS yet, holding one answered study after a failed delivery attempt:
    (node, study UID, the node's port, the PACS's port)."""
    node_port, pacs_port = free_port(), free_port()
    node = nodes(Node(tmp_path / "node", model, pacs_port, node_port))
    study_uid = write_study(tmp_path / "study", seed=seed)
    assert storescu(tmp_path / "study", node.port).returncode == 0
    waiting = wait_for(lambda: (s := node.studies().get(study_uid)) and s.state == "answered" and s.attempts >= 1
                       and s, STUDY_S, "a failed delivery attempt while the PACS is down")
    assert waiting.n_sr == 1
    return node, study_uid, node_port, pacs_port


@NEEDS_PACS
def test_a_result_ready_while_the_pacs_is_down_is_delivered_when_it_returns(tmp_path, model, nodes):
    node, study_uid, node_port, pacs_port = _answered_while_the_pacs_is_down(tmp_path, model, nodes, seed=2)
    orthanc = nodes(Orthanc(tmp_path / "orthanc", node_port, pacs_port))
    srs = _one_sr(orthanc, study_uid, node)
    assert len(srs) == 1 and srs[0]["StudyInstanceUID"] == study_uid
    wait_for(lambda: node.delivered(study_uid), STUDY_S, "the study delivered")


@NEEDS_PACS
def test_kill_9_while_a_result_awaits_delivery_then_restart_delivers_it_once(tmp_path, model, nodes):
    node, study_uid, node_port, pacs_port = _answered_while_the_pacs_is_down(tmp_path, model, nodes, seed=4)
    node.kill()
    orthanc = nodes(Orthanc(tmp_path / "orthanc", node_port, pacs_port))
    restarted = nodes(Node(tmp_path / "node2", model, pacs_port, node_port, work_dir=node.work_dir))
    wait_for(lambda: restarted.delivered(study_uid), STUDY_S, "the study delivered after the restart")
    assert len(orthanc.srs(study_uid)) == 1


@NEEDS_PACS
def test_sigterm_exits_0_and_leaves_pending_studies_that_a_restart_delivers(tmp_path, model, nodes):
    node_port = free_port()
    orthanc = nodes(Orthanc(tmp_path / "orthanc", node_port))
    node = nodes(Node(tmp_path / "node", model, orthanc.dicom_port, node_port, 5.0))  # none complete at the stop
    uids = [write_study(tmp_path / "studies" / f"s{k}", seed=k) for k in range(5)]
    assert storescu(tmp_path / "studies", node.port).returncode == 0
    assert node.stop() == 0
    assert sorted((s.state, s.n_instances) for s in node.studies().values()) == [("receiving", 4)] * 5
    assert "stopped" in node.log_text()
    status = subprocess.run([sys.executable, "-m", "robustmri.deploy.node.cli", "--work_dir", str(node.work_dir),
                             "--status"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert all(uid in status.stdout for uid in uids) and status.stdout.splitlines()[-1] == "5 study(ies): 5 receiving"
    restarted = nodes(Node(tmp_path / "node2", model, orthanc.dicom_port, node_port, work_dir=node.work_dir))
    wait_for(lambda: all(restarted.delivered(uid) for uid in uids), STUDY_S, "the 5 studies delivered")
    assert [len(orthanc.srs(uid)) for uid in uids] == [1] * 5


@NEEDS_PACS
def test_over_tls_a_study_gets_its_sr_and_a_plain_connection_is_refused(tmp_path, model, nodes):
    pacs_tls, node_tls = certificates(tmp_path / "certs")
    node_port = free_port()
    orthanc = nodes(Orthanc(tmp_path / "orthanc", node_port, tls=pacs_tls))
    node = nodes(Node(tmp_path / "node", model, orthanc.dicom_port, node_port,
                      extra=("--tls_cert", node_tls["cert"], "--tls_key", node_tls["key"], "--tls_ca", node_tls["ca"])))
    study_uid = write_study(tmp_path / "study", seed=5)
    assert storescu(tmp_path / "study", node.port).returncode != 0  # not TLS: no association
    assert node.studies() == {}
    sent = storescu(tmp_path / "study", node.port, tls=pacs_tls)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert len(_one_sr(orthanc, study_uid, node)) == 1
    assert "TLS" in node.log_text()


@NEEDS_PACS
def test_keep_delivered_removes_a_delivered_study_from_the_work_folder(tmp_path, model, nodes):
    node_port = free_port()
    orthanc = nodes(Orthanc(tmp_path / "orthanc", node_port))
    node = nodes(Node(tmp_path / "node", model, orthanc.dicom_port, node_port, extra=("--keep_delivered", "0")))
    study_uid = write_study(tmp_path / "study", seed=6)
    assert storescu(tmp_path / "study", node.port).returncode == 0
    assert len(_one_sr(orthanc, study_uid, node)) == 1
    wait_for(lambda: node.studies() == {} and not any((node.work_dir / "incoming").iterdir())
             and not any((node.work_dir / "results").iterdir()), STUDY_S, "the delivered study removed")
    assert "removed 1 study(ies)" in node.log_text()


@NEEDS_PACS
def test_an_unknown_calling_ae_title_is_refused(tmp_path, model, nodes):
    node = nodes(Node(tmp_path / "node", model, free_port()))
    write_study(tmp_path / "study", seed=3)
    refused = storescu(tmp_path / "study", node.port, calling="STRANGER")
    assert refused.returncode != 0
    assert "reject" in (refused.stdout + refused.stderr).lower()
    assert node.studies() == {}
    assert list((node.work_dir / "incoming").iterdir()) == []


@NEEDS_PACS
def test_a_burst_of_20_studies_gives_20_srs(tmp_path, model, nodes):
    node_port = free_port()
    orthanc = nodes(Orthanc(tmp_path / "orthanc", node_port))
    node = nodes(Node(tmp_path / "node", model, orthanc.dicom_port, node_port))
    uids = [write_study(tmp_path / "burst" / f"s{k:02d}", seed=k % 5) for k in range(20)]
    started = time.monotonic()
    sent = storescu(tmp_path / "burst", node.port)
    assert sent.returncode == 0, sent.stderr
    wait_for(lambda: all(node.delivered(uid) for uid in uids), BURST_S,
             f"20 studies delivered; node log:\n{node.log_text()[-3000:]}", interval=1.0)
    print(f"20 studies of 4 slices: sent and delivered in {time.monotonic() - started:.1f} s")
    assert [len(orthanc.srs(uid)) for uid in uids] == [1] * 20
    assert orthanc.post("/tools/find", {"Level": "Instance", "Query": {"Modality": "SR"}}).__len__() == 20


@NEEDS_PACS
def test_two_patients_under_one_series_uid_give_no_class_and_no_sr(tmp_path, model, nodes):
    node_port = free_port()
    orthanc = nodes(Orthanc(tmp_path / "orthanc", node_port))
    node = nodes(Node(tmp_path / "node", model, orthanc.dicom_port, node_port))
    study_uid, series_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    write_mr_series(tmp_path / "study" / "a", gradient_series(4), study_uid=study_uid, series_uid=series_uid)
    write_mr_series(tmp_path / "study" / "b", gradient_series(4, seed=1), study_uid=study_uid, series_uid=series_uid,
                    patient=FictitiousPatient(name="OTHER^PATIENT", patient_id="RMRI-999"))
    assert storescu(tmp_path / "study", node.port).returncode == 0
    study = wait_for(lambda: node.delivered(study_uid), STUDY_S, "the refused study concluded")
    assert (study.outcome, study.n_sr, study.n_instances) == ("no_result", 0, 8)
    summary = json.loads((node.work_dir / "results" / study.study_key / "summary.json").read_text())
    assert summary["n_series_classified"] == 0 and summary["series"] == []
    assert "refused" in summary["studies"][0]["reason"]
    assert orthanc.srs(study_uid) == [] and orthanc.n_instances() == 0
    assert "OTHER^PATIENT" not in node.log_text() and "RMRI-999" not in node.log_text()


def test_an_unsigned_model_is_refused_at_start_with_one_line(tmp_path):
    onnx_file = exported_apart(tmp_path, ood=gradient_detector_data(), target_acceptance=1.0)
    result = subprocess.run([sys.executable, "-m", "robustmri.deploy.node.cli", "--model", str(onnx_file),
                             "--destination", f"{PACS_AET}@127.0.0.1:{free_port()}", "--work_dir",
                             str(tmp_path / "work"), "--listen", f"127.0.0.1:{free_port()}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith("robustmri-node: model refused")
    assert [line for line in result.stderr.splitlines() if line.startswith("robustmri-node:")] == \
        result.stderr.splitlines()[-1:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "work").exists()  # refused before the work folder is touched


@pytest.mark.parametrize("case", ["busy_port", "bad_size", "bad_destination", "no_queue", "nan_timeout"])
def test_bad_options_and_a_busy_port_are_one_line_with_their_status(tmp_path, model, case):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        options = {"busy_port": ["--listen", f"127.0.0.1:{busy.getsockname()[1]}"],
                   "bad_size": ["--max_work_bytes", "lots"],
                   "bad_destination": ["--destination", "PACS-at-127.0.0.1"],
                   "no_queue": ["--status"], "nan_timeout": ["--study_timeout", "nan"]}[case]
        result = subprocess.run([sys.executable, "-m", "robustmri.deploy.node.cli", "--model", str(model),
                                 "--public_key", signing_keys()[1], "--destination", f"{PACS_AET}@127.0.0.1:1",
                                 "--work_dir", str(tmp_path / "work"), *options],
                                capture_output=True, text=True, timeout=120)
    expected = {"busy_port": (3, "cannot listen on"), "bad_size": (2, "--max_work_bytes: not a size"),
                "bad_destination": (2, "--destination must be AET@HOST:PORT"),
                "no_queue": (2, "no node queue in the work folder"),
                "nan_timeout": (2, "--study_timeout, --keep_delivered and --threads must be numbers >= 0")}[case]
    assert (result.returncode, result.stderr.splitlines()[-1].startswith(f"robustmri-node: {expected[1]}")) == \
        (expected[0], True), result.stderr
    assert "Traceback" not in result.stderr


@NEEDS_PACS
def test_a_demo_model_is_refused_unless_allowed_and_then_its_sr_says_demo_model(tmp_path, model, nodes):
    provenance = {"schema": "robustmri-provenance-1", "demo_model": True,
                  "data": {"kind": "synthetic", "name": "embedded synthetic set"}}
    demo = rewrite_metadata(model, tmp_path / "demo.onnx", reseal=True, demo_model="true",
                            model_version="0.4.0+demo", provenance=json.dumps(provenance))
    node_port = free_port()
    refused = Node(tmp_path / "refused", demo, free_port(), node_port, signed=False)
    result = subprocess.run(refused.args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.splitlines()[-1].startswith("robustmri-node: model refused")
    orthanc = nodes(Orthanc(tmp_path / "orthanc", node_port))
    node = nodes(Node(tmp_path / "node", demo, orthanc.dicom_port, node_port, extra=("--allow_demo_model",),
                      signed=False))
    study_uid = write_study(tmp_path / "study", seed=7)
    assert storescu(tmp_path / "study", node.port).returncode == 0
    [sr] = _one_sr(orthanc, study_uid, node)
    assert "DEMO MODEL" in json.dumps(sr)  # the SR's text, as Orthanc stored it
