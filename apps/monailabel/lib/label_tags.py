"""Label tags: the names of the folders under ``labels/`` that a request may name.

MONAI Label joins a request's tag to the labels folder, so ``../../x`` or an absolute tag would
write anywhere: a tag is ``final``, ``original`` or another plain name, and nothing else.
"""

from __future__ import annotations

import re

#: A label tag: ``final``, ``original`` or another plain name (a folder name under ``labels/``).
LABEL_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
LABEL_TAG_RULE = "'final', 'original' or a plain name (letters, digits, '_' and '-', at most 64)"


def valid_label_tag(tag) -> bool:
    return isinstance(tag, str) and LABEL_TAG.fullmatch(tag) is not None
