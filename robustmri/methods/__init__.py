"""Training methods: one module per method, and the registry that lists them.

A method's name is its module (``robustmri/methods/<name>.py``), its bundle config
(``bundle/configs/<name>.json``; plain training is ``train.json``) and the prefix of its
options (``<name>_*``). Each module declares itself once::

    METHOD = Method(name="isp", title="Influence-based Sample Perturbation", order=4,
                    families=("noisy images",), summary="influence_summary.json", reference="...")

and :func:`registry` finds every declaration, so the benchmark, the tests and the docs'
tables read one list: adding a method touches its module, its config and its test
(``docs/methods.md``, "Adding a method", has a worked example).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import dataclass

from robustmri.engine.configs import TRAIN, WORKFLOWS, part

#: The families a benchmark profile draws its methods from.
FAMILIES = ("noisy images", "noisy labels")


@dataclass(frozen=True)
class Method:
    """One training method as the bundle runs it."""

    name: str  # module = config = option prefix
    title: str
    order: int  # position in tables and benchmark runs
    families: tuple[str, ...]  # problems it addresses (benchmark profiles choose by family)
    summary: str | None  # the file it writes into output_dir besides the standard outputs, if any
    reference: str  # where the method comes from
    config: str = ""  # the bundle config, relative to bundle/configs/ (default: <name>.json)
    builds_on: tuple[str, ...] = ()  # shared parts merged between train.json and the method's own part

    def __post_init__(self):
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown:
            raise ValueError(f"method {self.name!r}: unknown families {unknown}; expected some of {FAMILIES}")
        if not self.config:
            object.__setattr__(self, "config", f"{self.name}.json")

    @property
    def config_path(self) -> str:
        """The config as ``--config_file`` takes it from ``bundle/``."""
        return f"configs/{self.config}"


@functools.cache
def registry() -> dict[str, Method]:
    """Every method declared by a module of this package, in table order."""
    found = []
    for module in pkgutil.iter_modules(__path__):
        method = getattr(importlib.import_module(f"{__name__}.{module.name}"), "METHOD", None)
        if method is None:
            continue
        if method.name != module.name:
            raise ValueError(f"{__name__}.{module.name} declares a method named {method.name!r}: "
                             "the module's name is the method's name")
        found.append(method)
    return {m.name: m for m in sorted(found, key=lambda m: (m.order, m.name))}


def in_family(family: str) -> list[str]:
    """Names of the methods that address ``family``, in table order."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return [name for name, method in registry().items() if family in method.families]


def config_sources() -> dict[str, tuple[str, ...]]:
    """Every generated bundle config and its sources (relative to ``bundle/configs/``), in merge order.

    A method's config is ``train.json``, the parts it ``builds_on``, then ``parts/<name>.json``
    (a method whose config is ``train.json`` itself has none); the other workflows are
    :data:`robustmri.engine.configs.WORKFLOWS`.
    """
    methods = {method.config: (TRAIN, *map(part, method.builds_on), part(method.name))
               for method in registry().values() if method.config != TRAIN}
    return {**methods, **WORKFLOWS}


def markdown_table() -> str:
    """The training workflows table of the docs, generated from the registry."""
    rows = ["| method | run | problem | what it does | from |", "| --- | --- | --- | --- | --- |"]
    for method in registry().values():
        rows.append(f"| `{method.name}` | `--config_file {method.config_path}` | {', '.join(method.families)} | "
                    f"{method.title} | {method.reference} |")
    return "\n".join(rows)
