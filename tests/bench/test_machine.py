"""The machine and code a benchmark records beside its numbers."""

import re
import shutil
import subprocess

import monai
import pytest
import torch

from robustmri import __version__
from robustmri.bench import machine

from conftest import ROOT


def _git(*args):
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()


def test_the_code_version_names_the_checkouts_commit():
    if shutil.which("git") is None or not _git("rev-parse", "HEAD"):
        pytest.skip("not a git checkout")
    machine.code_version.cache_clear()
    version = machine.code_version()
    assert version["robustmri"] == __version__
    assert version["commit"] == _git("rev-parse", "HEAD") and re.fullmatch(r"[0-9a-f]{40}", version["commit"])
    # git describe of that commit, "-dirty" exactly when tracked files differ from it
    assert version["describe"] == _git("describe", "--always", "--dirty", "--abbrev=12")
    assert version["modified"] == bool(_git("status", "--porcelain", "--untracked-files=no"))
    assert machine.describe_machine()["code"] == version
    assert machine.run_provenance() == {"commit": version["describe"], "versions": {
        "robustmri": __version__, "torch": torch.__version__, "monai": monai.__version__}}


def test_outside_a_checkout_the_commit_is_unknown(monkeypatch):
    monkeypatch.setenv("PATH", "")  # no git to ask
    machine.code_version.cache_clear()
    try:
        assert machine.code_version() == {"robustmri": __version__, "commit": None, "describe": None,
                                          "modified": None}
        assert machine.run_provenance()["commit"] is None
    finally:
        machine.code_version.cache_clear()


def test_write_measurement_stamps_and_writes_both_files(tmp_path, capsys):
    import json

    report = {"rows": [1]}
    machine.write_measurement(tmp_path / "out", "thing", report, "| a |\n", "bench_thing.py", ["--x", "1"])
    written = json.loads((tmp_path / "out" / "thing.json").read_text())
    assert written["rows"] == [1] and written["command"] == "python scripts/bench_thing.py --x 1"
    assert written["code"] == machine.code_version() and written["date"].endswith("UTC") and "CPU(s)" in written["machine"]
    assert (tmp_path / "out" / "thing.md").read_text() == "| a |\n" and "| a |" in capsys.readouterr().out
