"""The machine and code a benchmark records beside its numbers."""

import re
import shutil
import subprocess

import pytest

from robustmri import __version__
from robustmri.bench.machine import code_version, describe_machine

from conftest import ROOT


def test_the_code_version_names_the_checkouts_commit():
    if shutil.which("git") is None or subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                                                     capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    version = code_version()
    assert version["robustmri"] == __version__
    assert version["commit"] == head and re.fullmatch(r"[0-9a-f]{40}", version["commit"])
    assert isinstance(version["modified"], bool)
    assert describe_machine()["code"]["commit"] == head


def test_outside_a_checkout_the_commit_is_unknown(monkeypatch):
    from robustmri.bench import machine

    monkeypatch.setenv("PATH", "")  # no git to ask
    assert machine.code_version() == {"robustmri": __version__, "commit": None, "modified": None}
