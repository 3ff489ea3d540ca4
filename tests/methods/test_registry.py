"""The method registry: one declaration per method, and everything that reads it agrees with the files."""

import json
import shutil

import pytest

from robustmri.methods import FAMILIES, Method, config_sources, in_family, markdown_table, registry
from robustmri.methods.__main__ import main as methods_main

from conftest import BUNDLE, ROOT

METHODS = sorted(registry())


def _in_order(names: list[str], expected: list[str]) -> bool:
    """``expected`` appears in ``names`` in this order (other methods may stand between them)."""
    return [n for n in names if n in expected] == expected


def test_registry_holds_every_method_module_once_in_table_order():
    methods = registry()
    not_methods = {"__init__", "__main__"}
    modules = {p.stem for p in (ROOT / "robustmri" / "methods").glob("*.py")} - not_methods
    assert set(methods) == modules  # every method module declares itself; nothing else does
    assert _in_order(list(methods), ["naive", "at", "n2v", "isr", "isp", "alr", "mwnet", "pie", "pint", "audit"])
    assert len({m.order for m in methods.values()}) == len(methods)
    assert _in_order(in_family("noisy images"), ["naive", "at", "n2v", "isr", "isp"])
    assert _in_order(in_family("noisy labels"), ["naive", "isr", "alr", "mwnet", "pie", "pint", "audit"])
    assert all(set(in_family(f)) == {n for n, m in methods.items() if f in m.families} for f in FAMILIES)
    with pytest.raises(ValueError, match="unknown families"):
        Method(name="x", title="x", order=99, families=("noisy pixels",), summary=None, reference="")


@pytest.mark.parametrize("name", METHODS)
def test_each_method_has_its_config_and_its_test(name):
    method = registry()[name]
    assert (BUNDLE / "configs" / method.config).is_file()
    assert (ROOT / "tests" / "methods" / f"test_{name}.py").is_file()
    assert set(method.families) <= set(FAMILIES)
    if method.summary:  # a method's own output is named after it (ISR and ISP share the influence step's)
        assert method.summary.startswith((f"{name}_", "influence_"))


def _load(config: str) -> dict:
    return json.loads((BUNDLE / "configs" / config).read_text())


@pytest.mark.parametrize("name", [n for n in METHODS if n != "naive"])
def test_ids_a_method_adds_carry_its_name(name):
    """File name = config name = option prefix: new ids are `<name>` or `<name>_*`; others override what it builds on."""
    *under, own = config_sources()[registry()[name].config]
    inherited = {key.lstrip("+") for config in under for key in _load(config)}
    added = [key for key in _load(own) if key.lstrip("+") not in inherited]
    strays = [key for key in added if key != name and not key.startswith(f"{name}_")]
    assert not strays, f"{own} adds ids without the {name}_ prefix: {strays}"
    handlers = _load(own).get("+method_handlers", [])
    assert not handlers or (f"@{name}" in handlers and name in added), f"{own}: its handler is not called {name!r}"


def test_the_configs_check_names_a_stale_config_and_write_makes_it_current(tmp_path):
    methods_main(check_configs=True, bundle=str(BUNDLE))  # exits with a message when out of date
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE / "configs", bundle / "configs")
    part = bundle / "configs" / "parts" / "influence.json"
    part.write_text(part.read_text().replace('"influence_epoch": 30', '"influence_epoch": 29'))
    with pytest.raises(SystemExit, match=r"out of date: audit\.json, isp\.json, isr\.json; .*--write-configs"):
        methods_main(check_configs=True, bundle=str(bundle))
    methods_main(write_configs=True, bundle=str(bundle))
    methods_main(check_configs=True, bundle=str(bundle))
    assert json.loads((bundle / "configs" / "isp.json").read_text())["influence_epoch"] == 29
    with pytest.raises(SystemExit, match="no train.json"):
        methods_main(check_configs=True, bundle=str(tmp_path / "elsewhere"))


def test_the_docs_table_is_generated_from_the_registry(tmp_path):
    methods_main(check=str(BUNDLE / "docs" / "README.md"))  # exits with a message when out of date
    stale = tmp_path / "README.md"
    stale.write_text((BUNDLE / "docs" / "README.md").read_text().replace("`audit`", "`audit_old`"))
    with pytest.raises(SystemExit, match="out of date"):
        methods_main(check=str(stale))
    methods_main(write=str(stale))
    methods_main(check=str(stale))
    assert markdown_table() in stale.read_text()
