"""The training data path for data that fits in memory: whole batches assembled at once.

The protocol's items are already decoded, resized and noised arrays in memory, so nothing per
sample is worth a Python transform pipeline. :class:`InMemoryDataset` hands the data loader a
whole batch per call (``__getitems__``): the images stacked into one tensor and the batch's
augmentation applied to that tensor. Items are read when their batch is built, so a method
that edits training items in place (ISP's perturbed images, ALR's relabelled samples) is
seen from the next batch on.

Randomness is a function of ``(seed, epoch, sample id)``, never of the order in which samples
are drawn: a run resumed or branched at an epoch boundary sees exactly the batches an
uninterrupted run sees, and each rank of a distributed run draws the same flips for the same
samples. An optional :class:`robustmri.data.augmentation.SiteShiftAugmentation` (another site's
framing and exposure, drawn from its own ``(seed, epoch, id)`` stream) is applied to the batch
after the flips. :class:`EpochSampler` is a :class:`torch.utils.data.DistributedSampler` (one replica
unless a process group says otherwise) that tells the dataset its epoch; MONAI's trainer calls
its ``set_epoch`` when each epoch starts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, default_collate

from robustmri.data.augmentation import SiteShiftAugmentation

#: Item keys gathered into the batch as tensors when every item has them; others become lists.
TENSOR_KEYS = ("label", "id", "noisy", "true_label")


class InMemoryDataset(Dataset):
    """Training items (``image`` [C, H, W] arrays in [0, 1], ``label``, ``id``) served a batch at a time.

    ``flip_prob``: probability that a sample is mirrored left-right (axis -1) in an epoch,
    drawn from ``(seed, epoch, id)``. ``site_shift``: a site-shift augmentation applied to each
    batch after the flips (``None``, or one whose ``prob`` is 0, leaves batches exactly as
    without it). A single index (``dataset[i]``) returns the item as stored, unaugmented, for
    tools that look at one sample.
    """

    def __init__(self, data: Sequence[dict], flip_prob: float = 0.5, seed: int = 0,
                 site_shift: SiteShiftAugmentation | None = None):
        if not 0.0 <= float(flip_prob) <= 1.0:
            raise ValueError(f"flip_prob must lie in [0, 1], got {flip_prob}")
        if site_shift is not None and not isinstance(site_shift, SiteShiftAugmentation):
            raise ValueError(f"site_shift must be a SiteShiftAugmentation or None, got {type(site_shift).__name__}")
        self.data = data
        self.flip_prob = float(flip_prob)
        self.seed = int(seed)
        self.site_shift = site_shift
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        return self.data[index]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def flips(self, ids: Sequence[int]) -> np.ndarray:
        """Whether each sample is mirrored this epoch: uniform draws seeded by (seed, epoch, id)."""
        if self.flip_prob == 0.0:
            return np.zeros(len(ids), dtype=bool)
        draws = np.array([np.random.default_rng([self.seed, self.epoch, int(i)]).random() for i in ids])
        return draws < self.flip_prob

    def __getitems__(self, indices: Sequence[int]) -> dict:
        items = [self.data[i] for i in indices]
        images = torch.from_numpy(np.stack([np.asarray(item["image"], dtype=np.float32) for item in items]))
        ids = [int(item.get("id", i)) for item, i in zip(items, indices)]
        flip = torch.from_numpy(self.flips(ids)).view(-1, *([1] * (images.ndim - 1)))
        images = torch.where(flip, images.flip(-1), images)
        if self.site_shift is not None and self.site_shift.prob > 0:
            images = self.site_shift(images, self.seed, self.epoch, ids)
        batch = {"image": images}
        for key in items[0]:
            if key == "image":
                continue
            values = [item.get(key) for item in items]
            if key in TENSOR_KEYS and all(v is not None for v in values):
                batch[key] = torch.as_tensor(values)
            else:
                batch[key] = values
        return batch


def collate_batch(batch):
    """The data loader's ``collate_fn``: a batch built by ``__getitems__`` passes through as it is."""
    return batch if isinstance(batch, dict) else default_collate(batch)


class EpochSampler(DistributedSampler):
    """Shuffles with a permutation seeded by (seed, epoch) and passes the epoch to the dataset.

    Without an initialised process group it is one replica of rank 0 (plain shuffling);
    under ``torchrun`` it takes its share of the ranks like any ``DistributedSampler``.
    """

    def __init__(self, dataset: Dataset, shuffle: bool = True, seed: int = 0, num_replicas: int | None = None,
                 rank: int | None = None, drop_last: bool = False):
        if num_replicas is None and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            num_replicas, rank = 1, 0
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=int(seed),
                         drop_last=drop_last)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
