"""Config files that name their base (``"_base_"``): robustmri/engine/configs.py wraps MONAI's loader."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from monai.bundle import ConfigParser
from monai.bundle.utils import merge_kv

from robustmri.engine import configs

from conftest import BUNDLE, ROOT
from helpers import config_chain

CONFIGS = BUNDLE / "configs"

configs.install()  # as the .pth file does when Python starts (idempotent)


def write(path: Path, content: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return path


EXTENDING = sorted(p.name for p in CONFIGS.glob("*.json") if configs.BASE_KEY in json.loads(p.read_text()))
#: Whole configs (their chain starts at train.json); the others are overlays built on an overlay (evaluate.json).
WHOLE = [name for name in EXTENDING if config_chain(CONFIGS / name)[0].name == "train.json"]
OVERLAYS = sorted(set(EXTENDING) - set(WHOLE))


def stock_merge(files) -> dict:
    """``ConfigParser.load_config_files(files)`` as stock MONAI does it: each file read as it is (no
    ``_base_`` expansion) and merged in order with MONAI's own ``merge_kv``."""
    merged = ConfigParser(config={})
    for path in files:
        for key, value in json.loads(Path(path).read_text()).items():
            merge_kv(merged, key, value)
    return merged.get()


def test_the_bundle_has_configs_that_extend_others():
    assert {"influence.json", "isp.json", "isr.json", "inference.json"} <= set(EXTENDING)
    assert [p.name for p in config_chain(CONFIGS / "isp.json")] == ["train.json", "influence.json", "isp.json"]


@pytest.mark.parametrize("name", WHOLE)
def test_a_config_alone_is_its_chain_of_files_merged_by_stock_monai(name):
    stock = stock_merge(config_chain(CONFIGS / name))
    # stock MONAI keeps "_base_" as an ordinary (unused) id, the last file's; the hook consumes it
    assert stock.pop(configs.BASE_KEY) == json.loads((CONFIGS / name).read_text())[configs.BASE_KEY]
    alone = ConfigParser.load_config_file(CONFIGS / name)
    assert configs.BASE_KEY not in alone
    assert alone == stock


@pytest.mark.parametrize("name", OVERLAYS)
@pytest.mark.parametrize("under", ["train.json", "isp.json"])
def test_an_overlay_on_an_overlay_means_its_chain_listed_on_top_of_the_config(name, under):
    merged = ConfigParser.load_config_files([CONFIGS / under, CONFIGS / name])
    stock = stock_merge([*config_chain(CONFIGS / under), *config_chain(CONFIGS / name)])
    stock.pop(configs.BASE_KEY)
    assert merged == stock
    with pytest.raises((KeyError, ValueError)):  # alone, its nested ids have nothing to go into, as in stock MONAI
        ConfigParser.load_config_files([CONFIGS / name])


def test_an_overlay_base_keeps_the_order_of_edits_that_need_a_config_underneath(tmp_path):
    write(tmp_path / "base.json", {"+items": ["b"], "node#x": 1, "kept": 1})
    write(tmp_path / "top.json", {"_base_": "base.json", "+items": ["c"], "node#y": 2, "replaced": {"z": 0},
                                  "+replaced": {"w": 1}})
    write(tmp_path / "under.json", {"items": ["a"], "node": {"x": 0}, "replaced": {"old": 1}})
    merged = ConfigParser.load_config_files([tmp_path / "under.json", tmp_path / "top.json"])
    assert merged["items"] == ["a", "b", "c"] and merged["node"] == {"x": 1, "y": 2} and merged["kept"] == 1
    assert merged["replaced"] == {"z": 0, "w": 1}  # the plain id replaced, then its own "+" edit applied
    write(tmp_path / "top2.json", {"_base_": "base.json", "node": {"fresh": True}})
    merged = ConfigParser.load_config_files([tmp_path / "under.json", tmp_path / "top2.json"])
    assert merged["node"] == {"fresh": True}  # a later plain id supersedes the base's edit of it, as in a list


def test_isp_alone_has_what_each_file_of_its_chain_adds():
    merged = ConfigParser.load_config_file(CONFIGS / "isp.json")
    assert merged["imports"][-1] == "$import robustmri.influence"  # influence.json's "+imports" appended
    assert merged["imports"][:-1] == json.loads((CONFIGS / "train.json").read_text())["imports"]
    assert merged["method_handlers"] == ["@isp"]  # isp.json's "+method_handlers" onto train.json's []
    assert merged["influence_epoch"] == 30 and merged["isp"]["_target_"] == "robustmri.methods.isp.ISPHandler"
    assert merged["train"]["trainer"]["train_handlers"] == "$@train#handlers + @method_handlers"


def test_a_list_of_files_that_extend_others_gives_the_same_config():
    # `--config_file "['configs/train.json','configs/isp.json']"` (the documented list form) still works
    listed = ConfigParser.load_config_files([CONFIGS / "train.json", CONFIGS / "isp.json"])
    assert listed == ConfigParser.load_config_file(CONFIGS / "isp.json")


def test_a_list_of_bases_merges_in_order_then_the_file(tmp_path):
    write(tmp_path / "a.json", {"x": 1, "y": "a", "items": [1], "nested": {"p": 1, "q": 1}})
    write(tmp_path / "b.json", {"y": "b", "+items": [2], "nested#q": 2})
    child = write(tmp_path / "child.json", {"_base_": ["a.json", "b.json"], "+items": [3], "z": True})
    assert ConfigParser.load_config_file(child) == {
        "x": 1, "y": "b", "items": [1, 2, 3], "nested": {"p": 1, "q": 2}, "z": True}


def test_relative_bases_are_found_beside_the_file_that_names_them_not_in_the_working_directory(
        tmp_path, monkeypatch):
    write(tmp_path / "cfg" / "common" / "root.json", {"source": "cfg/common/root.json", "depth": 0})
    write(tmp_path / "cfg" / "common" / "mid.json", {"_base_": "root.json", "depth": 1})
    child = write(tmp_path / "cfg" / "child.json", {"_base_": "common/mid.json", "depth": 2})
    # decoys where a working-directory (or child-relative) lookup of "root.json" would land
    for decoy in (tmp_path / "root.json", tmp_path / "cfg" / "root.json", tmp_path / "common" / "mid.json"):
        write(decoy, {"source": f"decoy {decoy}", "depth": -1})
    monkeypatch.chdir(tmp_path)
    assert ConfigParser.load_config_file(child) == {"source": "cfg/common/root.json", "depth": 2}
    assert ConfigParser.load_config_file("cfg/child.json") == {"source": "cfg/common/root.json", "depth": 2}


def test_an_absolute_base_is_taken_as_is(tmp_path):
    base = write(tmp_path / "elsewhere" / "base.json", {"a": 1})
    child = write(tmp_path / "cfg" / "child.json", {"_base_": str(base), "b": 2})
    assert ConfigParser.load_config_file(child) == {"a": 1, "b": 2}


def test_a_missing_base_is_a_clear_error(tmp_path):
    child = write(tmp_path / "child.json", {"_base_": "trian.json", "a": 1})
    with pytest.raises(configs.BaseConfigError, match=r"child\.json: _base_ names 'trian\.json'.*not a file"):
        ConfigParser.load_config_file(child)


@pytest.mark.parametrize("layout", ["self", "pair", "through a list"])
def test_bases_that_include_each_other_are_a_clear_error(tmp_path, layout):
    if layout == "self":
        start = write(tmp_path / "a.json", {"_base_": "a.json"})
    elif layout == "pair":
        start = write(tmp_path / "a.json", {"_base_": "b.json"})
        write(tmp_path / "b.json", {"_base_": "a.json"})
    else:
        write(tmp_path / "ok.json", {"ok": 1})
        start = write(tmp_path / "a.json", {"_base_": ["ok.json", "sub/b.json"]})
        write(tmp_path / "sub" / "b.json", {"_base_": "../a.json"})
    with pytest.raises(configs.BaseConfigError, match="include each other: a.json -> .*a.json"):
        ConfigParser.load_config_file(start)


def test_the_same_base_twice_in_a_diamond_is_not_a_cycle(tmp_path):
    write(tmp_path / "root.json", {"r": 1, "l": []})
    write(tmp_path / "left.json", {"_base_": "root.json", "+l": ["left"]})
    write(tmp_path / "right.json", {"_base_": "root.json", "side": "right"})
    child = write(tmp_path / "child.json", {"_base_": ["left.json", "right.json"]})
    # right.json brings root's l == [] back: later bases override earlier ones, as in a list of files
    assert ConfigParser.load_config_file(child) == {"r": 1, "l": [], "side": "right"}


def fake_parser_module():
    """A stand-in for monai.bundle.config_parser whose loader reads JSON (no shared state with MONAI's)."""
    class FakeParser:
        @classmethod
        def load_config_file(cls, filepath, **kwargs):
            return json.loads(Path(filepath).read_text())

    module = types.ModuleType(configs._TARGET)
    module.ConfigParser = FakeParser
    return module


def test_patching_twice_wraps_the_loader_once(tmp_path):
    module = fake_parser_module()
    configs.patch(module.ConfigParser)
    wrapped = module.ConfigParser.__dict__["load_config_file"]
    configs.patch(module.ConfigParser)
    assert module.ConfigParser.__dict__["load_config_file"] is wrapped
    write(tmp_path / "base.json", {"a": 1})
    assert module.ConfigParser.load_config_file(write(tmp_path / "c.json", {"_base_": "base.json"})) == {"a": 1}
    # MONAI's own parser: the .pth file and this module both installed the hook; it is wrapped once
    wrapped = ConfigParser.__dict__["load_config_file"]
    configs.install()
    configs.patch(ConfigParser)
    assert ConfigParser.__dict__["load_config_file"] is wrapped


def test_install_before_monai_is_imported_adds_one_import_hook(monkeypatch):
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if not isinstance(f, configs._PatchWhenImported)])
    monkeypatch.delitem(sys.modules, configs._TARGET)
    monkeypatch.delenv(configs.DISABLE_ENV, raising=False)
    configs.install()
    configs.install()
    assert sum(isinstance(f, configs._PatchWhenImported) for f in sys.meta_path) == 1


@pytest.mark.parametrize("value, active", [("1", False), ("yes", False), ("0", True), ("", True)])
def test_install_respects_the_switch(monkeypatch, value, active):
    module = fake_parser_module()
    monkeypatch.setitem(sys.modules, configs._TARGET, module)
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if not isinstance(f, configs._PatchWhenImported)])
    monkeypatch.setenv(configs.DISABLE_ENV, value)
    configs.install()
    assert getattr(module.ConfigParser, configs._PATCHED, False) is active
    assert not any(isinstance(f, configs._PatchWhenImported) for f in sys.meta_path)


def startup_state(probe: str, **env) -> dict:
    """What a fresh ``python -c`` (the .pth files run, nothing else imported yet) reports as JSON."""
    head = ("import json, sys\n"
            "state = {'configs': 'robustmri.engine.configs' in sys.modules, 'monai': 'monai' in sys.modules,\n"
            "         'torch': 'torch' in sys.modules,\n"
            "         'hooks': sum(type(f).__name__ == '_PatchWhenImported' for f in sys.meta_path)}\n")
    result = subprocess.run([sys.executable, "-c", head + probe + "print(json.dumps(state))"], check=False, cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # imports MONAI (and torch) in a new interpreter
def test_a_fresh_interpreter_has_the_hook_without_importing_monai_at_start():
    state = startup_state(
        "from monai.bundle import ConfigParser\n"
        "isp = ConfigParser.load_config_file('bundle/configs/isp.json')\n"
        "state.update(base_left='_base_' in isp, trainer='trainer' in isp['train'],\n"
        "             method_handlers=isp['method_handlers'],\n"
        "             hooks_after=sum(type(f).__name__ == '_PatchWhenImported' for f in sys.meta_path))\n")
    assert state == {"configs": True, "monai": False, "torch": False, "hooks": 1,
                     "base_left": False, "trainer": True, "method_handlers": ["@isp"], "hooks_after": 0}


def test_a_fresh_interpreter_with_the_switch_set_has_no_hook():
    state = startup_state("", **{configs.DISABLE_ENV: "1"})
    assert state == {"configs": True, "monai": False, "torch": False, "hooks": 0}
