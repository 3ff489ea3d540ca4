"""The node's benchmark at a tiny size (2 studies of 4 slices, a tiny signed model), so that it cannot rot."""

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from robustmri.bench.node_speed import markdown_table, measure_node
from robustmri.bench.pacs import pacs_tools_missing

from deploy_helpers import export_tiny, gradient_detector_data, gradient_series, signing_keys
from helpers import killed_in_a_child

pytestmark = pytest.mark.slow  # an exported model, Orthanc and node processes

NEEDS_PACS = pytest.mark.skipif(bool(pacs_tools_missing()),
                                reason="needs Orthanc and dcmtk's storescu (Debian packages orthanc, dcmtk)")


def _measured_in_a_child(folder, **kwargs) -> tuple[dict, bytes]:
    """A tiny signed model exported and measure_node(...) run in a forked child (:func:`helpers.killed_in_a_child`
    says why); the report (JSON) and the model's bytes back."""
    import json

    out = folder / "report.json"

    def run():
        (folder / "model").mkdir()
        _, _, onnx_file, _ = export_tiny(folder / "model", signed=True, ood=gradient_detector_data(),
                                         target_acceptance=1.0)
        report = measure_node(onnx_file, folder, gradient_series(4), ("--public_key", signing_keys()[1]), **kwargs)
        out.write_text(json.dumps({"report": report, "model": str(onnx_file)}))

    exit_code = killed_in_a_child(run, timeout=600)
    assert exit_code == 0, f"export or measure_node failed in its child (exit {exit_code})"
    result = json.loads(out.read_text())
    return result["report"], Path(result["model"]).read_bytes()


@NEEDS_PACS
def test_measure_node_times_every_study_to_its_one_sr(tmp_path):
    study_timeout = 0.5
    report, model_bytes = _measured_in_a_child(tmp_path, study_timeout=study_timeout, repeats=2, burst=2,
                                               study_wait_s=60, burst_wait_s=120)
    latency, burst = report["latency_s"], report["burst"]
    assert report["outcomes"] == {"ok": 5}  # the warm-up, 2 single studies, a burst of 2: all answered
    assert latency["repeats"] == len(latency["values"]) == 2
    assert latency["min"] <= latency["median"] <= latency["max"] and latency["min"] == min(latency["values"])
    assert 0 < latency["min"] and latency["max"] < 60  # the study timeout is subtracted, the work is not
    # a burst of 2 cannot end before one study's wait for further instances has passed
    assert burst["studies"] == 2 and burst["seconds"] > study_timeout
    assert burst["studies_per_hour"] == pytest.approx(2 * 3600 / burst["seconds"], rel=0.01)
    assert report["model"]["sha256"] == hashlib.sha256(model_bytes).hexdigest()
    assert report["model"]["model_version"] == "9.9.9" and len(report["model"]["integrity_sha256"]) == 64
    assert report["study_timeout_s"] == study_timeout and report["machine"]["cpu_count"] >= 1
    table = markdown_table(report)
    assert f"| studies per hour | {burst['studies_per_hour']} |" in table
    assert "| studies' outcomes (warm-up, single, burst) | ok 5 |" in table


def test_the_script_refuses_a_missing_model_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_node.py"), "--model",
                             str(tmp_path / "absent.onnx"), "--out", str(tmp_path / "out.json")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == \
        [f"bench_node: --model {tmp_path / 'absent.onnx'}: no such file"]
    assert not (tmp_path / "out.json").exists()
