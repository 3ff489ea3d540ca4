"""The files the library writes: JSON reports and PNG figures (matplotlib's Agg backend, no screen).

Every JSON report and every figure goes through :func:`write_json` and :func:`save_figure`, and
every other output file through :func:`write_bytes` (all by :func:`write_atomic`: a unique
temporary file in the same folder, flushed, synced and renamed), so output folders are created in
one place, no final name ever holds a torn file, and figures are laid out and closed alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import BinaryIO, Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["image_grid", "locked", "plt", "read_json", "save_figure", "write_atomic", "write_bytes", "write_json"]

#: Suffix of the temporary files of :func:`write_atomic` (each also has a unique random part).
PARTIAL_SUFFIX = ".partial"
#: Permissions of a written file before the umask (what ``open(path, "w")`` gives).
FILE_MODE = 0o666


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> str:
    """Write a file so that its final name only ever holds a whole file; return the path.

    ``write(handle)`` writes the content to a binary handle open on a temporary file of the same
    folder whose name is unique to this writer (:func:`tempfile.mkstemp`), so two writers of one
    name (two runs, ranks of a torchrun job, threads) never write into each other's file. The file
    is flushed and ``os.fsync``-ed before ``os.replace`` renames it over ``path``: a crash, a kill
    or a full disk leaves the previous file or the new one, never a torn one, and the last rename
    wins whole. On any failure the temporary file is removed and the error raised.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=PARTIAL_SUFFIX, dir=folder)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, FILE_MODE & ~_UMASK)  # mkstemp makes it 0600; outputs are shared like any file
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
    return path


@contextlib.contextmanager
def locked(path: str | os.PathLike):
    """Hold an exclusive lock on ``<path>.lock`` (``fcntl.flock``, blocking) for the ``with`` block.

    For a file that two runs may both find missing and both compute (an abstention state fitted on
    first use): the second waits, then finds the first's file whole (:func:`write_atomic`) instead of
    computing it again. The lock is released when the block ends or the process dies; the empty lock
    file stays.
    """
    import fcntl

    lock_file = f"{os.fspath(path)}.lock"
    os.makedirs(os.path.dirname(os.path.abspath(lock_file)), exist_ok=True)
    with open(lock_file, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def write_bytes(path: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically (:func:`write_atomic`); return the path."""
    return write_atomic(path, lambda handle: handle.write(data))


def write_json(path: str | os.PathLike, payload, indent: int | None = 2) -> str:
    """Write ``payload`` as JSON to ``path`` (its folder created if needed) atomically (:func:`write_atomic`);
    return the path. The payload is serialised before anything is written, so an unserialisable
    payload leaves no file either."""
    text = json.dumps(payload, indent=indent)
    return write_bytes(path, text.encode("utf-8"))


def _read_umask() -> int:
    """The process's umask, read once at import: reading sets it, which another thread could race with."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def read_json(path: str | os.PathLike, missing=None):
    """The JSON content of ``path``; ``missing`` (when not None) if there is no such file."""
    if missing is not None and not os.path.isfile(path):
        return missing
    with open(path) as handle:
        return json.load(handle)


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> None:
    """Tight layout, save (PNG unless the name says another format) atomically (:func:`write_atomic`, folder created if needed) and close the figure."""
    fig.tight_layout()
    try:
        kind = os.path.splitext(os.fspath(path))[1].lstrip(".").lower() or "png"  # as savefig reads a name
        write_atomic(path, lambda handle: fig.savefig(handle, dpi=dpi, format=kind))
    finally:
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
