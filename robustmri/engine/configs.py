"""Bundle config files that extend another: ``"_base_": "train.json"``.

MONAI composes bundle configs by listing files (``--config_file "['configs/train.json',
'configs/isp.json']"``): later files override earlier ones id by id, ``"+id"`` appends to a
list or dict, and ``"a#b"`` keys override nested ids (``monai.bundle.utils.merge_kv``). That
is how the model zoo ships ``evaluate.json`` and ``multi_gpu_train.json``. MONAI 1.6 has no
way for one file to name the file it extends, so a method config run on its own
(``--config_file configs/isp.json``, the user's command) would have to copy ``train.json``:
macros (``"%configs/train.json#train"``) copy it at parse time, after command-line overrides
are applied, which is why nested overrides, overlays, tracking and ``--bundle_root`` from
another folder all failed with them.

This module adds that one missing piece and nothing else. A config file may hold
``"_base_"``: a file name (or a list of them), relative to the file itself. Loading the file
loads its bases first (recursively) and merges the file on top with MONAI's own merge rule,
so ``configs/isp.json`` alone is exactly ``['configs/train.json', 'configs/influence.json',
'configs/isp.json']``, and everything MONAI does with a list of files (overrides, overlays,
tracking, ``check_properties``, ``ckpt_export``) works on it.

It is applied by wrapping ``monai.bundle.ConfigParser.load_config_file``: :func:`install`
does it at once if MONAI's config parser is already imported, else when it is first
imported (an import hook). The package installs a one-line ``.pth`` file that calls
:func:`install` when Python starts, so ``python -m monai.bundle ...`` understands ``_base_``;
nothing is imported until MONAI is. Set ``ROBUSTMRI_NO_BASE_CONFIGS=1`` to switch it off;
the list form then still works with stock MONAI.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from typing import Any

#: The key a config file names its base(s) with.
BASE_KEY = "_base_"
#: Environment variable that switches the hook off.
DISABLE_ENV = "ROBUSTMRI_NO_BASE_CONFIGS"
_TARGET = "monai.bundle.config_parser"
_PATCHED = "_robustmri_base_configs"


class BaseConfigError(ValueError):
    """A ``_base_`` entry that names no file, or bases that include each other."""


def expand(load, filepath, stack: tuple[str, ...] = (), **kwargs) -> Any:
    """The content of ``filepath`` with its ``_base_`` files merged underneath.

    ``load`` reads one file (MONAI's original ``load_config_file``). The result means what the
    list ``[base files..., file]`` means: bases in order, then the file, merged with
    :func:`monai.bundle.utils.merge_kv`. Where a file and its bases are a whole config
    (``isp.json``: ``train.json``, ``influence.json``) that is one merged dictionary. An overlay
    may also name a base overlay (``evaluate.json``: ``trained_model.json``); the ids that only
    make sense on top of another config (``"+imports"``, ``"validate#dataset#data"`` when nothing
    here defines ``imports`` or ``validate``) are then returned after the merged ones, in order,
    so MONAI applies them to whatever the file is merged onto, as it would for the list.
    """
    content = load(filepath, **kwargs)
    if not isinstance(content, dict) or BASE_KEY not in content:
        return content
    path = os.path.abspath(os.fspath(filepath))
    if path in stack:
        raise BaseConfigError(f"{filepath}: {BASE_KEY} files include each other: "
                              f"{' -> '.join(map(os.path.basename, (*stack, path)))}")
    bases = content.pop(BASE_KEY)
    bases = [bases] if isinstance(bases, str) else list(bases or [])
    pairs = []
    for base in bases:
        base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        if not os.path.isfile(base_path):
            raise BaseConfigError(f"{filepath}: {BASE_KEY} names {base!r}, but {base_path} is not a file")
        pairs += expand(load, base_path, (*stack, path), **kwargs).items()
    return _fold(pairs + list(content.items()))


def _fold(pairs: list[tuple[str, Any]]) -> dict:
    """Apply ``pairs`` in order to an empty config; keep, in order, those that need a config underneath."""
    from monai.bundle.reference_resolver import ReferenceResolver
    from monai.bundle.utils import MERGE_KEY, merge_kv

    def root(key: str) -> str:
        return ReferenceResolver.split_id(ReferenceResolver.normalize_id(key.removeprefix(MERGE_KEY)))[0]

    merged, deferred = _empty_parser(), []
    for key, value in pairs:
        target = key.removeprefix(MERGE_KEY)
        if root(key) in merged.get():
            merge_kv(merged, key, value)
        elif key.startswith(MERGE_KEY) or root(key) != ReferenceResolver.normalize_id(target):
            deferred.append((key, value))  # "+id" or "a#b" onto an id this file and its bases do not define
        else:
            merge_kv(merged, key, value)
            deferred = [(k, v) for k, v in deferred if root(k) != key]  # a plain id replaces earlier edits of it
    folded = dict(merged.get())
    for key, value in deferred:  # several "+id" of one id append in turn; a repeated "a#b" keeps the last
        if key.startswith(MERGE_KEY) and key in folded:
            folded[key] = ({**folded[key], **value} if isinstance(value, dict) else [*folded[key], *value])
        else:
            folded.pop(key, None)
            folded[key] = value
    return folded


def _empty_parser():
    from monai.bundle.config_parser import ConfigParser

    return ConfigParser(config={})


def patch(config_parser_class) -> None:
    """Make ``config_parser_class.load_config_file`` expand ``_base_`` (idempotent)."""
    if getattr(config_parser_class, _PATCHED, False):
        return
    original = config_parser_class.load_config_file.__func__

    def load_config_file(cls, filepath, **kwargs):
        return expand(lambda path, **kw: original(cls, path, **kw), filepath, **kwargs)

    load_config_file.__doc__ = original.__doc__
    config_parser_class.load_config_file = classmethod(load_config_file)
    setattr(config_parser_class, _PATCHED, True)


class _PatchWhenImported(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of MONAI's config parser so it is patched once executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)  # one module to watch; let the regular finders find it
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader)
        return spec


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        patch(module.ConfigParser)


def install() -> None:
    """Teach MONAI's config loader ``_base_``: now if it is imported, else when it is."""
    if os.environ.get(DISABLE_ENV, "").strip() not in ("", "0"):
        return
    module = sys.modules.get(_TARGET)
    if module is not None and hasattr(module, "ConfigParser"):
        patch(module.ConfigParser)
    elif not any(isinstance(finder, _PatchWhenImported) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchWhenImported())
