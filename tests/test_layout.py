"""The package shows its parts: packages by role, imports only downward, no cycles, tests that mirror it."""

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "robustmri"
#: Each package may import from its own rank and below, never above; equal ranks only from themselves.
RANKS = {"": 0, "outputs": 0, "networks": 0, "data": 0, "influence": 1, "engine": 2, "abstention": 2.5, "evaluation": 3, "methods": 4,
         "review": 5, "deploy": 5, "bench": 6}


def _modules() -> dict[str, Path]:
    return {".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
            for path in PACKAGE.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """robustmri modules imported by ``path`` at any level (function-level imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("robustmri")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("robustmri"):
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_package_is_ranked_and_has_a_test_folder():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert packages <= set(RANKS), f"rank the new package(s) {packages - set(RANKS)} in this test"
    missing = [name for name in packages if not (ROOT / "tests" / name).is_dir()]
    assert not missing, f"tests mirror the layout: add tests/{missing}"


def test_subpackages_have_a_test_folder_too():
    """A package's subpackages (``deploy/dicom``, ``deploy/onnx``) keep its rank and mirror into ``tests/`` as well."""
    nested = [path.parent.relative_to(PACKAGE) for path in PACKAGE.glob("*/*/__init__.py")]
    assert nested, "no subpackage found: the glob no longer matches the layout"
    missing = [str(rel) for rel in nested if not (ROOT / "tests" / rel).is_dir()]
    assert not missing, f"tests mirror the layout: add tests/{missing}"


def test_tests_and_scripts_import_the_library_not_scripts():
    """Scripts are command lines over the library: nothing loads a script as a module (a test may run it)."""
    loaders = ("spec_from_file_location", "sys.path.insert", "sys.path.append")
    found = [f"{path.relative_to(ROOT)}: {loader}" for folder in ("tests", "scripts")
             for path in (ROOT / folder).rglob("*.py") if path.name != "test_layout.py"
             for loader in loaders if loader in path.read_text()]
    assert not found, "import the library instead:\n" + "\n".join(found)


def test_imports_only_go_downward():
    modules = _modules()
    upward = []
    for module, path in modules.items():
        own = _package(module)
        for imported in _imports(path):
            target = _package(imported)
            if target not in RANKS or target == own:
                continue
            if RANKS[target] > RANKS[own] or (RANKS[target] == RANKS[own] and target not in ("", "outputs")):
                upward.append(f"{module} imports {imported}")
    assert not upward, "imports must go to lower-ranked packages only:\n" + "\n".join(sorted(upward))


def test_no_import_cycles_between_modules():
    modules = _modules()
    graph = {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
