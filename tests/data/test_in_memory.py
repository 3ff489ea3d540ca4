"""The in-memory training data path: whole batches, randomness fixed by (seed, epoch, sample id)."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from robustmri.data.in_memory import EpochSampler, InMemoryDataset, collate_batch


def _items(n=10, size=4):
    rng = np.random.default_rng(0)
    return [{"image": rng.random((1, size, size)).astype(np.float32), "label": k % 3, "id": 100 + k,
             "noisy": True, "file": f"f{k}"} for k in range(n)]


def _epoch(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return list(loader)


def test_batches_hold_the_items_flipped_or_not():
    items = _items()
    dataset = InMemoryDataset(items, flip_prob=0.5, seed=3)
    dataset.set_epoch(2)
    batch = dataset.__getitems__([4, 1, 7])
    assert batch["label"].tolist() == [1, 1, 1] and batch["id"].tolist() == [104, 101, 107]
    assert batch["file"] == ["f4", "f1", "f7"] and batch["noisy"].dtype == torch.bool
    flips = dataset.flips([104, 101, 107])
    for row, position in enumerate([4, 1, 7]):
        stored = torch.from_numpy(items[position]["image"])
        assert torch.equal(batch["image"][row], stored.flip(-1) if flips[row] else stored)
    assert dataset.flips(list(range(1000))).mean() == pytest.approx(0.5, abs=0.05)
    assert not InMemoryDataset(items, flip_prob=0.0).flips([1, 2]).any()


def test_an_epoch_is_the_same_whatever_came_before_it():
    items = _items(20)
    make = lambda: DataLoader(dataset := InMemoryDataset(items, seed=1), batch_size=6,  # noqa: E731
                              sampler=EpochSampler(dataset, seed=1), collate_fn=collate_batch)
    straight, resumed = make(), make()
    for epoch in (1, 2):
        _epoch(straight, epoch)
    third = _epoch(straight, 3)
    again = _epoch(resumed, 3)  # a run resumed at epoch 3
    assert all(torch.equal(a["image"], b["image"]) and torch.equal(a["id"], b["id"]) for a, b in zip(third, again))
    other = _epoch(resumed, 4)
    assert not all(torch.equal(a["id"], b["id"]) for a, b in zip(third, other))  # shuffled anew each epoch
    assert sorted(torch.cat([b["id"] for b in other]).tolist()) == [100 + k for k in range(20)]


def test_in_place_edits_are_seen_by_the_next_batch():
    items = _items(4)
    dataset = InMemoryDataset(items, flip_prob=0.0)
    items[2]["image"] = np.zeros_like(items[2]["image"])  # ISP rewrites training images in place
    assert dataset.__getitems__([2])["image"].abs().sum() == 0
