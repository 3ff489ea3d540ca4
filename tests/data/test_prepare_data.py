import json
import subprocess
import sys

import numpy as np
import pytest

from robustmri.data.catalog import scan_dataset

from conftest import ROOT
from helpers import gradient_image, write_figshare_mat

pytestmark = pytest.mark.slow  # each test runs scripts/prepare_data.py in a new interpreter


def run_script(*args):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_data.py"), *map(str, args)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_synthetic_export_is_a_readable_dataset(tmp_path):
    run_script("synthetic", "--out", tmp_path, "--patients", 12, "--size", 32)
    catalog = scan_dataset(tmp_path)
    assert catalog.grouped_by_patient and len({r.group for r in catalog.records}) == 12
    report = json.loads(run_script("summary", "--dataset_dir", tmp_path))
    assert report["images"] == len(catalog) and sum(report["classes"].values()) == len(catalog)


def test_from_mat_converts_and_anonymises(tmp_path):
    src = tmp_path / "mat"
    src.mkdir()
    for i, pid in enumerate(["MRN-0001", "MRN-0001", "MRN-0002"], start=1):
        write_figshare_mat(src / f"{i}.mat", gradient_image(seed=i), label=i, pid=pid)
    out = run_script("from_mat", "--src", src, "--out", tmp_path / "png")
    assert "MRN" not in out
    csv_text = (tmp_path / "png" / "labels.csv").read_text()
    assert "MRN" not in csv_text
    catalog = scan_dataset(tmp_path / "png")
    assert [r.group for r in catalog.records] == [0, 0, 1]
    from robustmri.data.readers import read_image

    np.testing.assert_array_equal(read_image(catalog.records[0].file), gradient_image(seed=1).astype(np.float32))
