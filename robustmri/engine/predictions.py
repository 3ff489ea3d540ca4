"""Per-sample predictions over protocol items, shared by the methods' rankings and reports.

Every noisy-label method ranks or selects training samples from the network's outputs on
them (losses, entropies, disagreements); this module gives those outputs once, in eval
mode and without augmentation, so the rankings are reproducible.
"""

from __future__ import annotations

import torch
from torch import nn

from robustmri.data.batching import item_batches
from robustmri.networks import eval_mode


@torch.no_grad()
def predict_items(model: nn.Module, items: list[dict], batch_size: int = 64, device="cpu",
                  positions=None, inferer=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits [N, C], given labels [N] and ids [N] of ``items`` (or of ``positions`` in it), model in eval mode;
    ``inferer``: a MONAI ``Inferer`` called as ``inferer(images, model)`` instead of ``model(images)``."""
    logits, labels, ids = [], [], []
    with eval_mode(model):
        for batch in item_batches(items, batch_size, positions):
            images = batch["image"].to(device)
            logits.append((model(images) if inferer is None else inferer(images, model)).float().cpu())
            labels.append(batch["label"])
            ids.append(batch["id"])
    if not logits:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(logits), torch.cat(labels), torch.cat(ids)


def entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of each row; 0 log 0 = 0."""
    return -(probabilities * torch.log(probabilities.clamp_min(1e-12))).sum(dim=1)
