"""Let pydicom-seg 0.4.1 (imported by monailabel 0.8.5 at start-up) import under pydicom 3.

pydicom 3 removed the private module ``pydicom._storage_sopclass_uids`` (deprecated since 2.3;
its UIDs live in ``pydicom.uid``); pydicom-seg 0.4.1, the latest release, still imports it
(Project-MONAI/MONAILabel#1841, razorx89/pydicom-seg#60). This finder serves that one name as
``pydicom.uid`` when, and only when, something imports it, so nothing else is touched and
interpreter start-up stays as fast as before. Installed next to ``robustmri_pydicom3_compat.pth``
by ``make`` (see apps/monailabel/README.md).
"""

import importlib
import importlib.abc
import importlib.util
import sys

_ALIASED = "pydicom._storage_sopclass_uids"
_TARGET = "pydicom.uid"


class _AliasLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return importlib.import_module(_TARGET)

    def exec_module(self, module):
        pass


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != _ALIASED:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader())


def install() -> None:
    """Idempotent: add the finder once, after the regular ones (a real module would win)."""
    if not any(isinstance(finder, _AliasFinder) for finder in sys.meta_path):
        sys.meta_path.append(_AliasFinder())


install()
