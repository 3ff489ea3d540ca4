"""Plain option values as they arrive from a bundle's command line or a config file."""

from __future__ import annotations


def as_flag(value, name: str) -> bool:
    """A yes/no option; a bundle's command line passes ``--flag false`` as the text 'false', which is truthy.

    ``ValueError`` naming the option for anything that is not a yes or a no.
    """
    if isinstance(value, bool) or type(value).__name__ == "bool_" or value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "yes", "1"):
        return True
    if text in ("false", "no", "0", "none", ""):
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}")
