"""The files the library writes: JSON reports and PNG figures (matplotlib's Agg backend, no screen).

Every JSON report and every figure goes through :func:`write_json` and :func:`save_figure`,
so output folders are created in one place and figures are laid out and closed alike.
"""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plt", "read_json", "save_figure", "write_json"]


def write_json(path: str | os.PathLike, payload, indent: int | None = 2) -> str:
    """Write ``payload`` as JSON to ``path`` (its folder created if needed); return the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=indent)
    return path


def read_json(path: str | os.PathLike, missing=None):
    """The JSON content of ``path``; ``missing`` (when not None) if there is no such file."""
    if missing is not None and not os.path.isfile(path):
        return missing
    with open(path) as handle:
        return json.load(handle)


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> None:
    """Tight layout, save as PNG (folder created if needed) and close the figure."""
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
