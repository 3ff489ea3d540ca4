"""What a DICOM inference run leaves in its output folder under ordinary faults, and how the script says so:
atomic files, the manifest, the 'running' marker, the folder lock, writability, SR UIDs that a rerun repeats,
exit statuses, skip reasons without paths, named pipes and corrupt files in the input."""

import errno
import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pydicom
import pytest

from robustmri import outputs
from robustmri.bench.dicom_fixtures import FictitiousPatient, write_mr_series
from robustmri.deploy.dicom.headers import HEADER_LIMIT_BYTES, NOT_REGULAR
from robustmri.deploy.dicom.sr import sr_uids
from robustmri.deploy.dicom.study import LOCK_FILE, RUNNING_REASON, OutputError, infer_dicom, output_lock

from deploy_helpers import (
    export_tiny,
    gradient_detector_data,
    gradient_series,
    run_infer_dicom,
    signed_classifier,
    signing_keys,
)

pytestmark = pytest.mark.slow  # every test classifies with an exported ONNX model (module fixtures)


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    """Two signed tiny models (different weights, so different digests) whose detector accepts gradient series."""
    found = []
    for seed in (0, 1):
        _, _, onnx_file, _ = export_tiny(tmp_path_factory.mktemp(f"model{seed}"), seed=seed, signed=True,
                                         ood=gradient_detector_data(), target_acceptance=1.0)
        found.append(signed_classifier(onnx_file))
    return found


@pytest.fixture()
def classifier(classifiers):
    return classifiers[0]


def _sr_uids(folder) -> dict:
    found = {}
    for path in sorted(folder.glob("*.sr.dcm")):
        sr = pydicom.dcmread(path)
        found[path.name] = (sr.StudyInstanceUID, sr.SeriesInstanceUID, sr.SOPInstanceUID)
    return found


# -- SR UIDs: a rerun replaces, never duplicates ----------------------------------------------------------------


def test_sr_uids_are_deterministic_valid_and_depend_on_every_input():
    base = ("1.2.3.4", "a" * 64, "b" * 64)
    series, sop = sr_uids(*base)
    assert (series, sop) == sr_uids(*base) and series != sop
    assert all(pydicom.uid.UID(uid).is_valid and uid.startswith("2.25.") for uid in (series, sop))
    variants = [sr_uids("1.2.3.5", *base[1:]), sr_uids(base[0], "c" * 64, base[2]), sr_uids(*base[:2], "d" * 64),
                sr_uids(*base, series_instance_uid="1.2.3.4.1"), sr_uids(*base, series_instance_uid="1.2.3.4.2")]
    assert len({series, *[v[0] for v in variants]}) == 6 and len({sop, *[v[1] for v in variants]}) == 6
    with pytest.raises(ValueError, match="model_digest"):
        sr_uids("1.2.3.4", "", "b" * 64)


@pytest.mark.parametrize("output", ["study", "series"])
def test_a_rerun_writes_the_same_sr_uids_and_another_model_other_ones(tmp_path, classifiers, output):
    write_mr_series(tmp_path / "in" / "a", gradient_series(3), series_number=1)
    write_mr_series(tmp_path / "in" / "b", gradient_series(4, seed=1), series_number=2)
    runs = {}
    for name, model in [("first", classifiers[0]), ("rerun", classifiers[0]), ("other", classifiers[1])]:
        summary = infer_dicom(tmp_path / "in", model, tmp_path / name, progress=False, output=output)
        assert summary["status"] == "ok"
        runs[name] = _sr_uids(tmp_path / name)
    assert len(runs["first"]) == 2 and runs["first"] == runs["rerun"]
    source_studies = {p.name: pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID
                      for p in sorted((tmp_path / "in").rglob("*")) if p.is_file()}
    assert {uids[0] for uids in runs["first"].values()} <= set(source_studies.values())  # the SR joins its study
    assert classifiers[0].describe()["integrity_sha256"] != classifiers[1].describe()["integrity_sha256"]
    first = {uid for uids in runs["first"].values() for uid in uids[1:]}
    other = {uid for uids in runs["other"].values() for uid in uids[1:]}
    assert len(first) == 4 and not first & other
    # the same instance written again into the same folder: replaced, not duplicated
    infer_dicom(tmp_path / "in", classifiers[0], tmp_path / "first", progress=False, output=output)
    assert _sr_uids(tmp_path / "first") == runs["first"]


# -- the manifest and the 'running' marker -----------------------------------------------------------------------


def _no_temporaries(folder) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(outputs.PARTIAL_SUFFIX)]


def test_a_full_disk_mid_run_leaves_no_torn_file_and_marks_the_run_incomplete(tmp_path, classifier, monkeypatch):
    write_mr_series(tmp_path / "in" / "a", gradient_series(3), study_uid=pydicom.uid.generate_uid())
    write_mr_series(tmp_path / "in" / "b", gradient_series(3), study_uid=pydicom.uid.generate_uid())
    out = tmp_path / "out"
    complete = infer_dicom(tmp_path / "in", classifier, out, progress=False)  # an older, complete run
    assert complete["status"] == "ok" and len(complete["files"]) == 4
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_fsync, calls = os.fsync, []

    def fsync(descriptor):
        calls.append(descriptor)
        if len(calls) == 3:  # the running marker and the first study's SR pass; then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(descriptor)

    monkeypatch.setattr(outputs.os, "fsync", fsync)
    with pytest.raises(OutputError) as raised:
        infer_dicom(tmp_path / "in", classifier, out, progress=False)
    assert raised.value.errno == errno.ENOSPC and "ENOSPC" in raised.value.strerror
    assert str(tmp_path) not in str(raised.value)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "running" and summary["reason"] == RUNNING_REASON and "files" not in summary
    assert summary["run"]["run_id"] != complete["run"]["run_id"] and summary["run"]["finished"] is None
    assert _no_temporaries(out) and sorted(p.name for p in out.iterdir()) == sorted(before)
    for path in out.glob("*.sr.dcm"):  # every SR whole: the old one or the new one
        assert pydicom.dcmread(path).SOPInstanceUID
    for path in out.glob("*.json"):
        json.loads(path.read_text())


def test_a_run_killed_before_its_end_leaves_the_running_marker(tmp_path, classifier):
    """A real kill: the child classifies, and is killed (SIGKILL) while it writes its reports."""
    write_mr_series(tmp_path / "in", gradient_series(3))
    out = tmp_path / "out"
    infer_dicom(tmp_path / "in", classifier, out, progress=False)
    assert json.loads((out / "summary.json").read_text())["status"] == "ok"  # an older complete run
    child = textwrap.dedent(f"""
        import os, signal
        from robustmri.deploy.dicom import study
        from robustmri.deploy.onnx.runtime import OnnxClassifier

        def killed(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)

        study._write_reports = killed
        model = OnnxClassifier({classifier.model_file!r}, device="cpu", public_key={signing_keys()[1]!r})
        study.infer_dicom({str(tmp_path / 'in')!r}, model, {str(out)!r}, progress=False)
    """)
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert result.returncode == -9, result.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["status"] == "running"
    summary = infer_dicom(tmp_path / "in", classifier, out, progress=False)  # the lock died with the process
    assert summary["status"] == "ok" and json.loads((out / "summary.json").read_text())["run"] == summary["run"]


# -- the lock and writability ------------------------------------------------------------------------------------

HOLD_LOCK = """
import fcntl, sys, time
handle = open(sys.argv[1], "a")
fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_into_a_locked_folder_exits_at_once_with_status_3(tmp_path, classifier):
    write_mr_series(tmp_path / "in", gradient_series(3))
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / LOCK_FILE)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = run_infer_dicom(tmp_path / "in", "--model", classifier.model_file, "--output_dir", out,
                                 "--device", "cpu", "--quiet")
        assert result.returncode == 3, result.stderr[-2000:]
        assert result.stderr.strip().splitlines() == [
            "infer_dicom: output: the output folder is in use by another run (its lock file .robustmri.lock is "
            "held); wait for it or choose another output folder"]
        assert not (out / "summary.json").exists() and result.stdout == ""
        with pytest.raises(OutputError, match="in use by another run"):
            infer_dicom(tmp_path / "in", classifier, out, progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert run_infer_dicom(tmp_path / "in", "--model", classifier.model_file, "--output_dir", out,
                           "--device", "cpu", "--quiet").returncode == 0


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    with output_lock(str(tmp_path)):
        with pytest.raises(OutputError):
            with output_lock(str(tmp_path)):
                pass
    with output_lock(str(tmp_path)):  # released
        pass


@pytest.mark.parametrize("case", ["a file", "under a file", "read-only"])
def test_an_output_path_that_cannot_be_written_is_status_3_before_any_work(tmp_path, classifier, case):
    write_mr_series(tmp_path / "in", gradient_series(3))
    (tmp_path / "plain").write_text("x")
    if case == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only folder")
        (tmp_path / "ro").mkdir()
        os.chmod(tmp_path / "ro", 0o555)
    out = {"a file": tmp_path / "plain", "under a file": tmp_path / "plain" / "out", "read-only": tmp_path / "ro"}[case]
    result = run_infer_dicom(tmp_path / "in", "--model", "no-such-model.onnx", "--output_dir", out, "--device", "cpu")
    # status 3 although the model does not exist: the output is checked before the model is loaded
    assert result.returncode == 3 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("infer_dicom: output: ") and str(tmp_path) not in line
    assert ("not a folder" if case == "a file" else "not writable") in line


def test_a_read_only_output_folder_fails_before_the_scan(tmp_path, classifier, monkeypatch):
    """Read-only as a mounted file system reports it (tests may run as root, who could write after a chmod)."""
    from robustmri.deploy.dicom import study

    write_mr_series(tmp_path / "in", gradient_series(3))
    (tmp_path / "out").mkdir()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "out" / "probe"))

    def no_scan(*args, **kwargs):
        raise AssertionError("scanned before the output folder was checked")

    monkeypatch.setattr(study.tempfile, "mkstemp", read_only)
    monkeypatch.setattr(study, "scan_folders", no_scan)
    with pytest.raises(OutputError) as raised:
        infer_dicom(tmp_path / "in", classifier, tmp_path / "out", progress=False)
    assert raised.value.strerror == "the output folder is not writable (EROFS: Read-only file system)"
    assert os.listdir(tmp_path / "out") == []


# -- exit statuses and option types ------------------------------------------------------------------------------


@pytest.mark.parametrize("args, expected", [
    (["--batch_size", "abc"], "--batch_size must be an integer >= 1, got 'abc'"),
    (["--batch_size", "0"], "--batch_size must be an integer >= 1, got 0"),
    (["--threads", "-1"], "--threads must be an integer >= 0, got -1"),
    (["--threads", "1.5"], "--threads must be an integer >= 0, got 1.5"),
    (["--output", "everything"], "--output must be one of study, series, got 'everything'"),
    (["--on_slice_error", "ignore"], "--on_slice_error must be one of fail, skip, got 'ignore'"),
    (["--quiet", "maybe"], "--quiet must be true or false, got 'maybe'"),
    (["--allow_unsigned", "sometimes"], "--allow_unsigned must be true or false, got 'sometimes'"),
])
def test_bad_option_values_are_one_line_and_status_2(tmp_path, classifier, args, expected):
    write_mr_series(tmp_path / "in", gradient_series(3))
    result = run_infer_dicom(tmp_path / "in", "--model", classifier.model_file, "--output_dir", tmp_path / "out",
                             *args)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [f"infer_dicom: {expected}"]
    assert not (tmp_path / "out").exists()  # nothing done


def test_all_abstained_is_status_1_and_not_ok(tmp_path, classifier, monkeypatch):
    write_mr_series(tmp_path / "in", gradient_series(3))
    monkeypatch.setitem(classifier.detector, "threshold", -1e9)  # every slice out of distribution
    summary = infer_dicom(tmp_path / "in", classifier, tmp_path / "out", progress=False)
    assert summary["n_series_abstained"] == 1 and summary["n_series_classified"] == 0
    assert summary["status"] == "no_result" and "abstention" in summary["reason"]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["status"] == "no_result"


def test_script_status_1_when_every_answer_abstains(tmp_path, classifier):
    """The script's own run: noise slices are out of the gradient detector's distribution."""
    import numpy as np

    rng = np.random.default_rng(0)
    write_mr_series(tmp_path / "in", [rng.integers(0, 400, (40, 40)).astype(float) for _ in range(4)])
    result = run_infer_dicom(tmp_path / "in", "--model", classifier.model_file, "--output_dir", tmp_path / "out",
                             "--device", "cpu", "--quiet")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    if summary["n_series_abstained"] != 1:
        pytest.skip("the tiny detector accepted the noise series; the library test above covers abstention")
    assert result.returncode == 1 and summary["status"] == "no_result"
    assert result.stderr.strip().splitlines()[-1].startswith("infer_dicom: no study was answered (no_result)")


# -- inputs: skip reasons without paths, named pipes, corrupt files ----------------------------------------------

PATIENT = FictitiousPatient(name="Kowalski^Jan", patient_id="RMRI-000777", birth_date="19500101")


def test_skip_reasons_carry_no_path_even_for_os_errors(tmp_path, classifier):
    folder = tmp_path / "in" / "KOWALSKI_JAN"  # as some PACS exports name folders
    write_mr_series(folder / "t1", gradient_series(3), patient=PATIENT)
    os.symlink(folder / "vanished.dcm", folder / "dangling.dcm")  # listed, then fails to open: ENOENT
    unreadable = folder / "Jan_notes.dcm"
    unreadable.write_bytes(b"\0" * 128 + b"DICM")
    os.chmod(unreadable, 0)
    summary = infer_dicom(tmp_path / "in", classifier, tmp_path / "out", progress=False)
    reasons = [item["reason"] for item in summary["skipped_files"]]
    assert "cannot read the file (FileNotFoundError ENOENT)" in reasons
    text = json.dumps(summary) + (tmp_path / "out" / "summary.json").read_text()
    for value in ("KOWALSKI", "Kowalski", "Jan", "vanished", "dangling", str(tmp_path)):
        assert value not in text, value


def test_a_named_pipe_is_skipped_without_being_opened(tmp_path, classifier):
    write_mr_series(tmp_path / "in", gradient_series(3))
    os.mkfifo(tmp_path / "in" / "pipe")  # opening it for reading would wait for a writer forever
    result = run_infer_dicom(tmp_path / "in", "--model", classifier.model_file, "--output_dir", tmp_path / "out",
                             "--device", "cpu", "--quiet", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["skipped_files"] == [{"reason": NOT_REGULAR, "count": 1}] and summary["n_series_classified"] == 1


def test_a_large_corrupt_file_is_skipped_after_a_bounded_read(tmp_path, classifier):
    write_mr_series(tmp_path / "in", gradient_series(3))
    with open(tmp_path / "in" / "zeros.dcm", "wb") as handle:  # a valid prefix, then 50 MB of zeros (sparse)
        handle.write(b"\0" * 128 + b"DICM")
        handle.truncate(50 * 1024 * 1024)
    assert os.path.getsize(tmp_path / "in" / "zeros.dcm") > HEADER_LIMIT_BYTES
    result = run_infer_dicom(tmp_path / "in", "--model", classifier.model_file, "--output_dir", tmp_path / "out",
                             "--device", "cpu", "--quiet", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    (skipped,) = summary["skipped_files"]
    assert skipped["count"] == 1 and skipped["reason"].startswith("no pixel data within the first 4 MB")


def test_a_study_refused_for_integrity_says_why(tmp_path, classifier):
    other = FictitiousPatient(name="Other^Bruno", patient_id="RMRI-000456", birth_date="19700101", sex="M")
    shared, study = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    write_mr_series(tmp_path / "in" / "a", gradient_series(3), patient=PATIENT, series_uid=shared, study_uid=study)
    write_mr_series(tmp_path / "in" / "b", gradient_series(2, seed=1), patient=other, series_uid=shared,
                    study_uid=study)
    summary = infer_dicom(tmp_path / "in", classifier, tmp_path / "out", progress=False)
    (entry,) = summary["studies"]
    assert entry["status"] == "no_result" and "matches the series rule" not in entry["reason"]
    assert entry["reason"].startswith("no series of the study can be used: series 1: refused: files sharing one "
                                      "SeriesInstanceUID disagree on PatientID")


def test_manifest_digests_match_the_files(tmp_path, classifier):
    write_mr_series(tmp_path / "in", gradient_series(3))
    summary = infer_dicom(tmp_path / "in", classifier, tmp_path / "out", progress=False, output="series")
    assert summary["status"] == "ok" and len(summary["files"]) == 2
    for item in summary["files"]:
        assert not os.path.isabs(item["file"])
        assert hashlib.sha256((tmp_path / "out" / item["file"]).read_bytes()).hexdigest() == item["sha256"]
