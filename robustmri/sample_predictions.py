"""Per-sample predictions over protocol items, shared by the noisy-label methods' reports.

Every noisy-label method ranks or selects training samples from the network's outputs
on them (losses, entropies, disagreements); this module gives those outputs once, in
eval mode and without augmentation, so the rankings are reproducible.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from torch import nn

from .influence_handlers import item_batches


@torch.no_grad()
def predict_items(model: nn.Module, items: list[dict], batch_size: int = 64, device="cpu",
                  positions=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits [N, C], given labels [N] and ids [N] of ``items`` (or of ``positions`` in it), model in eval mode."""
    was_training = model.training
    model.eval()
    logits, labels, ids = [], [], []
    try:
        for batch in item_batches(items, batch_size, positions):
            logits.append(model(batch["image"].to(device)).float().cpu())
            labels.append(batch["label"])
            ids.append(batch["id"])
    finally:
        model.train(was_training)
    if not logits:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(logits), torch.cat(labels), torch.cat(ids)


def entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of each row; 0 log 0 = 0."""
    return -(probabilities * torch.log(probabilities.clamp_min(1e-12))).sum(dim=1)


def true_labels(items: list[dict]) -> np.ndarray:
    """Recorded true labels (the given label where no noise was simulated): for evaluation only."""
    return np.array([int(it.get("true_label", it["label"])) for it in items], dtype=np.int64)


def has_label_record(items: list[dict]) -> bool:
    return bool(items) and all("true_label" in it for it in items)


def write_json(output_dir: str, name: str, payload: dict) -> str:
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, name)
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=2)
    return path
