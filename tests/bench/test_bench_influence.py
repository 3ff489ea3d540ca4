import json
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # runs scripts/bench_influence.py in a new interpreter


def test_bench_influence_runs_and_agrees_with_reference(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_influence.py"), "--n", "40", "--n_val", "10",
                             "--size", "32", "--padding", "2", "--batch_size", "16", "--threads", "1",
                             "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(out.read_text())["figures"]
    assert figures["inference_pass_s"] > 0 and figures["isp_step_s"] >= figures["isr_step_s"] > 0
    # the same LiSSA recursion (same mini-batches) on cached features vs with network passes
    assert figures["pearson_ours_lissa_vs_reference"] > 0.999
    assert figures["hessian_max_eig"] > 0
