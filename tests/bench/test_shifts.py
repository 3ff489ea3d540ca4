"""The site-shift bench: shifted test sets (against the protocol and the shift functions) and its tables."""

import numpy as np
import pytest
from PIL import Image

from robustmri import CLASS_NAMES
from robustmri.bench import shifts as shifts_module
from robustmri.bench.shifts import (
    REFERENCE,
    family_tables,
    lever_table,
    shift_tables,
    shifted_test_sets,
    summary_table,
    worst_drop,
)
from robustmri.data.preprocessing import preprocess_head, preprocess_minmax
from robustmri.data.protocol import build_protocol
from robustmri.data.readers import read_image
from robustmri.data.shift_families import family_shifts, render_family_shift
from robustmri.data.site_shift import SHIFTS, render_shift
from robustmri.data.synthetic import generate_slices


@pytest.fixture(scope="module")
def protocol(tmp_path_factory):
    """Clean test items of a small PNG data set (the protocol's own), with one constant slice among them."""
    root = tmp_path_factory.mktemp("shifts")
    synthetic = generate_slices(n_patients=8, size=40, seed=4)
    for k, (image, label) in enumerate(zip(synthetic["images"][:16], synthetic["labels"][:16])):
        folder = root / CLASS_NAMES[int(label)]
        folder.mkdir(exist_ok=True)
        Image.fromarray(np.rint(np.pad(image, ((0, 0), (0, 8 + k))) * 255).astype(np.uint8)).save(folder / f"s{k}.png")
    return build_protocol(str(root), spatial_size=24, noise="none", split_fractions=(0.5, 0.1, 0.4), num_workers=1,
                          seed=1, preprocess="minmax")


def test_each_shifted_item_is_the_shift_then_the_preprocessing_and_unshifted_is_the_protocols(protocol, tmp_path):
    items = protocol.test
    sets, excluded = shifted_test_sets(items, 24, ["minmax", "head"], shifts=["fov_tight", "gamma_0.7"],
                                       progress=False)
    assert not excluded and sorted(sets) == ["head", "minmax"]
    assert list(sets["minmax"]) == [REFERENCE, "fov_tight", "gamma_0.7"]  # the reference is always rendered
    for k, item in enumerate(items):
        raw = read_image(item["file"])
        # unshifted and min-max: exactly what the protocol made of the file
        np.testing.assert_array_equal(sets["minmax"][REFERENCE][k]["image"], item["image"])
        for name, function in (("minmax", preprocess_minmax), ("head", preprocess_head)):
            for shift in ("fov_tight", "gamma_0.7"):
                expected = function(render_shift(raw, shift, seed=[item["id"], list(SHIFTS).index(shift)]), 24)
                got = sets[name][shift][k]
                np.testing.assert_array_equal(got["image"][0], expected)
                assert got["label"] == item["label"] and got["id"] == item["id"] and got["noisy"] is False


def test_an_unrenderable_slice_is_left_out_of_every_set_and_the_cache_is_reused(protocol, tmp_path, monkeypatch):
    items = list(protocol.test)
    constant = tmp_path / "constant.png"
    Image.fromarray(np.full((30, 30), 7, np.uint8)).save(constant)
    items.append({**items[0], "file": str(constant), "id": 10_000})
    cache = tmp_path / "cache"
    sets, excluded = shifted_test_sets(items, 24, ["minmax"], shifts=["blur"], progress=False, cache_dir=str(cache))
    assert [i for i, _ in excluded] == [10_000] and "constant image" in excluded[0][1]
    assert all(len(s) == len(items) - 1 for s in sets["minmax"].values())
    # a second call (another seed's split holding the same slices) reads the cache: nothing is rendered again
    monkeypatch.setattr(shifts_module, "render_shift", lambda *a, **k: pytest.fail("rendered again"))
    again, excluded_again = shifted_test_sets(items, 24, ["minmax"], shifts=["blur"], progress=False,
                                              cache_dir=str(cache))
    assert excluded_again == excluded
    for shift in sets["minmax"]:
        for a, b in zip(sets["minmax"][shift], again["minmax"][shift]):
            np.testing.assert_array_equal(a["image"], b["image"])


def _run(method, seed, accuracies):
    return {"method": method, "noise": "gaussian", "seed": seed,
            "test_by_shift": {shift: {"accuracy": a, "n": 100} for shift, a in accuracies.items()}}


def test_tables_against_a_hand_computation():
    runs = [_run("naive", 0, {"none": 0.80, "blur": 0.70}), _run("naive", 1, {"none": 0.84, "blur": 0.80}),
            _run("naive", 2, {"none": 0.82, "blur": 0.78}),
            _run("naive_head", 0, {"none": 0.81, "blur": 0.80}), _run("naive_head", 1, {"none": 0.83, "blur": 0.83}),
            _run("naive_head", 2, {"none": 0.80, "blur": 0.79})]
    text = shift_tables(runs, [("naive_head", "naive")])
    # naive under blur: 70, 80, 78 -> mean 76.0, std 5.3; drops -10, -4, -4: mean -6.0, std 3.464,
    # t(0.975, 2) = 4.303 -> half width 8.6: [-14.6, +2.6], 0 of 3 seeds higher
    assert "| blur | 76.0 ± 5.3 (−6.0 [−14.6, +2.6] 0/3) |" in text
    # naive_head - naive under blur: +10, +3, +1 -> mean +4.7, std 4.726, half width 11.7: [−7.1, +16.4];
    # MDE (t(0.975, 2) + t(0.8, 2)) * std / sqrt(3) = (4.303 + 1.061) * 4.726 / 1.732 = 14.6
    assert "| blur | +4.7 [−7.1, +16.4] 3/3 | 14.6 |" in text
    assert worst_drop(runs, "naive", "gaussian") == ("blur", pytest.approx(-6.0))
    summary = summary_table(runs)
    # naive: unshifted 80, 84, 82 -> 82.0 ± 2.0; mean over the two renderings per seed: 75, 82, 80 -> 79.0
    assert "| gaussian | naive | 82.0 ± 2.0 | 79.0 | blur: −6.0 [−14.6, +2.6] 0/3 | 3 |" in summary
    assert shift_tables([{"method": "naive", "noise": "gaussian", "seed": 0}]) == "No run has site-shift results."


def test_synthetic_items_take_their_raw_slices_and_unshifted_is_the_protocols(tmp_path):
    # two seeds, one cache: the synthetic set is generated anew per seed, so one id names two different slices
    for seed in (2, 3):
        data = build_protocol(None, spatial_size=24, synthetic_patients=10, noise="none", preprocess="head", seed=seed)
        raw = generate_slices(n_patients=10, size=24, seed=seed)["images"]
        sets, excluded = shifted_test_sets(data.test, 24, ["head"], shifts=["blur"], progress=False, raw_images=raw,
                                           cache_dir=str(tmp_path / "cache"))
        assert not excluded
        for k, item in enumerate(data.test):
            np.testing.assert_array_equal(sets["head"][REFERENCE][k]["image"], item["image"])  # not prepared twice
    with pytest.raises(Exception):
        shifts_module._raw(data.test[0], None)  # no file and no raw image: an error, not a guess


def test_the_families_catalogue_renders_each_shift_with_its_own_stream(protocol):
    items = protocol.test[:3]
    sets, excluded = shifted_test_sets(items, 24, ["minmax"], shifts=["motion", "rotate_20"], progress=False,
                                       catalog="families")
    assert not excluded and list(sets["minmax"]) == [REFERENCE, "motion", "rotate_20"]
    for k, item in enumerate(items):
        for shift in ("motion", "rotate_20"):
            expected = preprocess_minmax(render_family_shift(read_image(item["file"]), shift, 24,
                                                             [item["id"], family_shifts(24)[shift].stream],
                                                             preprocess="minmax"), 24)
            np.testing.assert_array_equal(sets["minmax"][shift][k]["image"][0], expected)
    with pytest.raises(ValueError, match=r"unknown shift\(s\) \['motion'\] in catalogue 'site'"):
        shifted_test_sets(items, 24, ["minmax"], shifts=["motion"], progress=False)
    with pytest.raises(ValueError, match="unknown shift catalogue 'other'"):
        shifted_test_sets(items, 24, ["minmax"], progress=False, catalog="other")


def test_a_fixed_render_size_renders_one_physical_shift_for_every_input_size(protocol):
    # the input-size lever: a 2 px blur stated at a 12 px training pixel, prepared to 24 px, is the rendering of
    # the 12 px bench resized, not the milder blur a 24 px model's own training pixel would state
    items = protocol.test[:3]
    sets, excluded = shifted_test_sets(items, 24, ["head"], shifts=["blur_2px", "rician_0.2"], progress=False,
                                       catalog="families", render_size=12)
    own, _ = shifted_test_sets(items, 24, ["head"], shifts=["blur_2px"], progress=False, catalog="families")
    assert not excluded
    for k, item in enumerate(items):
        raw = read_image(item["file"])
        for shift in ("blur_2px", "rician_0.2"):
            rendered = render_family_shift(raw, shift, 12, [item["id"], family_shifts(12)[shift].stream],
                                           preprocess="head")
            np.testing.assert_array_equal(sets["head"][shift][k]["image"][0], preprocess_head(rendered, 24))
        # a different physical blur from the one stated at the 24 px training pixel
        assert not np.array_equal(sets["head"]["blur_2px"][k]["image"], own["head"]["blur_2px"][k]["image"])
        np.testing.assert_array_equal(sets["head"][REFERENCE][k]["image"], own["head"][REFERENCE][k]["image"])


def test_family_tables_against_a_hand_computation():
    accuracies = {  # seed: (none, rotate_10, rotate_20, tissue_contrast)
        "naive_head_aug": {0: (0.80, 0.79, 0.70, 0.70), 1: (0.84, 0.83, 0.80, 0.74), 2: (0.82, 0.81, 0.78, 0.72)},
        "naive_head_aug_minus_rotation": {0: (0.81, 0.75, 0.60, 0.70), 1: (0.83, 0.79, 0.70, 0.70),
                                          2: (0.80, 0.78, 0.68, 0.70)}}
    runs = [_run(method, seed, dict(zip(("none", "rotate_10", "rotate_20", "tissue_contrast"), values)))
            for method, seeds in accuracies.items() for seed, values in seeds.items()]
    leave_out = {"naive_head_aug_minus_rotation": ("naive_head_aug", "rotation")}
    text = family_tables(runs, family_shifts(48), leave_out)
    sections = text.split("\n\n**")
    assert [section.lstrip("*").split("**")[0] for section in sections] == [
        "In-range", "Out-of-range", "New family", "Left out"]
    # severity tables: the full configuration only (the left-out one has its own table)
    assert "| `rotate_10` | rotation | 10 degrees | 81.0 (−1.0 [−1.0, −1.0] 0/3) |" in sections[0]
    assert "naive_head_aug_minus_rotation" not in sections[0]
    # rotate_20: 70, 80, 78 against 80, 84, 82: drops -10, -4, -4 -> mean -6.0, std 3.464, t(0.975, 2) = 4.303:
    # half width 8.6
    assert "| `rotate_20` | rotation | 20 degrees | 76.0 (−6.0 [−14.6, +2.6] 0/3) |" in sections[1]
    assert "| **mean of 1** |  |  | 72.0 (−10.0 [−10.0, −10.0] 0/3) |" in sections[2]
    # left out, rotate_10: without rotation 75, 79, 78 against 81, 83, 80: -6, -4, -2 -> -4.0, std 2, half 5.0;
    # without - full: -4, -4, -3 -> -3.67, std 0.577, half 1.43
    assert ("| `naive_head_aug_minus_rotation` | rotation | `rotate_10` (in-range) | 81.0 (−1.0 [−1.0, −1.0] 0/3) "
            "| 77.3 (−4.0 [−9.0, +1.0] 0/3) | −3.7 [−5.1, −2.2] 0/3 |") in sections[3]
    # rotate_20: 60, 70, 68: changes -21, -13, -12 -> -15.3, std 4.93, half 12.3; without - full: -10 each
    assert "| 66.0 (−15.3 [−27.6, −3.1] 0/3) | −10.0 [−10.0, −10.0] 0/3 |" in sections[3]
    # the mean of the two, per seed: full 74.5, 81.5, 79.5 (changes -5.5, -2.5, -2.5: -3.5, std 1.73, half 4.3)
    assert "| **mean of 2** | 78.5 (−3.5 [−7.8, +0.8] 0/3) |" in sections[3]
    # unshifted, without - full: +1, -1, -2 -> -0.67, std 1.53, half 3.8
    assert "| `none` (unshifted) |  |  | −0.7 [−4.5, +3.1] 1/3 |" in sections[3]
    assert family_tables([{"method": "naive", "noise": "gaussian", "seed": 0}], family_shifts(48), {}) == (
        "No run has site-shift results.")


def test_lever_table_against_a_hand_computation():
    accuracies = {  # seed: (none, rotate_10, rotate_20, tissue_contrast), and the noisy home split
        "naive_head_aug": {0: (0.80, 0.79, 0.70, 0.70, 0.78), 1: (0.84, 0.83, 0.80, 0.74, 0.80),
                           2: (0.82, 0.81, 0.78, 0.72, 0.79)},
        "naive_head_landmarks_aug": {0: (0.81, 0.80, 0.74, 0.72, 0.78), 1: (0.85, 0.82, 0.82, 0.74, 0.81),
                                     2: (0.82, 0.82, 0.80, 0.76, 0.81)}}
    runs = []
    for method, seeds in accuracies.items():
        for seed, values in seeds.items():
            run = _run(method, seed, dict(zip(("none", "rotate_10", "rotate_20", "tissue_contrast"), values)))
            run["test_by_p"] = {"last": {"1": {"accuracy": values[4]}}}
            runs.append(run)
    levers = {"naive_head_landmarks_aug": "naive_head_aug", "naive_head_mr_aug": "naive_head_aug"}  # one not run
    text = lever_table(runs, family_shifts(48), levers)
    assert text.startswith("**Levers**, test split (training noise gaussian)")
    assert ("| lever | `none` (clean) | home, noisy (p = 1) | in-range (mean of 1) | out-of-range (mean of 1) "
            "| new family (mean of 1) | every shift (mean of 3) |") in text
    # none: +1, +1, 0 -> +0.67, std 0.577, t(0.975, 2) = 4.303: half 1.43; p = 1: 0, +1, +2 -> +1.0, std 1, half 2.5;
    # rotate_10: +1, -1, +1 -> +0.33, std 1.155, half 2.87; rotate_20: +4, +2, +2 -> +2.67, std 1.155;
    # tissue_contrast: +2, 0, +4 -> +2.0, std 2, half 4.97; every shift, the three averaged per seed:
    # +7/3, +1/3, +7/3 -> +1.67, std 1.155, half 2.87
    assert ("| `naive_head_landmarks_aug` − `naive_head_aug` | +0.7 [−0.8, +2.1] 2/3 | +1.0 [−1.5, +3.5] 2/3 "
            "| +0.3 [−2.5, +3.2] 2/3 | +2.7 [−0.2, +5.5] 3/3 | +2.0 [−3.0, +7.0] 2/3 | +1.7 [−1.2, +4.5] 3/3 |") in text
    # MDE, one lever per column: (t(0.975, 2) + t(0.8, 2)) * std / sqrt(3) = (4.303 + 1.061) * std / 1.732
    assert "| minimum detectable effect | 1.8 | 3.1 | 3.6 | 3.6 | 6.2 | 3.6 |" in text
    assert "naive_head_mr_aug" not in text
    validation = lever_table([{**r, "val_by_shift": r["test_by_shift"]} for r in runs], family_shifts(48), levers,
                             key="val_by_shift")
    assert "validation split" in validation and "home, noisy" not in validation
