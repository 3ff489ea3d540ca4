"""The PACS round trip's tools: dcmtk's storescu, not the Python one pynetdicom puts first on an activated PATH."""

import os

from robustmri.bench.pacs import dcmtk_storescu, pacs_tools_missing


def _program(folder, text: str):
    folder.mkdir()
    path = folder / "storescu"
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


def test_the_python_storescu_of_a_virtual_environment_is_skipped(tmp_path, monkeypatch):
    _program(tmp_path / "venv_bin", "#!/opt/venv/bin/python\nfrom pynetdicom.apps.storescu.storescu import main\n")
    dcmtk = _program(tmp_path / "usr_bin", "#!/bin/sh\necho dcmtk\n")
    monkeypatch.setenv("PATH", os.pathsep.join([str(tmp_path / "venv_bin"), str(tmp_path / "usr_bin")]))
    assert dcmtk_storescu() == dcmtk


def test_only_a_python_storescu_counts_as_missing(tmp_path, monkeypatch):
    _program(tmp_path / "venv_bin", "#!/usr/bin/env python3\n")
    monkeypatch.setenv("PATH", str(tmp_path / "venv_bin"))
    assert dcmtk_storescu() is None and "storescu" in pacs_tools_missing()
