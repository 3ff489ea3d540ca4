"""Can a tumour-presence signal be learnt from a data set's tumour boxes? A measurement, not a product feature.

The product classifies the tumour type of a slice known to contain a tumour (:data:`robustmri.INTENDED_USE`); it does
not detect tumours, and its abstention score measures familiarity, which a tumour-free slice of the same contrast
has (:mod:`robustmri.bench.tumour_free`). A slice data set whose every slice holds a tumour can still teach where a
tumour is *not*: the parts of each slice away from its tumour box. This measures how far that goes.

- **Data.** Every slice of a folder whose ``labels.csv`` gives the tumour's box (:data:`BOX_COLUMNS`, relative to
  the slice's width and height, as the figshare set's file does), prepared by the product's ``head`` preprocessing
  at ``size`` pixels, clean (no protocol noise). The box is mapped into the network's input through the head crop
  (:func:`box_in_input`); the input is cut into ``grid`` x ``grid`` cells, and a cell is *tumour* when at least half
  of it lies in the box, *tumour-free* when none of it does, and left out of the loss otherwise (:func:`cell_targets`).
- **Detector.** :class:`PresenceNet`, a small fully convolutional network with one logit per cell, trained from
  scratch on the training split (patient-grouped, the protocol's fractions, split seed = run seed) with binary
  cross-entropy balanced between the two kinds of cell, random left-right flips, AdamW. A slice's presence score is
  its highest cell logit; higher = more likely to hold a tumour (the one sign convention here).
- **Threshold.** The score quantile that calls ``sensitivity`` of the *validation* tumour slices tumour-bearing; the
  test split is never used to choose it.
- **Measures** (:func:`measure_presence`), per seed: cell AUROC on validation and test; the share of test tumour
  slices called tumour-bearing; the share of test slices whose tumour-free cells alone (more than one cell away from
  any cell that touches the box) would call them tumour-bearing, an in-contrast proxy for a tumour-free slice that
  sees fewer cells than a whole one; and, for each tumour-free set of :func:`robustmri.bench.tumour_free.tumour_free_sets`,
  the share called tumour-bearing: the share a presence gate would let through to be given a type.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from robustmri.progress import progress

#: The columns of ``labels.csv`` that hold a slice's tumour box: centre and size, relative to width and height.
BOX_COLUMNS = ("box_x_center", "box_y_center", "box_width", "box_height")
#: A cell is a tumour cell when at least this share of it lies in the box (a cell with none is tumour-free).
POSITIVE_FRACTION = 0.5
#: Share of the validation tumour slices the threshold calls tumour-bearing.
SENSITIVITY = 0.95


def read_boxes(dataset_dir: str | os.PathLike) -> dict[str, tuple[float, float, float, float]]:
    """``{absolute file path: (x centre, y centre, width, height)}`` from the folder's ``labels.csv``.

    Raises ``ValueError`` naming the problem when the file or its box columns are missing, or when a box is not a
    finite box inside the unit square."""
    root = os.fspath(dataset_dir)
    path = os.path.join(root, "labels.csv")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: not found; the presence measurement needs labels.csv with tumour boxes")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [name for name in ("file", *BOX_COLUMNS) if name not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path}: no column {', '.join(missing)}; the presence measurement needs the tumour "
                             f"boxes ({', '.join(BOX_COLUMNS)}, relative to the slice's width and height)")
        boxes = {}
        for line, row in enumerate(reader, start=2):
            try:
                box = tuple(float(row[name]) for name in BOX_COLUMNS)
            except (TypeError, ValueError):
                raise ValueError(f"{path} line {line}: the box {[row[name] for name in BOX_COLUMNS]} is not numbers")
            cx, cy, width, height = box
            if not (all(map(math.isfinite, box)) and width > 0 and height > 0
                    and 0 <= cx - width / 2 + 1e-6 and cx + width / 2 - 1e-6 <= 1
                    and 0 <= cy - height / 2 + 1e-6 and cy + height / 2 - 1e-6 <= 1):
                raise ValueError(f"{path} line {line}: the box {box} does not lie inside the slice")
            boxes[os.path.join(root, row["file"])] = box
    return boxes


def box_in_input(box: Sequence[float], shape: tuple[int, int], window: tuple[int, int, int], size: int) -> np.ndarray:
    """The box as a bool mask of the ``size`` x ``size`` network input.

    ``box``: ``(x centre, y centre, width, height)`` relative to the raw slice of ``shape`` (rows, columns);
    ``window``: ``(top, left, side)`` of the square the preprocessing cropped and resized
    (:func:`robustmri.data.preprocessing.head_window`). An input pixel belongs to the box when its centre does.
    """
    rows, cols = shape
    cx, cy, width, height = (float(v) for v in box)
    top, left, side = window
    centres = (np.arange(size) + 0.5) * side / size
    y, x = top + centres, left + centres
    inside_y = (y >= (cy - height / 2) * rows) & (y <= (cy + height / 2) * rows)
    inside_x = (x >= (cx - width / 2) * cols) & (x <= (cx + width / 2) * cols)
    return inside_y[:, None] & inside_x[None, :]


def cell_fractions(masks: np.ndarray, grid: int) -> np.ndarray:
    """``[N, grid, grid]`` share of each cell covered by the ``[N, size, size]`` masks (``size`` a multiple of grid)."""
    masks = np.asarray(masks, dtype=np.float32)
    n, size = masks.shape[0], masks.shape[-1]
    if masks.shape[1:] != (size, size) or size % grid:
        raise ValueError(f"masks must be [N, size, size] with size a multiple of grid {grid}, got {masks.shape}")
    step = size // grid
    return masks.reshape(n, grid, step, grid, step).mean(axis=(2, 4))


def cell_targets(fractions: np.ndarray, positive: float = POSITIVE_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """``(target, weight)``: target 1 for a cell at least ``positive`` in the box; weight 1 for those and for cells
    with no part in it, 0 for the cells between (left out of the loss and of the AUROC)."""
    fractions = np.asarray(fractions, dtype=np.float32)
    target = fractions >= positive
    return target.astype(np.float32), (target | (fractions == 0)).astype(np.float32)


def far_from_box(fractions: np.ndarray) -> np.ndarray:
    """``[N, grid, grid]`` bool: the cells more than one cell (in any of the 8 directions) from every cell the box
    touches."""
    from scipy.ndimage import binary_dilation

    touched = np.asarray(fractions) > 0
    near = np.stack([binary_dilation(t, structure=np.ones((3, 3), bool)) for t in touched]) if len(touched) else touched
    return ~near


class PresenceNet(nn.Module):
    """[conv 5x5, BatchNorm, ReLU, max-pool 2] stages down to ``grid`` x ``grid``, then conv 3x3 + ReLU and a 1x1
    convolution to one logit per cell: ``[N, 1, size, size] -> [N, grid, grid]``."""

    def __init__(self, size: int = 64, grid: int = 4, channels: Sequence[int] = (32, 32, 64, 64, 64)):
        super().__init__()
        ratio = size // grid if grid > 0 else 0
        if ratio < 2 or size % grid or ratio & (ratio - 1):
            raise ValueError(f"size / grid must be a power of two >= 2, got size {size}, grid {grid}")
        depth = int(math.log2(ratio))
        if depth > len(channels):
            raise ValueError(f"{depth} pooling stages needed, only {len(channels)} channel widths given")
        layers, previous = [], 1
        for width in channels[:depth]:
            layers += [nn.Conv2d(previous, width, 5, padding=2), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            previous = width
        self.encoder = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Conv2d(previous, 64, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(64, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))[:, 0]


def train_presence(images: np.ndarray, target: np.ndarray, weight: np.ndarray, grid: int, epochs: int = 12,
                   seed: int = 0, batch_size: int = 32, learning_rate: float = 2e-3) -> PresenceNet:
    """A :class:`PresenceNet` trained on ``images`` ``[N, size, size]`` and their cell targets and weights."""
    if not len(images):
        raise ValueError("no training slices")
    generator = torch.Generator().manual_seed(int(seed))
    torch.manual_seed(int(seed))
    network = PresenceNet(images.shape[-1], grid)
    optimiser = torch.optim.AdamW(network.parameters(), learning_rate, weight_decay=5e-4)
    share = float(target.sum() / max(weight.sum(), 1.0))
    balance = torch.tensor((1 - share) / share if 0 < share < 1 else 1.0)
    loss_of = nn.BCEWithLogitsLoss(reduction="none", pos_weight=balance)
    x_all, t_all, w_all = (torch.as_tensor(np.asarray(a, dtype=np.float32)) for a in (images, target, weight))
    network.train()
    for _ in progress(range(int(epochs)), desc="presence training", unit="epoch"):
        order = torch.randperm(len(x_all), generator=generator)
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            x, t, w = x_all[chosen][:, None], t_all[chosen], w_all[chosen]
            flip = torch.rand(len(chosen), generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            t = torch.where(flip[:, None, None], t.flip(-1), t)
            w = torch.where(flip[:, None, None], w.flip(-1), w)
            loss = (loss_of(network(x), t) * w).sum() / w.sum().clamp_min(1.0)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return network.eval()


@torch.no_grad()
def cell_scores(network: PresenceNet, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """``[N, grid, grid]`` cell logits of ``images`` ``[N, size, size]`` (higher = more likely tumour)."""
    network.eval()
    images = np.asarray(images, dtype=np.float32)
    return np.concatenate([network(torch.as_tensor(images[i:i + batch_size])[:, None]).numpy()
                           for i in range(0, len(images), batch_size)]) if len(images) else np.zeros((0, 1, 1))


def slice_scores(cells: np.ndarray) -> np.ndarray:
    """A slice's presence score: its highest cell logit."""
    return np.asarray(cells).reshape(len(cells), -1).max(axis=1)


def cell_auroc(cells: np.ndarray, target: np.ndarray, weight: np.ndarray) -> float | None:
    """AUROC of the cell logits between tumour and tumour-free cells (cells of weight 0 left out)."""
    from sklearn.metrics import roc_auc_score

    used = np.asarray(weight) > 0
    labels = np.asarray(target)[used]
    if labels.min(initial=1) == labels.max(initial=0):
        return None
    return float(roc_auc_score(labels, np.asarray(cells)[used]))


def prepare_boxed(dataset_dir: str | os.PathLike, size: int) -> dict:
    """The folder's slices as the ``head`` preprocessing prepares them, with their box masks, labels and groups;
    a slice without a box or a head is skipped and counted (``skipped``: ``[(file name, reason)]``)."""
    from robustmri.data.catalog import scan_dataset
    from robustmri.data.preprocessing import head_window, preprocess_head
    from robustmri.data.readers import first_line, read_image

    catalog = scan_dataset(dataset_dir)
    boxes = read_boxes(dataset_dir)
    images, masks, labels, groups, skipped = [], [], [], [], []
    for record in progress(catalog.records, desc="preparing slices", unit="slice"):
        name = os.path.basename(record.file)
        if record.file not in boxes:
            skipped.append((name, "no box in labels.csv"))
            continue
        try:
            raw = np.asarray(read_image(record.file), dtype=np.float32)
            images.append(preprocess_head(raw, size))
            masks.append(box_in_input(boxes[record.file], raw.shape, head_window(raw), size))
        except (ValueError, OSError) as error:  # unreadable, constant or headless: counted, the rest go on
            skipped.append((name, first_line(error)))
            continue
        labels.append(record.label)
        groups.append(record.group)
    if not images:
        raise ValueError(f"{dataset_dir}: no slice could be prepared with its box ({len(skipped)} skipped)")
    return {"images": np.stack(images), "masks": np.stack(masks), "labels": np.asarray(labels),
            "groups": np.asarray(groups), "skipped": skipped, "class_names": list(catalog.class_names)}


def _share(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if len(values) else None


def measure_seed(data: dict, seed: int, grid: int, epochs: int, sensitivity: float,
                 tumour_free: Sequence, split_fractions=(0.75, 0.05, 0.20)) -> dict:
    """One seed's row of :func:`measure_presence` (``tumour_free``: ``[(set name, prepared images)]``)."""
    from robustmri.data.splits import grouped_stratified_split

    split = grouped_stratified_split(data["labels"], data["groups"], split_fractions, seed)
    fractions = cell_fractions(data["masks"], grid)
    target, weight = cell_targets(fractions)
    train = split["train"]
    network = train_presence(data["images"][train], target[train], weight[train], grid, epochs, seed)
    cells = {part: cell_scores(network, data["images"][split[part]]) for part in ("val", "test")}
    threshold = float(np.quantile(slice_scores(cells["val"]), 1.0 - sensitivity))
    test = split["test"]
    far = far_from_box(fractions[test])
    far_scores = np.array([c[m].max() if m.any() else -np.inf for c, m in zip(cells["test"], far)])
    row = {"seed": int(seed), "n_train": int(len(train)), "n_val": int(len(split["val"])), "n_test": int(len(test)),
           "threshold": threshold,
           "cell_auroc_val": cell_auroc(cells["val"], target[split["val"]], weight[split["val"]]),
           "cell_auroc_test": cell_auroc(cells["test"], target[test], weight[test]),
           "test_tumour_slices_called_present": _share(slice_scores(cells["test"]) >= threshold),
           "test_tumour_free_cells_alone_called_present": _share(far_scores[far.any(axis=(1, 2))] >= threshold),
           "tumour_free_cells_per_test_slice": float(far.sum(axis=(1, 2)).mean()),
           "sets": {}}
    for name, images in tumour_free:
        scores = slice_scores(cell_scores(network, images)) if len(images) else np.zeros(0)
        row["sets"][name] = {"n": int(len(images)), "called_present": _share(scores >= threshold)}
    return row


def measure_presence(dataset_dir: str | os.PathLike, size: int = 64, grid: int = 4, epochs: int = 12,
                     seeds: Sequence[int] = (0, 1, 2), sensitivity: float = SENSITIVITY, tumour_free=None) -> dict:
    """The measurement (module docstring) over ``seeds``; ``tumour_free``: the :class:`ImageSet` list (default
    :func:`robustmri.bench.tumour_free.tumour_free_sets`)."""
    from robustmri.bench.tumour_free import prepare_set, tumour_free_sets
    from robustmri.data.preprocessing import preprocess_head

    if not 0 < sensitivity < 1:
        raise ValueError(f"sensitivity must lie in (0, 1), got {sensitivity}")
    data = prepare_boxed(dataset_dir, size)
    prepared = []
    for image_set in (tumour_free_sets() if tumour_free is None else tumour_free):
        # a slice with no head gets no class in any path, so it is not counted here
        images, _ = prepare_set(lambda image: preprocess_head(np.asarray(image, dtype=np.float32), size), image_set)
        prepared.append((image_set.name, np.stack(images) if images else np.zeros((0, size, size), np.float32)))
    rows = [measure_seed(data, int(seed), grid, epochs, sensitivity, prepared) for seed in seeds]
    return {"settings": {"size": size, "grid": grid, "epochs": epochs, "sensitivity": sensitivity,
                         "positive_fraction": POSITIVE_FRACTION, "preprocess": "head", "seeds": [int(s) for s in seeds]},
            "n_slices": int(len(data["images"])), "skipped": len(data["skipped"]),
            "skipped_examples": data["skipped"][:5], "rows": rows}


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def markdown(report: dict) -> str:
    """One row per seed and the mean over seeds."""
    rows = report["rows"]
    names = list(rows[0]["sets"]) if rows else []
    head = (["seed", "cell AUROC (val / test)", "test tumour slices called tumour-bearing",
             "test slices' tumour-free cells alone called tumour-bearing"]
            + [f"{name} called tumour-bearing" for name in names])
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]

    def line(label, row):
        auroc = " / ".join("n/a" if row[k] is None else f"{row[k]:.3f}" for k in ("cell_auroc_val", "cell_auroc_test"))
        cells = [label, auroc, _pct(row["test_tumour_slices_called_present"]),
                 _pct(row["test_tumour_free_cells_alone_called_present"])]
        return "| " + " | ".join(cells + [_pct(row["sets"][name]["called_present"]) for name in names]) + " |"

    for row in rows:
        lines.append(line(str(row["seed"]), row))
    if len(rows) > 1:
        def mean(values):
            values = [v for v in values if v is not None]
            return float(np.mean(values)) if values else None
        keys = ("cell_auroc_val", "cell_auroc_test", "test_tumour_slices_called_present",
                "test_tumour_free_cells_alone_called_present")
        average = {key: mean([row[key] for row in rows]) for key in keys}
        average["sets"] = {name: {"called_present": mean([row["sets"][name]["called_present"] for row in rows])}
                           for name in names}
        lines.append(line("mean", average))
    settings = report["settings"]
    lines.append("")
    lines.append(f"{report['n_slices']} boxed slices ({report['skipped']} skipped), {settings['size']} px head "
                 f"preprocessing, {settings['grid']} x {settings['grid']} cells, {settings['epochs']} epochs; threshold "
                 f"at {100 * settings['sensitivity']:g} % of the validation tumour slices.")
    return "\n".join(lines) + "\n"
