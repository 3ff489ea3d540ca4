"""Find the labelled images of a data set folder.

Three layouts are understood, checked in this order:

1. ``labels.csv`` at the root with columns ``file``, ``label_name`` and optionally
   ``group`` (patient or pseudo-patient id): the layout of the shared figshare copy;
2. one sub-folder per class (``meningioma/``, ``glioma/``, ``pituitary/``);
3. the original figshare release: ``*.mat`` files (MATLAB v7.3) carrying label and PID.

Patient ids are replaced by anonymous integers at once: nothing downstream can log them.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field

from robustmri import CLASS_NAMES
from robustmri.data.readers import MAT_SUFFIXES, ImageReadError, has_image_suffix, read_figshare_mat

logger = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip")


class DatasetError(ValueError):
    """The data set as a whole cannot be used (empty folder, bad labels.csv, ...)."""


@dataclass
class Record:
    file: str  # absolute path
    label: int
    group: int  # anonymous patient index


@dataclass
class Catalog:
    root: str
    class_names: tuple[str, ...]
    records: list[Record]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    grouped_by_patient: bool = True

    def __len__(self) -> int:
        return len(self.records)


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")


def handle_bad_item(path: str, reason: str, on_error: str, skipped: list) -> None:
    """Raise for ``on_error='raise'``; otherwise record the skip so it is reported."""
    if on_error == "raise":
        raise ImageReadError(path, reason)
    skipped.append((path, reason))


def scan_dataset(root: str | os.PathLike, class_names=CLASS_NAMES, on_error: str = "raise") -> Catalog:
    """Catalogue the labelled images under ``root`` (see the module docstring)."""
    check_on_error(on_error)
    root = os.path.abspath(os.fspath(root))
    class_names = tuple(class_names)
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: data set folder not found")
    if os.path.isfile(os.path.join(root, "labels.csv")):
        catalog = _scan_labels_csv(root, class_names, on_error)
    elif any(os.path.isdir(os.path.join(root, name)) for name in class_names):
        catalog = _scan_class_folders(root, class_names, on_error)
    elif any(name.lower().endswith(MAT_SUFFIXES) for name in os.listdir(root)):
        catalog = _scan_figshare_mat(root, class_names, on_error)
    else:
        raise DatasetError(
            f"{root}: no labels.csv, no class folders ({', '.join(class_names)}) and no .mat files found"
        )
    if not catalog.records:
        raise DatasetError(f"{root}: no usable images found ({len(catalog.skipped)} skipped)")
    for path, reason in catalog.skipped:
        logger.warning("skipped %s: %s", path, reason)
    if not catalog.grouped_by_patient:
        logger.warning("%s: no patient groups given; each image is its own group, so slices of one "
                       "patient may cross splits. Add a 'group' column to labels.csv.", root)
    return catalog


def _label_index(name: str, class_names: tuple[str, ...]) -> int | None:
    name = name.strip().lower()
    return class_names.index(name) if name in class_names else None


class _Anonymiser:
    """Maps patient ids to 0, 1, 2, ... in order of first appearance."""

    def __init__(self):
        self._ids: dict[str, int] = {}

    def __call__(self, patient_id: str) -> int:
        return self._ids.setdefault(patient_id, len(self._ids))


def _scan_labels_csv(root: str, class_names, on_error: str) -> Catalog:
    csv_path = os.path.join(root, "labels.csv")
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or ())
        if not {"file", "label_name"} <= columns:
            raise DatasetError(f"{csv_path}: needs columns 'file' and 'label_name', found {sorted(columns)}")
        rows = list(reader)
    grouped = "group" in columns
    anonymise = _Anonymiser()
    records, skipped = [], []
    for line, row in enumerate(rows, start=2):
        path = os.path.join(root, row["file"])
        label = _label_index(row["label_name"] or "", class_names)
        if label is None:
            handle_bad_item(path, f"labels.csv line {line}: unknown class {row['label_name']!r} "
                                  f"(expected one of {', '.join(class_names)})", on_error, skipped)
            continue
        if not os.path.isfile(path):
            handle_bad_item(path, f"labels.csv line {line}: file not found", on_error, skipped)
            continue
        group_key = row["group"] if grouped and row.get("group") not in (None, "") else f"file:{row['file']}"
        records.append(Record(path, label, anonymise(group_key)))
    return Catalog(root, class_names, records, skipped, grouped_by_patient=grouped)


def _scan_class_folders(root: str, class_names, on_error: str) -> Catalog:
    records, skipped = [], []
    unknown = sorted(
        name for name in os.listdir(root)
        if os.path.isdir(os.path.join(root, name)) and not name.startswith(".") and name.lower() not in class_names
    )
    for name in unknown:
        handle_bad_item(os.path.join(root, name), f"folder is not a known class ({', '.join(class_names)})",
                        on_error, skipped)
    anonymise = _Anonymiser()
    for label, name in enumerate(class_names):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            continue
        for entry in sorted(os.listdir(folder)):
            path = os.path.join(folder, entry)
            if entry.startswith(".") or not os.path.isfile(path):
                continue
            if not has_image_suffix(path):
                handle_bad_item(path, "not an image file (unknown suffix)", on_error, skipped)
                continue
            records.append(Record(path, label, anonymise(path)))
    return Catalog(root, class_names, records, skipped, grouped_by_patient=False)


def _scan_figshare_mat(root: str, class_names, on_error: str) -> Catalog:
    records, skipped = [], []
    anonymise = _Anonymiser()
    names = sorted((n for n in os.listdir(root) if n.lower().endswith(MAT_SUFFIXES)), key=_natural_key)
    for name in names:
        path = os.path.join(root, name)
        try:
            item = read_figshare_mat(path, with_pixels=False)
        except ImageReadError as err:
            handle_bad_item(path, err.reason, on_error, skipped)
            continue
        label = _label_index(item.label_name, class_names)
        if label is None:
            handle_bad_item(path, f"class {item.label_name!r} not among {class_names}", on_error, skipped)
            continue
        records.append(Record(path, label, anonymise(item.patient_id or f"file:{name}")))
    grouped = bool(records)
    return Catalog(root, class_names, records, skipped, grouped_by_patient=grouped)


def _natural_key(name: str):
    stem = name.split(".")[0]
    return (0, int(stem), name) if stem.isdigit() else (1, 0, name)
