"""The bundle's generated configs: each written in full from the parts MONAI merges into it.

MONAI composes bundle configs by listing files (``--config_file "['configs/train.json',
'configs/quick.json']"``): later files override earlier ones id by id, ``"+id"`` appends to a
list or dict, and ``"a#b"`` keys override nested ids (``monai.bundle.utils.merge_kv``). A file
cannot name the file it extends, yet a method has to run on its own (``--config_file
configs/isp.json``) and model-zoo bundles ship each workflow as a config that stands alone. So
the configs that build on ``train.json`` are written in full, committed, and regenerated from
their parts:

- ``bundle/configs/train.json`` (plain training) and the overlays ``quick.json``,
  ``paper_recipe.json``, ``multi_gpu_train.json``, ``multi_gpu_evaluate.json`` are written by
  hand;
- ``bundle/configs/parts/<name>.json`` holds what one config adds: a method's few lines
  (``parts/isp.json``), the settings several share (``parts/influence.json``,
  ``parts/trained_model.json``), a workflow's own ids (``parts/inference.json``). Each part is
  itself an overlay stock MONAI understands;
- ``bundle/configs/<name>.json`` is generated: MONAI's own ``ConfigParser.load_config_files`` of
  its sources (:data:`WORKFLOWS`, and each method's ``train.json``, the parts its declaration
  names in ``builds_on``, then ``parts/<method>.json``). ``evaluate.json`` stays an overlay (it is
  listed after a training config); its parts are joined so that listing it means listing them.

``python -m robustmri.methods --write-configs`` rewrites every generated file;
``--check-configs`` exits non-zero naming any file that regenerating would change (a test runs
it). Nothing here runs when Python or MONAI starts: MONAI reads the generated files as shipped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

#: The config every whole config starts from.
TRAIN = "train.json"
#: The folder of parts, inside ``bundle/configs/``.
PARTS = "parts"


def part(name: str) -> str:
    """A part's path relative to ``bundle/configs/``."""
    return f"{PARTS}/{name}.json"


#: Generated configs that are not a method's: each and its sources, in merge order (methods come from the registry).
WORKFLOWS = {
    "inference.json": (TRAIN, part("trained_model"), part("inference")),
    "export.json": (TRAIN, part("trained_model"), part("inference"), part("export")),
    "infer_dicom.json": (TRAIN, part("trained_model"), part("inference"), part("infer_dicom")),
    # reads the site's files as file inference does
    "calibrate.json": (TRAIN, part("trained_model"), part("inference"), part("calibrate")),
    # an overlay: listed after the training config of the model it evaluates
    "evaluate.json": (part("trained_model"), part("evaluate")),
}


def _read(configs_dir: str | os.PathLike, name: str) -> dict:
    with open(os.path.join(configs_dir, name)) as handle:
        return json.load(handle)


def join_overlays(parts: Sequence[dict]) -> dict:
    """Overlays joined into one that, listed after a config, means listing ``parts`` in order.

    The parts must set different ids; a ``"+id"`` in several is joined (lists concatenated, dicts
    updated), as MONAI would apply them one after the other.
    """
    from monai.bundle.utils import MERGE_KEY

    def root(key: str) -> str:
        return key.removeprefix(MERGE_KEY).replace("::", "#").split("#")[0]

    joined: dict = {}
    for content in parts:
        earlier = {root(key) for key in joined}
        for key, value in content.items():
            if key.startswith(MERGE_KEY) and key in joined:
                joined[key] = [*joined[key], *value] if isinstance(value, list) else {**joined[key], **value}
            elif root(key) in earlier:
                raise ValueError(f"two overlay parts set {root(key)!r}: give it to one part")
            else:
                joined[key] = value
    return joined


def compose(configs_dir: str | os.PathLike, sources: Sequence[str]) -> dict:
    """The config that ``sources`` (relative to ``configs_dir``) make: MONAI's merge of the list, in order.

    Starting with ``train.json``, this is exactly ``ConfigParser.load_config_files`` of the
    files; an overlay (no ``train.json``) is :func:`join_overlays` of its parts.
    """
    from monai.bundle import ConfigParser

    if sources[0] == TRAIN:
        return ConfigParser.load_config_files([os.path.join(configs_dir, name) for name in sources])
    return join_overlays([_read(configs_dir, name) for name in sources])


def render(config: dict) -> str:
    """A config as the bundle's files are written (4-space JSON, one trailing newline)."""
    return json.dumps(config, indent=4, ensure_ascii=False) + "\n"


def _outdated(configs_dir: str | os.PathLike, sources: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """The generated configs that are missing or differ from what their sources make, each with that text."""
    found = {}
    for name, files in sorted(sources.items()):
        path = os.path.join(configs_dir, name)
        current = open(path).read() if os.path.isfile(path) else None
        text = render(compose(configs_dir, files))
        if current != text:
            found[name] = text
    return found


def stale(configs_dir: str | os.PathLike, sources: Mapping[str, Sequence[str]]) -> list[str]:
    """Generated configs that are missing or differ from what their sources make (names, sorted)."""
    return list(_outdated(configs_dir, sources))


def write(configs_dir: str | os.PathLike, sources: Mapping[str, Sequence[str]]) -> list[str]:
    """Write every generated config from its sources; the names of those that changed."""
    changed = _outdated(configs_dir, sources)
    for name, text in changed.items():
        with open(os.path.join(configs_dir, name), "w") as handle:
            handle.write(text)
    return list(changed)
