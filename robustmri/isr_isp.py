"""The two influence-based training methods as plain functions (no engine code).

ISR (Algorithm 1): per-sample loss weights from influence scores, MinMax-scaled into
[1, alpha]. ISP (Algorithm 2): one step of each selected training image along the
direction that the influence function predicts lowers the clean validation loss.
Scores follow the sign convention of :mod:`robustmri.influence` (positive = helpful).
"""

from __future__ import annotations

import torch
from torch import nn

EMPHASES = ("harmful", "helpful")
SELECTIONS = ("harmful", "influential")
DIRECTIONS = ("gradient", "sign")
QUANTISATIONS = ("float", "uint8_truncate")


def isr_weights(scores: torch.Tensor, alpha: float = 2.0, emphasis: str = "helpful") -> torch.Tensor:
    """MinMax-scale scores into [1, alpha].

    ``emphasis="harmful"`` gives alpha to the most harmful sample (the paper's text);
    ``"helpful"`` gives it to the most helpful one (the authors' released code).
    """
    if emphasis not in EMPHASES:
        raise ValueError(f"emphasis must be one of {EMPHASES}, got {emphasis!r}")
    if alpha < 1:
        raise ValueError(f"alpha must be at least 1, got {alpha}")
    oriented = scores if emphasis == "helpful" else -scores
    low, high = oriented.min(), oriented.max()
    if high <= low:
        return torch.ones_like(scores)
    return 1.0 + (alpha - 1.0) * (oriented - low) / (high - low)


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """mean_i(w_i * CE_i); plain cross-entropy when ``weights`` is None."""
    losses = nn.functional.cross_entropy(logits, labels.long().reshape(-1), reduction="none")
    return losses.mean() if weights is None else (weights.to(losses) * losses).mean()


def select_for_perturbation(scores: torch.Tensor, ratio: float = 1.0, selection: str = "harmful") -> torch.Tensor:
    """Indices of the ``ratio`` share of samples to perturb, most harmful (lowest score) or
    most influential (largest |score|) first; ratio 1.0 takes every sample, as the reference."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must lie in (0, 1], got {ratio}")
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    key = scores if selection == "harmful" else -scores.abs()
    count = max(1, round(ratio * len(scores)))
    return torch.argsort(key)[:count]


def perturb(images: torch.Tensor, gradients: torch.Tensor, step: float = 0.1, direction: str = "gradient",
            epsilon: float | None = None, quantisation: str = "float") -> torch.Tensor:
    """x + step * d, d = grad_x(g . s) or its sign, within an optional L-inf budget, clipped to [0, 1].

    ``quantisation="uint8_truncate"`` casts to 8 bits by truncation as the reference code
    does (a small negative step always loses one grey level).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if quantisation not in QUANTISATIONS:
        raise ValueError(f"quantisation must be one of {QUANTISATIONS}, got {quantisation!r}")
    delta = step * (gradients.sign() if direction == "sign" else gradients)
    if epsilon is not None:
        delta = delta.clamp(-epsilon, epsilon)
    perturbed = (images + delta).clamp(0.0, 1.0)
    if quantisation == "uint8_truncate":
        perturbed = torch.floor(perturbed * 255.0) / 255.0
    return perturbed
