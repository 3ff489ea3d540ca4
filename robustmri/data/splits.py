"""Patient-grouped, class-stratified, seeded train / validation / test split.

Slices of one patient are near-identical; splitting by slice leaks them across sets
and inflates accuracy, so whole groups go to one set.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

SPLIT_NAMES = ("train", "val", "test")


def grouped_stratified_split(labels, groups, fractions=(0.75, 0.05, 0.20), seed: int = 0) -> dict[str, np.ndarray]:
    """Return sample indices per split; no group is in more than one split.

    Each group is assigned the class most of its slices carry; within each class the
    groups are shuffled and the test, then the validation set are filled up to their
    share of that class's slices, the rest going to training. Each set gets at least
    one group of a class when the class has three groups or more.
    """
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    if labels.shape != groups.shape or labels.ndim != 1:
        raise ValueError("labels and groups must be 1-D arrays of the same length")
    fractions = np.asarray(fractions, dtype=float)
    if fractions.shape != (3,) or (fractions < 0).any() or not np.isclose(fractions.sum(), 1.0):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions.tolist()}")

    members: dict = defaultdict(list)
    for index, group in enumerate(groups.tolist()):
        members[group].append(index)
    by_class: dict = defaultdict(list)
    for group, indices in members.items():
        by_class[Counter(labels[indices].tolist()).most_common(1)[0][0]].append(group)

    rng = np.random.default_rng(seed)
    assigned: dict[str, list[int]] = {name: [] for name in SPLIT_NAMES}
    for label in sorted(by_class):
        class_groups = sorted(by_class[label], key=str)
        rng.shuffle(class_groups)
        total = sum(len(members[g]) for g in class_groups)
        queue = list(class_groups)
        # fill the small sets first so they are not starved; training takes the rest
        for name, fraction in (("test", fractions[2]), ("val", fractions[1])):
            taken = 0
            while queue and fraction > 0 and (taken < fraction * total or (taken == 0 and len(class_groups) >= 3)):
                if len(queue) == 1:  # always leave a group for training
                    break
                group = queue.pop()
                assigned[name].extend(members[group])
                taken += len(members[group])
        for group in queue:
            assigned["train"].extend(members[group])
    return {name: np.array(sorted(indices), dtype=np.int64) for name, indices in assigned.items()}
