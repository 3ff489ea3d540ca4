"""Paired differences over seeds and patient-grouped bootstrap intervals, checked against hand computations."""

import math
import statistics
import time

import numpy as np
import pytest

from robustmri.bench.stats import (grouped_bootstrap_ci, paired_difference, paired_table, run_interval_table,
                                   stability)

T_975_2 = 4.302653  # Student t, 0.975 quantile, 2 degrees of freedom (tables)


def test_paired_difference_three_seeds_by_hand():
    # seeds 7 (method only) and 5 (baseline only) are not in both: ignored
    values = {0: 0.80, 1: 0.85, 2: 0.90, 7: 0.50}
    baseline = {0: 0.78, 1: 0.80, 2: 0.91, 5: 0.30}
    result = paired_difference(values, baseline)
    # differences: 0.80-0.78 = 0.02, 0.85-0.80 = 0.05, 0.90-0.91 = -0.01
    # mean = (0.02 + 0.05 - 0.01) / 3 = 0.02
    # deviations 0, 0.03, -0.03; sum of squares 0.0018; variance 0.0018 / 2 = 0.0009; sd = 0.03
    # half width = 4.302653 * 0.03 / sqrt(3) = 4.302653 * 0.0173205 = 0.0745241
    half = T_975_2 * 0.03 / math.sqrt(3)
    assert result["n"] == 3 and result["seeds"] == [0, 1, 2]
    assert result["mean"] == pytest.approx(0.02)
    assert result["std"] == pytest.approx(0.03)
    assert result["ci"] == pytest.approx([0.02 - half, 0.02 + half], abs=1e-6)
    assert result["ci"] == pytest.approx([-0.0545241, 0.0945241], abs=1e-6)
    assert result["positive"] == 2  # seeds 0 and 1


def test_paired_difference_level_changes_the_t_quantile():
    result = paired_difference({0: 0.80, 1: 0.85, 2: 0.90}, {0: 0.78, 1: 0.80, 2: 0.91}, level=0.90)
    half = 2.919986 * 0.03 / math.sqrt(3)  # t_{0.95, 2} = 2.919986
    assert result["ci"] == pytest.approx([0.02 - half, 0.02 + half], abs=1e-6)


def test_paired_difference_one_or_no_common_seed_has_no_interval():
    one = paired_difference({0: 0.7, 1: 0.9}, {1: 0.8, 2: 0.1})
    assert one["n"] == 1 and one["mean"] == pytest.approx(0.1) and one["ci"] is None and one["std"] is None
    assert one["positive"] == 1 and one["seeds"] == [1]
    none = paired_difference({0: 0.7}, {1: 0.8})
    assert none["n"] == 0 and none["mean"] is None and none["ci"] is None and none["positive"] == 0


def test_paired_difference_a_tie_is_not_positive():
    tie = paired_difference({0: 0.8, 1: 0.9}, {0: 0.8, 1: 0.85})  # differences 0 and +0.05
    assert tie["positive"] == 1 and tie["n"] == 2


def test_bootstrap_accuracy_is_over_slices_not_a_mean_over_patients():
    # patient 0: 9 slices, all wrong; patients 1..9: one slice each, right; accuracy 9/18 = 0.5
    groups = np.array([0] * 9 + list(range(1, 10)))
    correct = groups != 0
    # a resample holds k copies of patient 0, k ~ Binomial(10, 0.1), accuracy (10 - k) / (10 - k + 9k);
    # P(k = 0) = 0.349 < 0.495 and P(k <= 1) = 0.736 > 0.505: the middle 1 % is k = 1, accuracy 9/18
    # (a mean of per-patient accuracies would give (10 - k) / 10 = 0.9)
    assert grouped_bootstrap_ci(correct, groups, level=0.01) == pytest.approx((0.5, 0.5))


def test_bootstrap_all_correct_is_one_one():
    groups = np.repeat(np.arange(20), 3)
    assert grouped_bootstrap_ci(np.ones(60, dtype=bool), groups) == (1.0, 1.0)


def test_bootstrap_one_wrong_group_among_equal_groups():
    groups = np.repeat(np.arange(10), 5)
    correct = groups != 3  # patient 3: all five slices wrong; accuracy 45/50 = 0.9
    low, high = grouped_bootstrap_ci(correct, groups)
    assert low < 0.9 <= high
    # a resample holds k copies of patient 3, k ~ Binomial(10, 0.1), accuracy 1 - k/10:
    # P(k >= 4) = 1 - (0.3487 + 0.3874 + 0.1937 + 0.0574) = 0.0128 < 0.025 < P(k >= 3) = 0.0702
    # and P(k = 0) = 0.349 > 0.025: the 2.5 % and 97.5 % quantiles are 0.7 and 1.0
    assert (low, high) == pytest.approx((0.7, 1.0))


def test_bootstrap_is_deterministic_for_a_seed():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(200), rng.integers(1, 5, size=200))
    correct = rng.random(len(groups)) < 0.8
    assert grouped_bootstrap_ci(correct, groups, seed=3) == grouped_bootstrap_ci(correct, groups, seed=3)
    assert grouped_bootstrap_ci(correct, groups, seed=3) != grouped_bootstrap_ci(correct, groups, seed=4)


def test_bootstrap_grouping_matters():
    # two patients of 500 slices each: one all right, one all wrong; accuracy 0.5
    groups = np.repeat(["a", "b"], 500)
    correct = groups == "a"
    grouped = grouped_bootstrap_ci(correct, groups)
    slices = grouped_bootstrap_ci(correct, np.arange(1000))  # every slice its own group
    # resampling patients: aa -> 1, ab/ba -> 0.5, bb -> 0 (each pair 1/4): the interval is [0, 1]
    assert grouped == (0.0, 1.0)
    # resampling slices: sd sqrt(0.25 / 1000) = 0.0158, the interval about 0.5 +- 0.031
    assert slices[0] == pytest.approx(0.5 - 1.96 * 0.0158, abs=0.01)
    assert slices[1] == pytest.approx(0.5 + 1.96 * 0.0158, abs=0.01)
    assert grouped[1] - grouped[0] > 10 * (slices[1] - slices[0])


def test_bootstrap_is_fast_for_600_slices_and_2000_resamples():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(200), 3)
    correct = rng.random(600) < 0.85
    start = time.perf_counter()
    grouped_bootstrap_ci(correct, groups, n_boot=2000)
    assert time.perf_counter() - start < 1.0


def test_bootstrap_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        grouped_bootstrap_ci([1, 0, 1], [0, 1])


def _record(method, noise, seed, by_p, checkpoint="last", history=None, ci=None):
    reports = {p: {"accuracy": acc, **({"accuracy_ci95": ci} if ci else {})} for p, acc in by_p.items()}
    return {"method": method, "noise": noise, "seed": seed, "test_by_p": {checkpoint: reports},
            "history": history or []}


def _table_runs():
    runs = [_record("isp", "gaussian", s, {"1": a}) for s, a in enumerate([0.82, 0.85, 0.90])]  # isp first
    runs += [_record("naive", "gaussian", s, {"0": 0.90, "1": a}) for s, a in enumerate([0.80, 0.80, 0.91])]
    runs += [_record("naive", "rician", 0, {"1": 0.70}), _record("isp", "rician", 0, {"1": 0.65})]
    return runs


def test_paired_table_cells_by_hand():
    table = paired_table(_table_runs())
    # naive, gaussian p=1: 80, 80, 91 -> mean 83.67, deviations -3.67, -3.67, 7.33, sum of squares 80.67,
    # variance 40.33, sd 6.35; p=0: 90, 90, 90
    # isp, gaussian p=1: 82, 85, 90 -> mean 85.67, sum of squares 13.44 + 0.44 + 18.78 = 32.67, sd sqrt(16.33) = 4.04
    # isp - naive per seed: +2, +5, -1 points -> mean +2.0, sd 3, half 4.302653 * 3 / sqrt(3) = 7.45,
    # interval [-5.45, +9.45], 2 of 3 seeds positive
    # rician: one seed, 65 - 70 = -5 points, no interval, 0 of 1
    assert ("| method | gaussian, p=0 | gaussian, p=0: Δ vs naive | gaussian, p=1 | gaussian, p=1: Δ vs naive "
            "| rician, p=1 | rician, p=1: Δ vs naive |") in table
    assert "| naive | 90.0 ± 0.0 (3) | – | 83.7 ± 6.4 (3) | – | 70.0 ± 0.0 (1) | – |" in table
    assert "| isp | – | – | 85.7 ± 4.0 (3) | +2.0 [−5.5, +9.5], 2/3 | 65.0 ± 0.0 (1) | −5.0, 0/1 |" in table
    assert table.index("| naive |") < table.index("| isp |")  # baseline first although isp came first
    legend = table.split("\n\n")[0]
    assert "share of noisy test images" in legend and "paired t interval" in legend and "k/n" in legend


def test_paired_table_states_each_columns_minimum_detectable_effect():
    table = paired_table(_table_runs())
    # gaussian p=1: one paired SD, 3 points over 3 seeds: (t(0.975, 2) + t(0.8, 2)) * 3 / sqrt(3)
    # = (4.3027 + 1.0607) * 1.7321 = 9.29; p=0 has no pair, rician one seed: no SD
    assert "| minimum detectable effect |  | – |  | 9.3 |  | – |" in table
    assert "minimum detectable effect in points" in table.split("\n\n")[0]


def test_headroom_pairs_clean_training_with_each_noise_on_the_same_test_images():
    from robustmri.bench.stats import headroom_table

    runs = [_record("naive", "gaussian", s, {"1": a}, checkpoint="best") for s, a in enumerate([0.80, 0.82, 0.84])]
    runs += [_record("naive", "rician", 0, {"1": 0.70}, checkpoint="best")]
    runs += [_record("isp", "gaussian", 0, {"1": 0.99}, checkpoint="best")]  # not naive: never in the headroom
    for seed, (gauss, rice) in enumerate([(0.85, 0.75), (0.86, 0.74), (0.90, 0.73)]):
        clean = _record("naive", "none", seed, {"0": 0.95, "1": 0.95}, checkpoint="best")
        clean["test_by_noise"] = {"gaussian": {"best": {"1": {"accuracy": gauss}}},
                                  "rician": {"best": {"1": {"accuracy": rice}}}}
        runs.append(clean)
    table = headroom_table(runs, checkpoint="best")
    # gaussian: clean-trained 85, 86, 90 against 80, 82, 84: +5, +4, +6 -> +5.0, sd 1, half 4.3027 / sqrt(3) = 2.48
    assert "| naive, clean-trained | 87.0 ± 2.6 (3) | +5.0 [+2.5, +7.5], 3/3 | 74.0 ± 1.0 (3) | +5.0, 1/1 |" in table
    # on clean test images (95 %) against noisy-trained on noisy images: +15, +13, +11 -> +13.0, sd 2,
    # half 4.3027 * 2 / sqrt(3) = 4.97
    assert ("| naive, clean-trained, clean test images | 95.0 ± 0.0 (3) | +13.0 [+8.0, +18.0], 3/3 | 95.0 ± 0.0 (3) "
            "| +25.0, 1/1 |") in table
    assert "| isp" not in table and "none, p=" not in table
    assert headroom_table([r for r in runs if r["noise"] != "none"]) == ""


def test_paired_table_other_checkpoint_and_baseline():
    runs = _table_runs() + [_record("naive", "gaussian", 0, {"1": 0.5}, checkpoint="best")]
    table = paired_table(runs, baseline="isp", checkpoint="best")
    assert "| isp | – | – |" in table and "| naive | 50.0 ± 0.0 (1) | – |" in table


def test_run_interval_table_rows():
    runs = [_record("isp", "gaussian", 1, {"1": 0.82, "0": 0.9}, ci=[0.78, 0.86]),
            _record("naive", "gaussian", 0, {"1": 0.805}),
            _record("isp", "gaussian", 0, {"0": 0.9})]
    table = run_interval_table(runs)
    assert "| isp | gaussian | 1 | 82.0 | [78.0, 86.0] |" in table
    assert "| naive | gaussian | 0 | 80.5 | – |" in table
    assert "| isp | gaussian | 0 | – | – |" in table
    assert table.index("| isp | gaussian | 0 |") < table.index("| isp | gaussian | 1 |") < table.index("| naive |")


def test_stability_by_hand():
    history_a = [{"epoch": e, "val_accuracy": a} for e, a in enumerate([0.5, 0.6, 0.8, 0.7])]
    history_b = [{"epoch": e, "val_accuracy": a} for e, a in enumerate([0.5, 0.5, 0.5, 0.9])]
    runs = [_record("naive", "gaussian", 0, {"0": 0.1, "1": 0.8}, history=history_a),
            _record("naive", "gaussian", 1, {"0": 0.4, "1": 0.9}, history=history_b),
            _record("isp", "gaussian", 0, {"1": 0.3}, history=history_a),
            _record("naive", "rician", 0, {"1": 0.6})]
    result = stability(runs)
    gaussian = result["gaussian"]
    assert gaussian["n"] == 2 and gaussian["seeds"] == [0, 1]
    assert gaussian["accuracy_std"] == pytest.approx(statistics.stdev([0.8, 0.9]))  # p=1 only; 0.0707
    # mean_step over the second half from the epoch before it: a: 0.6->0.8->0.7: (0.2 + 0.1) / 2 = 0.15;
    # b: 0.5->0.5->0.9: (0 + 0.4) / 2 = 0.2; mean 0.175
    assert gaussian["val_mean_step"] == pytest.approx(0.175)
    assert result["rician"]["accuracy_std"] is None and result["rician"]["val_mean_step"] is None
    assert set(result) == {"gaussian", "rician"}


def test_old_records_with_one_test_noise_fraction_are_read_as_that_p():
    def old(method, seed, p, acc):
        return {"method": method, "noise": "gaussian", "seed": seed, "test_noise_fraction": p, "history": [],
                "test": {"best": {"accuracy": 0.0}, "last": {"accuracy": acc}}}
    runs = [old("naive", 0, 0.5, 0.8), old("isp", 0, 0.5, 0.9)]
    assert "| isp | 90.0 ± 0.0 (1) | +10.0, 1/1 |" in paired_table(runs)
    assert "gaussian, p=0.5" in paired_table(runs)
    # trained at p=0.5: that record's only p is the accuracy as trained
    assert stability(runs)["gaussian"]["accuracy_mean"] == pytest.approx(0.8)


def test_minimum_detectable_effect_by_hand_and_against_the_noncentral_t_power():
    from scipy import stats as scipy_stats

    from robustmri.bench.stats import minimum_detectable_effect

    # by hand: t(0.975, 4) = 2.7764, t(0.80, 4) = 0.9410; (2.7764 + 0.9410) * 2 / sqrt(5) = 3.3250
    assert minimum_detectable_effect(2.0, 5) == pytest.approx(3.3250, abs=1e-3)
    # the exact power of a paired t test at that effect is close to the 80 % asked for
    n, std = 5, 2.0
    delta = minimum_detectable_effect(std, n) / (std / n ** 0.5)
    critical = scipy_stats.t.ppf(0.975, n - 1)
    power = scipy_stats.nct.sf(critical, n - 1, delta) + scipy_stats.nct.cdf(-critical, n - 1, delta)
    assert 0.75 < power < 0.85
    with pytest.raises(ValueError, match="at least 2 paired seeds"):
        minimum_detectable_effect(1.0, 1)
