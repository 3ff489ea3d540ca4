"""The bundle's generated configs: written in full from their parts, current, and read by MONAI as shipped."""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import monai
import numpy
import pytest
import torch
from monai.bundle import ConfigParser

from robustmri.engine import configs
from robustmri.methods import config_sources, registry

from conftest import BUNDLE, ROOT

CONFIGS = BUNDLE / "configs"
SOURCES = config_sources()
WHOLE = sorted(name for name, files in SOURCES.items() if files[0] == configs.TRAIN)
OVERLAYS = sorted(set(SOURCES) - set(WHOLE))
#: Files whose ``python -m monai.bundle run <id> --config_file ...`` commands users copy.
DOCUMENTED = [ROOT / "README.md", ROOT / "Makefile", BUNDLE / "docs" / "README.md", *sorted((ROOT / "docs").glob("*.md")),
              ROOT / "apps" / "monailabel" / "README.md"]
COMMAND = re.compile(r"""(?:\brun|\(BUNDLE_RUN\))\s+(\w+)\s+(?:\\\n\s*)?--config_file\s+("\[[^\]]*\]"|(?:bundle/)?configs/\S+)""")


def write(path: Path, content: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return path


def test_every_generated_config_is_current():
    assert configs.stale(CONFIGS, SOURCES) == [], "run python -m robustmri.methods --write-configs"


def test_every_method_config_but_plain_training_is_generated_from_train_json_and_its_own_part():
    for method in registry().values():
        if method.config == configs.TRAIN:
            continue
        files = SOURCES[method.config]
        assert files[0] == configs.TRAIN and files[-1] == configs.part(method.name)
        assert all((CONFIGS / name).is_file() for name in files)
    assert SOURCES["isp.json"] == (configs.TRAIN, configs.part("influence"), configs.part("isp"))


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.json")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_no_file_names_another_to_extend(path):
    assert "_base_" not in json.loads(path.read_text())


@pytest.mark.parametrize("name", OVERLAYS)
@pytest.mark.parametrize("under", ["train.json", "isp.json", "n2v.json"])
def test_an_overlay_listed_after_a_config_means_its_parts_listed_there(name, under):
    listed = ConfigParser.load_config_files([CONFIGS / under, CONFIGS / name])
    assert listed == ConfigParser.load_config_files([CONFIGS / under, *(CONFIGS / f for f in SOURCES[name])])


def test_overlay_parts_join_their_appends_and_refuse_to_set_one_id_twice():
    joined = configs.join_overlays([{"+imports": ["$import a"], "x": 1, "node#a": 1},
                                    {"+imports": ["$import b"], "+extra": {"k": 1}, "node2#b": 2}])
    assert joined == {"+imports": ["$import a", "$import b"], "x": 1, "node#a": 1, "+extra": {"k": 1}, "node2#b": 2}
    with pytest.raises(ValueError, match="two overlay parts set 'node'"):
        configs.join_overlays([{"node#a": 1}, {"node": {"b": 2}}])


def test_write_makes_stale_configs_current_and_names_them(tmp_path):
    write(tmp_path / "train.json", {"imports": ["$import os"], "handlers": [], "epochs": 3, "node": {"a": 1}})
    write(tmp_path / "parts" / "shared.json", {"+imports": ["$import math"], "shared_rate": 0.5})
    write(tmp_path / "parts" / "m.json", {"+handlers": ["@m"], "m": {"rate": "@shared_rate"}, "node#a": 2})
    sources = {"m.json": ("train.json", "parts/shared.json", "parts/m.json")}
    assert configs.stale(tmp_path, sources) == ["m.json"]  # missing
    assert configs.write(tmp_path, sources) == ["m.json"]
    assert json.loads((tmp_path / "m.json").read_text()) == {
        "imports": ["$import os", "$import math"], "handlers": ["@m"], "epochs": 3, "node": {"a": 2},
        "shared_rate": 0.5, "m": {"rate": "@shared_rate"}}
    assert configs.stale(tmp_path, sources) == [] and configs.write(tmp_path, sources) == []
    write(tmp_path / "parts" / "shared.json", {"+imports": ["$import math"], "shared_rate": 0.25})
    assert configs.stale(tmp_path, sources) == ["m.json"]  # a shared part changed: the config is stale


def documented_runs() -> list[tuple[str, list[str]]]:
    """Every ``run <id> --config_file <files>`` of the docs and the Makefile: (run id, files relative to bundle/)."""
    found = []
    for path in DOCUMENTED:
        if not path.is_file():
            continue
        for run_id, files in COMMAND.findall(path.read_text()):
            listed = ast.literal_eval(ast.literal_eval(files)) if files.startswith('"') else [files.rstrip("`")]
            if not any("<" in f for f in listed):  # "configs/<method>.json" in prose
                found.append((run_id, [f.removeprefix("bundle/") for f in listed]))
    return found


#: (run id, files): every method config alone, every workflow config, evaluation on every method, the docs' lists.
RUNS = list(dict.fromkeys(
    [("training", (method.config_path,)) for method in registry().values()]
    + [("inference", ("configs/inference.json",)), ("exporting", ("configs/export.json",)),
       ("dicom_inference", ("configs/infer_dicom.json",)), ("calibrating", ("configs/calibrate.json",))]
    + [("evaluating", (method.config_path, "configs/evaluate.json")) for method in registry().values()]
    + [(run_id, tuple(files)) for run_id, files in documented_runs()]))

#: Run in an interpreter started with -S: no site-packages .pth file runs, so nothing imports robustmri (or patches
#: MONAI) at start-up; the packages' folders are put on sys.path by hand, which runs no .pth file either.
FRESH_LOADER = """
import json, sys
sys.path.extend({paths!r})
before = sorted(name for name in sys.modules if name.split('.')[0] == 'robustmri')
from monai.bundle import ConfigParser
results = []
for run_id, files in {runs!r}:
    parser = ConfigParser()
    parser.read_config([f'{bundle}/' + f for f in files])
    config = parser.get()
    results.append({{"run_id": run_id, "files": files, "found": run_id in config, "base_key": "_base_" in config,
                    "trainer": parser.get("train#trainer#_target_")}})
after = sorted(name for name in sys.modules if name.split('.')[0] == 'robustmri')
print(json.dumps({{"before": before, "after": after, "results": results}}))
"""


def test_docs_commands_are_found():
    runs = documented_runs()
    assert ("training", ["configs/isp.json"]) in runs
    assert ("evaluating", ["configs/isp.json", "configs/evaluate.json"]) in runs


@pytest.mark.slow  # a new interpreter imports MONAI (and torch)
def test_monai_as_shipped_finds_the_run_id_of_every_config_in_a_fresh_interpreter():
    paths = sorted({os.path.dirname(os.path.dirname(module.__file__)) for module in (monai, torch, numpy)})
    code = FRESH_LOADER.format(paths=paths, runs=[[run_id, list(files)] for run_id, files in RUNS], bundle=BUNDLE)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}  # robustmri not even importable
    result = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=300, env=env,
                            cwd=BUNDLE)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads(result.stdout.strip().splitlines()[-1])
    assert state["before"] == [] and state["after"] == []
    missing = [f"{r['run_id']} in {r['files']}" for r in state["results"] if not r["found"] or r["base_key"]]
    assert not missing, "MONAI as shipped does not find: " + "; ".join(missing)
    trainers = {tuple(r["files"]): r["trainer"] for r in state["results"]}
    assert all(trainers[(method.config_path,)] == "SupervisedTrainer" for method in registry().values())
    assert len(state["results"]) == len(RUNS) > 2 * len(registry())
