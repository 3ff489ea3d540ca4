"""The one batcher of protocol items outside the trainers' data loaders.

Influence, predictions, fine-tuning and meta batches all read items (dicts with ``image``
[1, H, W], ``label`` and ``id``, as :mod:`robustmri.data.protocol` builds them) in fixed order
and without augmentation.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch


def item_batches(items: Sequence[dict], batch_size: int, positions=None) -> Iterator[dict]:
    """Batches of ``items`` (or of ``items[p]`` for ``p`` in ``positions``): stacked image, label and id tensors."""
    positions = list(range(len(items)) if positions is None else positions)
    for start in range(0, len(positions), batch_size):
        chunk = [items[p] for p in positions[start:start + batch_size]]
        yield {
            "image": torch.as_tensor(np.stack([np.asarray(it["image"]) for it in chunk])).float(),
            "label": torch.tensor([int(it["label"]) for it in chunk]),
            "id": torch.tensor([int(it["id"]) for it in chunk]),
        }
