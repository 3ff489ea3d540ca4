import numpy as np
import pytest

from robustmri.data.noise import PAPER_SIGMA
from robustmri.data.protocol import build_protocol
from robustmri.data.readers import ImageReadError

from helpers import gradient_image, write_png


def _tiny(**kwargs):
    return build_protocol(spatial_size=32, synthetic_patients=60, seed=1, preprocess="minmax", **kwargs)


def test_protocol_noise_placement():
    data = _tiny(noise="gaussian", test_noise_fraction=0.5)
    assert all(item["noisy"] for item in data.train)
    assert not any(item["noisy"] for item in data.val)
    noisy_test = sum(item["noisy"] for item in data.test)
    assert noisy_test == round(0.5 * len(data.test))
    item = data.train[0]
    assert item["image"].shape == (1, 32, 32) and item["image"].dtype == np.float32
    assert 0 <= item["image"].min() and item["image"].max() <= 1


def test_noise_is_fixed_per_seed_and_sample():
    a, b = _tiny(), _tiny()
    np.testing.assert_array_equal(a.train[3]["image"], b.train[3]["image"])
    clean = _tiny(noise="none")
    residual = a.train[3]["image"] - clean.train[3]["image"]
    assert 0.5 * PAPER_SIGMA < residual.std() < 1.1 * PAPER_SIGMA
    assert [i["id"] for i in a.train] == [i["id"] for i in clean.train]  # same split whatever the noise


def test_clean_training_is_tested_on_the_very_pixels_of_each_noisy_run():
    """``test_noises``: a model trained on clean images meets exactly the noisy test images that the runs
    trained on each noise are tested on (the headroom is a paired difference)."""
    shares = (0.0, 0.5, 1.0)
    clean = _tiny(noise="none", test_noise_fractions=shares, test_noises=("gaussian", "rician"))
    assert all(not item["noisy"] for item in clean.train + clean.test)
    assert sorted(clean.test_under) == ["gaussian", "rician"]
    for noise in ("gaussian", "rician"):
        noisy = _tiny(noise=noise, test_noise_fractions=shares)
        for share in shares:
            mine, theirs = clean.test_under[noise][share], noisy.test_at[share]
            assert [i["id"] for i in mine] == [i["id"] for i in theirs]
            assert [i["noisy"] for i in mine] == [i["noisy"] for i in theirs]
            assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(mine, theirs))
        assert sum(i["noisy"] for i in clean.test_under[noise][1.0]) == len(clean.test)
    assert _tiny(noise="gaussian").test_under == {}
    with pytest.raises(ValueError, match="noise must be one of"):
        _tiny(noise="none", test_noises=("speckle",))


def test_a_front_end_sees_every_split_and_every_test_variant_once():
    """Denoisers and filters go through ``with_front_end``: a variant it missed would evaluate a model trained on
    processed images on raw ones."""
    data = _tiny(noise="none", test_noise_fractions=(0.0, 1.0), test_noises=("gaussian",))
    seen = []

    def negate(name, items):
        seen.append((name, len(items)))
        return [{**item, "image": -item["image"]} for item in items]

    out = data.with_front_end(negate)
    assert sorted(name for name, _ in seen) == sorted(["train", "val", "test", "test_at_0", "test_at_1",
                                                       "test_under_gaussian_0", "test_under_gaussian_1"])
    pairs = [(data.train, out.train), (data.val, out.val), (data.test, out.test),
             *[(data.test_at[p], out.test_at[p]) for p in data.test_at],
             *[(data.test_under["gaussian"][p], out.test_under["gaussian"][p]) for p in data.test_under["gaussian"]]]
    for before, after in pairs:
        assert [i["id"] for i in before] == [i["id"] for i in after]
        assert all(np.array_equal(a["image"], -b["image"]) for a, b in zip(before, after))
        assert all(a["image"].min() >= 0 for a in before)  # the original is not changed
    assert out.class_names == data.class_names and out.settings == data.settings


def test_splits_disjoint_by_patient_on_synthetic():
    data = _tiny()
    ids = {name: {i["id"] for i in data.split(name)} for name in ("train", "val", "test")}
    assert not ids["train"] & ids["test"] and not ids["train"] & ids["val"]
    summary = data.summary()
    assert summary["splits"]["val"]["noisy"] == 0 and summary["skipped"] == 0


def test_bad_files_raise_or_are_counted(tmp_path):
    for name in ("meningioma", "glioma", "pituitary"):
        for i in range(4):
            write_png(tmp_path / name / f"{i}.png", gradient_image(seed=i))
    (tmp_path / "glioma" / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ImageReadError, match=r"bad\.png"):
        build_protocol(str(tmp_path), spatial_size=16, preprocess="minmax")
    data = build_protocol(str(tmp_path), spatial_size=16, on_error="skip", preprocess="minmax")
    assert len(data.skipped) == 1 and data.summary()["skipped"] == 1
    assert len(data.train) + len(data.val) + len(data.test) == 12


@pytest.mark.slow
def test_real_figshare_protocol_loads(figshare_dir):
    data = build_protocol(str(figshare_dir), spatial_size=32, noise="rician", seed=0, preprocess="minmax")
    total = len(data.train) + len(data.val) + len(data.test)
    assert total == 3064 and data.class_names == ("meningioma", "glioma", "pituitary")
