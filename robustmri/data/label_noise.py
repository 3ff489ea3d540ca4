"""Simulated label noise and class imbalance for the training split (pure functions, no engine code).

Wrong labels and rare classes are the other failures of real clinical data besides noisy
pixels. The protocol simulates them on the training split only (validation and test keep
their true labels) and keeps a record of what it changed, for evaluation only: methods
train on ``label`` and must never read ``true_label`` (only oracles and reports do).

- ``symmetric``: exactly ``round(rate * N)`` training samples, chosen at random, get a
  label drawn uniformly from the other classes.
- ``class_conditional``: in every class k exactly ``round(rate * n_k)`` samples get the
  label ``(k + 1) mod C`` (the "pair flip" of Han et al. 2018: a confusion between
  neighbouring classes, not uniform).

A fixed count (not a coin per sample) makes the realised rate the requested one, which
keeps comparisons across methods and the audit's precision at k exact.
"""

from __future__ import annotations

import numpy as np

LABEL_NOISE_TYPES = ("none", "symmetric", "class_conditional")


def flip_labels(labels, rate: float, num_classes: int, kind: str = "symmetric",
                seed: int | np.random.Generator = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy copy of ``labels`` and the boolean mask of flipped positions.

    Every flipped label differs from its true label, so ``mask.sum()`` is the number of
    wrong labels.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if kind not in LABEL_NOISE_TYPES:
        raise ValueError(f"label_noise must be one of {LABEL_NOISE_TYPES}, got {kind!r}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"label_noise_rate must lie in [0, 1], got {rate}")
    if num_classes < 2:
        raise ValueError(f"label noise needs at least 2 classes, got {num_classes}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}]")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    noisy, flipped = labels.copy(), np.zeros(len(labels), dtype=bool)
    if kind == "none" or rate == 0.0 or len(labels) == 0:
        return noisy, flipped
    if kind == "symmetric":
        chosen = rng.permutation(len(labels))[:int(round(rate * len(labels)))]
        offsets = rng.integers(1, num_classes, size=len(chosen))  # 1..C-1: never the true class
        noisy[chosen] = (labels[chosen] + offsets) % num_classes
        flipped[chosen] = True
    else:
        for k in range(num_classes):
            members = np.flatnonzero(labels == k)
            chosen = rng.permutation(members)[:int(round(rate * len(members)))]
            noisy[chosen] = (k + 1) % num_classes
            flipped[chosen] = True
    return noisy, flipped


def subsample_classes(labels, keep: dict[int, float] | None, seed: int | np.random.Generator = 0) -> np.ndarray:
    """Positions kept after keeping only a fraction of some classes (``{class: fraction}``), sorted.

    At least one sample of a subsampled class is kept, so the class never disappears.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if not keep:
        return np.arange(len(labels))
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    dropped = []
    for k, fraction in sorted(keep.items()):
        if not 0.0 < float(fraction) <= 1.0:
            raise ValueError(f"imbalance keeps a fraction in (0, 1] of class {k}, got {fraction}")
        members = np.flatnonzero(labels == int(k))
        kept = max(1, int(round(float(fraction) * len(members)))) if len(members) else 0
        dropped.extend(rng.permutation(members)[kept:].tolist())
    return np.setdiff1d(np.arange(len(labels)), np.asarray(dropped, dtype=np.int64))


def parse_imbalance(imbalance, class_names) -> dict[int, float]:
    """``{"glioma": 0.3}`` or ``{1: 0.3}`` (class name or index to the fraction kept) as ``{index: fraction}``."""
    if not imbalance:
        return {}
    if not isinstance(imbalance, dict):
        raise ValueError(f"imbalance must map a class name or index to the fraction kept, got {imbalance!r}")
    names = list(class_names)
    parsed = {}
    for key, fraction in imbalance.items():
        if isinstance(key, str) and key in names:
            index = names.index(key)
        else:
            try:
                index = int(key)
            except (TypeError, ValueError):
                raise ValueError(f"imbalance names an unknown class {key!r}; classes are {names}") from None
            if not 0 <= index < len(names):
                raise ValueError(f"imbalance class index {index} is outside [0, {len(names) - 1}]")
        parsed[index] = float(fraction)
    return parsed


def noisy_label_record(items: list[dict]) -> dict:
    """Counts for logs and reports: flipped labels overall and per true class (no file names)."""
    flipped = [it for it in items if it.get("true_label", it["label"]) != it["label"]]
    per_class: dict[int, int] = {}
    for it in flipped:
        per_class[int(it["true_label"])] = per_class.get(int(it["true_label"]), 0) + 1
    return {"n": len(items), "flipped": len(flipped), "rate": len(flipped) / max(1, len(items)),
            "flipped_by_true_class": dict(sorted(per_class.items()))}


def true_labels(items: list[dict]) -> np.ndarray:
    """Recorded true labels (the given label where no noise was simulated): for evaluation only."""
    return np.array([int(it.get("true_label", it["label"])) for it in items], dtype=np.int64)


def has_label_record(items: list[dict]) -> bool:
    """Whether every item carries its recorded true label (label noise was simulated)."""
    return bool(items) and all("true_label" in it for it in items)
