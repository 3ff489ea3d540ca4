import numpy as np
import pytest

from robustmri.data.label_noise import flip_labels, parse_imbalance, subsample_classes
from robustmri.data.protocol import build_protocol

LABELS = np.repeat([0, 1, 2], [200, 120, 80])


def test_symmetric_flips_exactly_the_rate_to_other_classes_and_is_seeded():
    noisy, flipped = flip_labels(LABELS, 0.25, 3, "symmetric", seed=4)
    assert flipped.sum() == round(0.25 * len(LABELS))
    np.testing.assert_array_equal(noisy != LABELS, flipped)  # every flip is a real change, nothing else moved
    again, _ = flip_labels(LABELS, 0.25, 3, "symmetric", seed=4)
    other, _ = flip_labels(LABELS, 0.25, 3, "symmetric", seed=5)
    np.testing.assert_array_equal(noisy, again)
    assert (noisy != other).any()
    # targets are spread over both other classes, not always the same one
    offsets = (noisy[flipped] - LABELS[flipped]) % 3
    assert set(offsets.tolist()) == {1, 2}


def test_class_conditional_flips_each_class_to_the_next():
    noisy, flipped = flip_labels(LABELS, 0.3, 3, "class_conditional", seed=0)
    for k, n in enumerate([200, 120, 80]):
        members = LABELS == k
        assert flipped[members].sum() == round(0.3 * n)
        assert (noisy[members & flipped] == (k + 1) % 3).all()


@pytest.mark.parametrize("kind, rate", [("none", 0.4), ("symmetric", 0.0)])
def test_no_noise_leaves_labels_alone(kind, rate):
    noisy, flipped = flip_labels(LABELS, rate, 3, kind)
    np.testing.assert_array_equal(noisy, LABELS)
    assert not flipped.any()


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="label_noise must be"):
        flip_labels(LABELS, 0.1, 3, "pairwise")
    with pytest.raises(ValueError, match="label_noise_rate"):
        flip_labels(LABELS, 1.5, 3)
    with pytest.raises(ValueError, match="unknown class"):
        parse_imbalance({"astrocytoma": 0.5}, ("meningioma", "glioma", "pituitary"))


def test_imbalance_keeps_the_fraction_of_one_class_only():
    kept = subsample_classes(LABELS, parse_imbalance({"pituitary": 0.25}, ("meningioma", "glioma", "pituitary")), 0)
    counts = np.bincount(LABELS[kept], minlength=3)
    assert counts.tolist() == [200, 120, 20]


def _tiny(**kwargs):
    return build_protocol(spatial_size=32, synthetic_patients=60, seed=1, preprocess="minmax", **kwargs)


def test_protocol_flips_training_labels_only_and_records_the_truth():
    clean, noisy = _tiny(), _tiny(label_noise="symmetric", label_noise_rate=0.2)
    assert "true_label" not in clean.train[0]  # the default protocol is unchanged
    assert [i["id"] for i in noisy.train] == [i["id"] for i in clean.train]
    for a, b in zip(clean.train, noisy.train):
        np.testing.assert_array_equal(a["image"], b["image"])  # same pixels: only the labels differ
        assert b["true_label"] == a["label"]
    flipped = sum(item["label"] != item["true_label"] for item in noisy.train)
    assert flipped == round(0.2 * len(noisy.train)) == noisy.summary()["label_noise"]["flipped"]
    for name in ("val", "test"):
        assert [i["label"] for i in noisy.split(name)] == [i["label"] for i in clean.split(name)]
        assert not any("true_label" in i for i in noisy.split(name))


def test_protocol_imbalance_subsamples_the_training_split_only():
    clean, skewed = _tiny(), _tiny(imbalance={"glioma": 0.5})
    count = lambda items, k: sum(i["label"] == k for i in items)  # noqa: E731
    assert count(skewed.train, 1) == round(0.5 * count(clean.train, 1))
    assert count(skewed.train, 0) == count(clean.train, 0) and count(skewed.train, 2) == count(clean.train, 2)
    assert [i["id"] for i in skewed.val] == [i["id"] for i in clean.val]
