"""How well a review order puts the wrong labels first: precision and recall among its first k positions."""

from __future__ import annotations

import numpy as np


def _hits(positions, is_wrong, k: int) -> tuple[int, np.ndarray]:
    is_wrong = np.asarray(is_wrong, dtype=bool)
    k = int(k)
    if not 0 < k <= len(is_wrong):
        raise ValueError(f"k must lie in [1, {len(is_wrong)}], got {k}")
    return int(is_wrong[np.asarray(positions)[:k]].sum()), is_wrong


def precision_at_k(positions, is_wrong, k: int) -> float:
    """Share of truly wrong labels among the first ``k`` positions."""
    hits, _ = _hits(positions, is_wrong, k)
    return hits / int(k)


def recall_at_k(positions, is_wrong, k: int) -> float:
    """Share of all truly wrong labels that the first ``k`` positions hold (0 when no label is wrong)."""
    hits, is_wrong = _hits(positions, is_wrong, k)
    total = int(is_wrong.sum())
    return hits / total if total else 0.0
