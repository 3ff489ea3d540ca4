"""The files the library writes: JSON reports and PNG figures (matplotlib's Agg backend, no screen).

Every JSON report and every figure goes through :func:`write_json` and :func:`save_figure`,
so output folders are created in one place and figures are laid out and closed alike.
"""

from __future__ import annotations

import json
import os
import threading

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["image_grid", "plt", "read_json", "save_figure", "write_json"]


def write_json(path: str | os.PathLike, payload, indent: int | None = 2) -> str:
    """Write ``payload`` as JSON to ``path`` (its folder created if needed) atomically: written beside it, then
    renamed, so a process killed while writing never leaves a torn file; return the path.

    The temporary name is the writer's own (process and thread), so two writers of one file (ranks
    of a torchrun job, two runs) never write into each other's; the last rename wins whole.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = f"{path}.{os.getpid()}.{threading.get_ident()}.partial"
    try:
        with open(partial, "w") as handle:
            json.dump(payload, handle, indent=indent)
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise
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


def image_grid(images, titles, path: str | os.PathLike, ncols: int, suptitle: str, vmin: float, vmax: float,
               title_fontsize: float = 10, panel_size: tuple[float, float] = (3.0, 3.2)) -> str:
    """Grey-scale images side by side, ``ncols`` a row, one display window (``vmin`` to ``vmax``) for all,
    each with its title; written by :func:`save_figure`. Returns the path."""
    images, titles = list(images), list(titles)
    nrows = max(1, -(-len(images) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_size[0] * ncols, panel_size[1] * nrows), squeeze=False)
    for axis, image, title in zip(axes.ravel(), images, titles):
        axis.imshow(image, cmap="gray", vmin=vmin, vmax=vmax)
        axis.set_title(title, fontsize=title_fontsize)
    for axis in axes.ravel():
        axis.set_axis_off()
    fig.suptitle(suptitle)
    save_figure(fig, path)
    return os.fspath(path)
