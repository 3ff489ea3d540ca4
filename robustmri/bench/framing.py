"""How a trained model's accuracy depends on framing: zoom and position of the prepared slice, and a cut skull.

The honest shift bench's ``skull_cut`` (a random window of 0.6 of the frame) brings every configuration to about
chance. This measurement separates what such a window does to the network's input: the test split prepared as
the model prepares it, then (a) zoomed about its centre by a factor (the central ``1 / zoom`` of the prepared
slice resized to the whole input, as the augmentation's ``scale`` does), (b) moved by a share of its side in a
direction drawn per slice, the same for every share (background fills what it leaves), and (c) rendered as the
bench's ``skull_cut`` (the window taken from the raw slice, then the model's own preprocessing). (a) and (b) act on the prepared input, so
the preprocessing cannot undo them; (c) is what a site's small field of view would give.

Every variant is deterministic: the direction of (b) is drawn from ``[slice id, 1]``, the window of (c) is the
bench's own (``robustmri.data.shift_families``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from robustmri.bench.shifts import _raw, _render
from robustmri.data.preprocessing import head_mask, preprocessing_by_name, resize
from robustmri.data.readers import ImageReadError
from robustmri.data.shift_families import family_shifts, render_family_shift
from robustmri.engine.predictions import predict_items
from robustmri.progress import map_in_processes

#: Zoom factors of (a): 1.15 is the edge of the default augmentation's ``scale``; 1.67 is ``skull_cut``'s.
ZOOMS = (1.0, 1.15, 1.3, 1.5, 1.67)
#: Shifts of (b), shares of the side.
MOVES = (0.05, 0.1, 0.2)
#: The bench's cut-skull shift.
SKULL_CUT = "skull_cut"


def centred_zoom(image: np.ndarray, zoom: float) -> np.ndarray:
    """The central ``1 / zoom`` of a square prepared slice resized back to its size (``zoom`` >= 1)."""
    if zoom < 1:
        raise ValueError(f"zoom must be >= 1, got {zoom!r}")
    size = image.shape[0]
    kept = max(1, int(round(size / zoom)))
    start = (size - kept) // 2
    return resize(image[start:start + kept, start:start + kept], size)


def direction(item_id: int) -> float:
    """The direction (radians) in which slice ``item_id`` is moved: uniform, drawn from ``[item_id, 1]``."""
    return float(np.random.default_rng([int(item_id), 1]).uniform(0.0, 2.0 * math.pi))


def moved(image: np.ndarray, share: float, angle: float) -> np.ndarray:
    """``image`` moved by ``share`` of its side in the direction ``angle`` (radians; 0 is to the right, pi / 2
    down); background (0) fills what it leaves."""
    size = image.shape[0]
    rows, cols = (int(round(share * size * f)) for f in (math.sin(angle), math.cos(angle)))
    out = np.zeros_like(image)
    source = image[max(0, -rows):size - max(0, rows), max(0, -cols):size - max(0, cols)]
    out[max(0, rows):max(0, rows) + source.shape[0], max(0, cols):max(0, cols) + source.shape[1]] = source
    return out


def variant_names() -> list[str]:
    return [f"zoom {z:g}" for z in ZOOMS] + [f"move {m:g}" for m in MOVES] + [SKULL_CUT]


def framing_variants(items: list[dict], size: int, preprocess: str, progress: bool = True, raw_images=None
                     ) -> tuple[dict[str, list[dict]], list[tuple[int, str]]]:
    """``({variant: items}, skipped)``: each test item under every variant of :func:`variant_names`, clean
    (``noisy`` False); its raw slice is read from its ``file``, or taken from ``raw_images`` (indexed by item id:
    the embedded synthetic set, :func:`robustmri.bench.shifts.synthetic_raw_images`). A slice that cannot be read
    or prepared is skipped in every variant, with its id and reason."""
    prepare = preprocessing_by_name(preprocess)
    stream = family_shifts(size)[SKULL_CUT].stream
    sets = {name: [] for name in variant_names()}
    skipped = []
    for item in tqdm(items, desc="framing variants", unit="img", disable=not progress, leave=False):
        try:
            raw = _raw(item, None if raw_images is None else raw_images[int(item["id"])])
            prepared = prepare(raw, size)
            cut = prepare(render_family_shift(raw, SKULL_CUT, size, [int(item["id"]), stream], preprocess), size)
        except (ImageReadError, ValueError, KeyError) as err:
            skipped.append((int(item["id"]), getattr(err, "reason", str(err))))
            continue
        images = {f"zoom {z:g}": centred_zoom(prepared, z) for z in ZOOMS}
        images.update({f"move {m:g}": moved(prepared, m, direction(item["id"])) for m in MOVES})
        images[SKULL_CUT] = cut
        for name, image in images.items():
            sets[name].append({**item, "image": image[None].astype(np.float32), "noisy": False})
    return sets, skipped


def accuracy_by_variant(network: torch.nn.Module, sets: dict[str, list[dict]], class_names) -> dict[str, dict]:
    """Per variant: accuracy, per-class recall and the share of each predicted class."""
    device = next(network.parameters()).device
    out = {}
    for name, items in sets.items():
        logits, labels, _ = predict_items(network, items, device=device)
        predicted = logits.argmax(1).numpy()
        labels = labels.numpy()
        out[name] = {"n": int(len(labels)), "accuracy": float((predicted == labels).mean()),
                     "recall": {c: float((predicted[labels == k] == k).mean()) if (labels == k).any() else None
                                for k, c in enumerate(class_names)},
                     "predicted_share": {c: float((predicted == k).mean()) for k, c in enumerate(class_names)}}
    return out


#: The framing check measured by :func:`guard_by_shift` (not applied by the product: the results say why): refuse a
#: slice whose head covers more than this share of the image border, as a head cut by the field of view does.
#: The largest share among the 2,247 slices of the default training split (figshare, seed 0) is 0.37, rounded up
#: to the next 0.05.
MAX_HEAD_BORDER_SHARE = 0.40


def border_share(mask: np.ndarray) -> float:
    """The share of the image's outermost pixels (its border ring) inside ``mask``."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2 or min(mask.shape) < 2:
        raise ValueError(f"expected a 2-D mask of at least 2 x 2 pixels, got shape {mask.shape}")
    ring = np.concatenate([mask[0], mask[-1], mask[1:-1, 0], mask[1:-1, -1]])
    return float(ring.mean())


def _guard_item(args) -> tuple[int, dict | None, str | None]:
    """One slice under every shift: ``{shift: (border share or None, prepared [S, S] or None)}``."""
    index, item, size, preprocess, shifts, raw_image = args
    try:
        raw = _raw(item, raw_image)
    except ImageReadError as err:
        return index, None, err.reason
    prepare, out = preprocessing_by_name(preprocess), {}
    for shift in shifts:
        try:
            shifted = _render(raw, shift, item["id"], "families", size, preprocess)
            out[shift] = (border_share(head_mask(shifted)), prepare(shifted, size))
        except ValueError:  # no head found: no class in any path, whatever the framing
            out[shift] = (None, None)
    return index, out, None


def guard_by_shift(network: torch.nn.Module, items: list[dict], size: int, preprocess: str, shifts,
                   raw_images=None, max_border_share: float = MAX_HEAD_BORDER_SHARE, workers: int = 2,
                   progress: bool = True) -> dict[str, dict]:
    """What a framing check (refuse a head covering more than ``max_border_share`` of the image border) would refuse
    under every shift of the honest bench (``none`` included): each test item rendered raw (the bench's own draws),
    its head's share of the image border, and its class from the preparation without the check, so that the
    refused slices' accuracy is known. Per shift: ``{n, unpreparable, refused, accuracy, kept_accuracy,
    refused_accuracy}`` (shares of the prepared slices; accuracies None where no slice is)."""
    shifts = list(shifts)
    jobs = [(i, item, int(size), preprocess, shifts, None if raw_images is None else raw_images[int(item["id"])])
            for i, item in enumerate(items)]
    results = map_in_processes(_guard_item, jobs, workers, desc="framing check", show=progress)
    device = next(network.parameters()).device
    out = {}
    for shift in shifts:
        kept_items, shares, unpreparable = [], [], 0
        for index, rendered, _ in results:
            share, image = (None, None) if rendered is None else rendered[shift]
            if image is None:
                unpreparable += 1
                continue
            kept_items.append({**items[index], "image": image[None].astype(np.float32), "noisy": False})
            shares.append(share)
        row = {"n": len(kept_items), "unpreparable": unpreparable, "refused": None, "accuracy": None,
               "kept_accuracy": None, "refused_accuracy": None}
        if kept_items:
            logits, labels, _ = predict_items(network, kept_items, device=device)
            right = (logits.argmax(1) == labels).numpy()
            refused = np.asarray(shares) > max_border_share
            row.update(refused=float(refused.mean()), accuracy=float(right.mean()),
                       kept_accuracy=float(right[~refused].mean()) if (~refused).any() else None,
                       refused_accuracy=float(right[refused].mean()) if refused.any() else None)
        out[shift] = row
    return out


def _border_share_of(args) -> float | None:
    item, raw_image = args
    try:
        return border_share(head_mask(_raw(item, raw_image)))
    except (ImageReadError, ValueError):  # unreadable or no head: no share
        return None


def border_shares(items: list[dict], raw_images=None, workers: int = 2, progress: bool = True) -> dict:
    """The head's share of the image border over ``items`` as read (a training split: where the limit
    :data:`MAX_HEAD_BORDER_SHARE` comes from): ``{n, no_head, max, p99, median, above_limit}``."""
    jobs = [(item, None if raw_images is None else raw_images[int(item["id"])]) for item in items]
    shares = map_in_processes(_border_share_of, jobs, workers, desc="border shares", show=progress, chunksize=16)
    found = np.asarray([share for share in shares if share is not None])
    if not len(found):
        return {"n": 0, "no_head": len(shares), "max": None, "p99": None, "median": None, "above_limit": 0}
    return {"n": len(found), "no_head": len(shares) - len(found), "max": float(found.max()),
            "p99": float(np.percentile(found, 99)), "median": float(np.median(found)),
            "above_limit": int((found > MAX_HEAD_BORDER_SHARE).sum())}
