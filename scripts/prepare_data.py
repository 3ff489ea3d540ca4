"""Data preparation from the command line.

    python scripts/prepare_data.py synthetic --out /data/synthetic --patients 300 --size 256
    python scripts/prepare_data.py from_mat --src /data/figshare_mat --out /data/figshare_png
    python scripts/prepare_data.py summary --dataset_dir /data/figshare_png

Every command writes or prints counts only: patient ids never leave the library.
"""

from __future__ import annotations

import csv
import json
import os

import fire
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from robustmri import CLASS_NAMES
from robustmri.data.catalog import scan_dataset
from robustmri.data.readers import read_figshare_mat
from robustmri.data.splits import grouped_stratified_split
from robustmri.data.synthetic import generate_slices


def _write_labels_csv(out: str, rows: list[tuple[str, str, int]]) -> str:
    path = os.path.join(out, "labels.csv")
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label_name", "group"])
        writer.writerows(rows)
    return path


def synthetic(out: str, patients: int = 300, size: int = 256, seed: int = 0) -> None:
    """Write the embedded synthetic set as class folders of PNG files plus labels.csv."""
    data = generate_slices(n_patients=patients, size=size, seed=seed)
    rows = []
    for index, (image, label, group) in enumerate(tqdm(zip(data["images"], data["labels"], data["groups"]),
                                                       total=len(data["labels"]), desc="writing", unit="img")):
        name = CLASS_NAMES[int(label)]
        relative = f"{name}/{index:05d}.png"
        os.makedirs(os.path.join(out, name), exist_ok=True)
        Image.fromarray(np.round(image * 255).astype(np.uint8)).save(os.path.join(out, relative))
        rows.append((relative, name, int(group)))
    path = _write_labels_csv(out, rows)
    print(f"wrote {len(rows)} slices of {patients} pseudo-patients to {out} ({path})")


def from_mat(src: str, out: str, on_error: str = "skip") -> None:
    """Convert the figshare .mat release into class folders (16-bit PNG) and labels.csv.

    Patient ids become anonymous group numbers; unreadable files are skipped and counted.
    """
    catalog = scan_dataset(src, on_error=on_error)
    rows = []
    for record in tqdm(catalog.records, desc="converting", unit="slice"):
        item = read_figshare_mat(record.file)
        name = catalog.class_names[record.label]
        relative = f"{name}/{os.path.splitext(os.path.basename(record.file))[0]}.png"
        os.makedirs(os.path.join(out, name), exist_ok=True)
        pixels = np.clip(item.image, 0, 65535).astype(np.uint16)
        Image.fromarray(pixels).save(os.path.join(out, relative))
        rows.append((relative, name, record.group))
    path = _write_labels_csv(out, rows)
    print(f"converted {len(rows)} slices, skipped {len(catalog.skipped)} -> {path}")


def summary(dataset_dir: str, seed: int = 0, on_error: str = "skip") -> None:
    """Counts per class and per split (patient-grouped, as training would split it)."""
    catalog = scan_dataset(dataset_dir, on_error=on_error)
    labels = np.array([r.label for r in catalog.records])
    groups = np.array([r.group for r in catalog.records])
    splits = grouped_stratified_split(labels, groups, seed=seed)
    report = {
        "images": len(catalog),
        "groups": int(len(np.unique(groups))),
        "grouped_by_patient": catalog.grouped_by_patient,
        "skipped": [{"file": f, "reason": r} for f, r in catalog.skipped],
        "classes": {name: int((labels == k).sum()) for k, name in enumerate(catalog.class_names)},
        "splits": {name: {"images": int(len(idx)), "groups": int(len(np.unique(groups[idx])))}
                   for name, idx in splits.items()},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    fire.Fire({"synthetic": synthetic, "from_mat": from_mat, "summary": summary})
