import numpy as np
import pytest

from robustmri.data.catalog import scan_dataset
from robustmri.data.splits import grouped_stratified_split


def _toy(n_groups=120, seed=0):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 6, n_groups)
    groups = np.repeat(np.arange(n_groups), sizes)
    labels = np.repeat(rng.integers(0, 3, n_groups), sizes)
    return labels, groups


def _assert_disjoint(splits, groups):
    sets = {name: set(groups[idx].tolist()) for name, idx in splits.items()}
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"] and not sets["val"] & sets["test"]


def test_no_group_crosses_splits_and_all_samples_used():
    labels, groups = _toy()
    splits = grouped_stratified_split(labels, groups, seed=3)
    _assert_disjoint(splits, groups)
    together = np.concatenate(list(splits.values()))
    assert sorted(together.tolist()) == list(range(len(labels)))


def test_fractions_and_stratification():
    labels, groups = _toy(400)
    splits = grouped_stratified_split(labels, groups, (0.75, 0.05, 0.20), seed=1)
    n = len(labels)
    assert abs(len(splits["test"]) / n - 0.20) < 0.03
    assert abs(len(splits["val"]) / n - 0.05) < 0.02
    for name in ("train", "val", "test"):
        assert set(labels[splits[name]].tolist()) == {0, 1, 2}


def test_seeded():
    labels, groups = _toy()
    a = grouped_stratified_split(labels, groups, seed=5)
    b = grouped_stratified_split(labels, groups, seed=5)
    c = grouped_stratified_split(labels, groups, seed=6)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["test"], c["test"])


def test_bad_fractions():
    with pytest.raises(ValueError, match="summing to 1"):
        grouped_stratified_split([0, 1], [0, 1], (0.5, 0.5, 0.5))


def test_real_figshare_split_keeps_patients_together(figshare_dir):
    catalog = scan_dataset(figshare_dir)
    labels = np.array([r.label for r in catalog.records])
    groups = np.array([r.group for r in catalog.records])
    splits = grouped_stratified_split(labels, groups, seed=0)
    _assert_disjoint(splits, groups)
    assert abs(len(splits["train"]) / len(labels) - 0.75) < 0.03
