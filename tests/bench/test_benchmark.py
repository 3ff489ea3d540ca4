"""The Table 1 benchmark: aggregation checked by hand, and the script end to end on the tiny embedded set."""

import json
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest

from robustmri.abstention.scores import SCORES
from robustmri.bench.machine import run_provenance
from robustmri.bench.report import aggregate, markdown_tables, read_runs, validation_swing
from robustmri.bench.runs import run_key

from conftest import ROOT


def _record(method, noise, seed, best, last, p=1.0, history=None):
    report = lambda acc: {"n": 10, "accuracy": acc, "macro_f1": acc / 2, "roc_auc_macro": None, "per_class": {}}  # noqa: E731
    return {"method": method, "noise": noise, "test_noise_fraction": p, "seed": seed,
            "test": {"best": report(best), "last": report(last)},
            "history": history or [], "timings": {"train_s": 10.0 * (seed + 1), "influence_s": None}}


def test_aggregate_is_mean_and_sample_std_over_seeds():
    runs = [_record("naive", "gaussian", s, b, l) for s, (b, l) in enumerate([(0.8, 0.7), (0.9, 0.6), (0.7, 0.65)])]
    runs.append(_record("isp", "rician", 0, 0.5, 0.4))
    summary = aggregate(runs, method_order=["naive", "isp"])
    cell = summary["cells"]["naive"]["gaussian"]
    assert summary["methods"] == ["naive", "isp"] and summary["columns"] == ["gaussian", "rician"]
    assert cell["n"] == 3 and cell["seeds"] == [0, 1, 2]
    assert cell["best_accuracy"]["mean"] == pytest.approx(statistics.mean([0.8, 0.9, 0.7]))
    assert cell["best_accuracy"]["std"] == pytest.approx(statistics.stdev([0.8, 0.9, 0.7]))
    assert cell["last_accuracy"]["mean"] == pytest.approx(statistics.mean([0.7, 0.6, 0.65]))
    assert cell["time_train_s"] == pytest.approx(20.0)
    assert summary["cells"]["isp"]["rician"]["best_accuracy"]["std"] == 0.0
    table = markdown_tables(summary)
    assert "| naive | 80.00 +- 10.00 (n=3) | - |" in table
    assert "| isp | - | 50.00 +- 0.00 (n=1) |" in table


def test_columns_split_by_test_noise_fraction_when_several():
    runs = [_record("naive", "gaussian", 0, 0.8, 0.8, p=1.0), _record("naive", "gaussian", 0, 0.6, 0.6, p=0.5)]
    summary = aggregate(runs)
    assert summary["columns"] == ["gaussian, p=0.5", "gaussian, p=1"]


def test_validation_swing_uses_second_half():
    history = [{"val_accuracy": a} for a in (0.1, 0.2, 0.9, 0.7, 0.8, 0.6)]
    swing = validation_swing(history)
    assert swing["range"] == pytest.approx(0.2)  # second half: 0.7, 0.8, 0.6
    assert swing["mean_step"] == pytest.approx(np.mean([0.2, 0.1, 0.2]))  # 0.9->0.7->0.8->0.6


def test_read_runs_ignores_a_torn_last_line(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps({"a": 1}) + "\n" + '{"a": 2, "b"')
    assert read_runs(str(path)) == [{"a": 1}]


def _benchmark(*args):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), *args],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "BRAIN_TUMOR_DATA": ""})
    return result


@pytest.mark.slow
def test_benchmark_end_to_end_and_resume(tmp_path):
    out = tmp_path / "bench"
    args = ["run", "--profile", "smoke", "--out", str(out), "--noises", "gaussian", "--seeds", "1"]
    first = _benchmark(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    runs = read_runs(str(out / "runs.jsonl"))
    assert sorted(r["method"] for r in runs) == ["isp", "isp_linf_control", "naive"]
    # same seed: same patient split and the same noisy pixels for every method
    assert len({r["data_fingerprint"] for r in runs}) == 1
    by_method = {r["method"]: r for r in runs}
    # every record names the code that made it (robustmri.bench.machine.run_provenance)
    assert all(r["commit"] == run_provenance()["commit"] and r["versions"]["monai"] for r in runs)
    assert by_method["isp"]["timings"]["influence_s"] > 0 and by_method["naive"]["timings"]["influence_s"] is None
    for run in runs:
        # all three branched from one naive prefix of influence_epoch = 1 epoch; the history is whole
        assert run["branched_after_epoch"] == 1 and [h["epoch"] for h in run["history"]] == [1, 2]
        for tag in ("best", "last"):
            assert run["test"][tag]["n"] == run["n"]["test"] > 0 and 0 <= run["test"][tag]["accuracy"] <= 1
            # every model evaluated at the profile's shares of noisy test images, with a patient-grouped interval
            assert sorted(run["test_by_p"][tag]) == ["0", "1"]
            low, high = run["test_by_p"][tag]["1"]["accuracy_ci95"]
            assert low <= run["test_by_p"][tag]["1"]["accuracy"] <= high
        assert run["test_by_p"]["last"]["1"]["accuracy"] == run["test"]["last"]["accuracy"]  # trained at p = 1
        # last: the product's model, the weight average; last_raw: the raw weights of the same run
        assert sorted(run["test_by_p"]["last_raw"]) == ["0", "1"]
    # the two ISP runs differ after the branch point only
    assert by_method["isp"]["history"][0] == by_method["naive"]["history"][0] == by_method["isp_linf_control"]["history"][0]
    summary = json.loads((out / "runs" / "isp_linf_control__gaussian__p1__seed0" / "eval" /
                          "influence_summary.json").read_text())
    assert summary["isp_control"] is True
    for name in ("results.json", "results.md", "accuracy_best.png", "accuracy_last.png", "validation_curves.png"):
        assert (out / name).stat().st_size > 100, name
    assert (out / "runs" / "isp__gaussian__p1__seed0" / "eval" / "influence.csv").is_file()
    assert "| naive |" in (out / "results.md").read_text()
    assert "Paired against naive training" in (out / "results.md").read_text()
    assert "naive: weight average (the model) against the raw last-epoch weights" in (out / "results.md").read_text()
    protocol = json.loads((out / "protocol.json").read_text())["protocol"]
    assert protocol["recipe_settings"]["ema_decay"] == 0.99 and protocol["recipe_settings"]["learning_rate"] == 0.002
    # one precision for the folder, whatever the processor would choose with the bundle's auto
    assert protocol["precision"] == "fp32" and all(r["precision"] == "fp32" for r in runs)

    second = _benchmark(*args)  # resume: nothing left to do
    assert second.returncode == 0, second.stderr[-3000:]
    assert read_runs(str(out / "runs.jsonl")) == runs
    assert "3 runs planned, 3 already done" in (out / "benchmark.log").read_text()
    bf16 = _benchmark(*args, "--precision", "bf16")  # runs of another precision never join these
    assert bf16.returncode != 0 and "another protocol" in bf16.stderr and "precision" in bf16.stderr
    saved = json.loads((out / "protocol.json").read_text())
    del saved["protocol"]["precision"]  # as written before the protocol named it: those runs were fp32
    (out / "protocol.json").write_text(json.dumps(saved))
    legacy = _benchmark(*args)
    assert legacy.returncode == 0, legacy.stderr[-3000:]
    records = (out / "runs.jsonl").read_text()
    lines = records.splitlines(keepends=True)
    stray = {**json.loads(lines[-1]), "precision": "bf16"}  # e.g. left by a run before the protocol named one
    (out / "runs.jsonl").write_text("".join(lines[:-1]) + json.dumps(stray) + "\n")
    mixed = _benchmark(*args)  # it would count as done and be paired with fp32 runs
    assert mixed.returncode != 0 and "another precision" in mixed.stderr and run_key(stray) in mixed.stderr
    (out / "runs.jsonl").write_text(records)

    more = _benchmark(*args, "--methods", "naive,isp,isp_linf_control,isp_linf")  # one more method, later
    assert more.returncode == 0, more.stderr[-3000:]
    log = (out / "benchmark.log").read_text()
    assert "reused from" in log and log.count("prefix for seed 0, gaussian: 1 epochs") == 1  # trained once
    added = read_runs(str(out / "runs.jsonl"))[-1]
    assert added["method"] == "isp_linf" and added["history"][0] == by_method["naive"]["history"][0]

    clean = _benchmark("run", "--profile", "smoke", "--out", str(out), "--noises", "none", "--seeds", "1",
                       "--methods", "naive")  # naive on clean images: tested on every noise's test images too
    assert clean.returncode == 0, clean.stderr[-3000:]
    record = read_runs(str(out / "runs.jsonl"))[-1]
    assert (record["method"], record["noise"]) == ("naive", "none")
    assert sorted(record["test_by_noise"]) == ["gaussian", "rician"]
    for by_tag in record["test_by_noise"].values():
        assert sorted(by_tag) == sorted(record["test_by_p"]) and sorted(by_tag["best"]) == ["0", "1"]
        assert by_tag["best"]["0"] == record["test_by_p"]["best"]["0"]  # p = 0: the same clean test images
    assert "Headroom: naive trained on clean images" in (out / "results.md").read_text()
    assert "naive, clean-trained" in (out / "results.md").read_text()

    changed = _benchmark(*args, "--epochs", "3")  # another protocol must not be mixed into this table
    assert changed.returncode != 0 and "another protocol" in changed.stderr


def test_label_noise_columns_balanced_accuracy_and_audit():
    runs = []
    for seed, (influence, loss) in enumerate([(0.6, 0.5), (0.8, 0.5)]):
        run = _record("audit", "none", seed, 0.7, 0.7)
        run["label_noise_rate"] = 0.2
        run["test"]["best"]["per_class"] = {"a": {"recall": 1.0, "support": 3}, "b": {"recall": 0.5, "support": 2},
                                            "c": {"recall": 0.0, "support": 0}}
        run["method_outputs"] = {"audit_summary.json": {"precision_at_k": [
            {"k": 5, "influence": 1.0, "loss": 1.0, "random": 0.2},
            {"k": 40, "influence": influence, "loss": loss, "random": 0.2}]}}
        runs.append(run)
    runs.append(_record("naive", "none", 0, 0.9, 0.9))
    summary = aggregate(runs, ["naive", "audit"])
    assert summary["columns"] == ["none", "none, labels r=0.2"]
    cell = summary["cells"]["audit"]["none, labels r=0.2"]
    assert cell["best_balanced_accuracy"]["mean"] == pytest.approx(0.75)  # class c is absent from the test split
    assert cell["audit"]["influence"]["mean"] == pytest.approx(0.7)  # the last k, averaged over seeds
    assert cell["audit"]["influence"]["std"] == pytest.approx(statistics.stdev([0.6, 0.8]))
    assert "| audit | none, labels r=0.2 | 70.0 +- 14.1 | 50.0 +- 0.0 | 20.0 +- 0.0 |" in markdown_tables(summary)


@pytest.mark.slow
def test_benchmark_with_flipped_labels_runs_the_audit_and_survives_a_failing_run(tmp_path):
    out = tmp_path / "labels"
    # co-teaching cannot fit its relabelling rounds into one epoch: that run fails, the audit still runs
    result = _benchmark("run", "--profile", "smoke", "--out", str(out), "--methods", "alr,audit",
                        "--noises", "none", "--label_noise_rates", "0.2", "--seeds", "1")
    assert result.returncode != 0 and "1 of 2 runs failed" in result.stderr
    (failure,) = json.loads((out / "failed.json").read_text())
    assert failure["method"] == "alr" and "relabelling rounds" in failure["error"]
    (run,) = read_runs(str(out / "runs.jsonl"))
    assert run["label_noise_rate"] == 0.2 and run["wrong_training_labels"] == round(0.2 * run["n"]["train"])
    assert run["method_outputs"]["audit_summary.json"]["wrong_labels"] == run["wrong_training_labels"]
    assert "Label audit" in (out / "results.md").read_text()


@pytest.mark.slow
def test_checkpoint_selection_study_on_tuning_seeds(tmp_path):
    out = tmp_path / "selection"
    refused = _benchmark("select", "--profile", "smoke", "--out", str(out), "--seeds", "0")
    assert refused.returncode != 0 and "seeds of the smoke profile's final table" in refused.stderr
    done = _benchmark("select", "--profile", "smoke", "--out", str(out), "--seeds", "100", "--noises", "gaussian")
    assert done.returncode == 0, done.stderr[-3000:]
    (record,) = read_runs(str(out / "selection.jsonl"))
    assert record["seed"] == 100 and record["epochs"] == [1, 2] and len(record["val_accuracy"]) == 2
    assert set(record["rules"]) == {"last", "best_accuracy", "lowest_loss", "best_accuracy_late", "ema"}
    assert record["rules"]["ema"]["epochs"] is None and record["ema_decay"] == 0.99
    assert len(record["ema_val_accuracy"]) == 2
    assert record["versions"] == run_provenance()["versions"]
    assert record["rules"]["last"]["epochs"] == [1, 1]  # 0-based: the second epoch, on both halves
    assert not {"test", "test_by_p"} & set(record)  # nothing evaluated on the test split
    assert "Decision:" in (out / "selection.md").read_text()
    assert not (out / "runs" / "naive__gaussian__p1__seed100" / "models").exists()  # snapshots removed


@pytest.mark.slow
def test_site_shift_profile_branches_per_preprocessing_and_evaluates_every_shift(tmp_path):
    from robustmri.data.site_shift import SHIFTS

    out = tmp_path / "shift"
    result = _benchmark("run", "--profile", "shift_cpu", "--out", str(out), "--seeds", "1",
                        "--methods", "naive_head_aug,isp_linf_head_aug", "--spatial_size", "32", "--epochs", "2",
                        "--influence_epoch", "1", "--synthetic_patients", "24", "--batch_size", "8")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = read_runs(str(out / "runs.jsonl"))
    assert [r["method"] for r in runs] == ["naive_head_aug", "isp_linf_head_aug"]
    for run in runs:
        assert run["preprocess"] == "head" and run["overrides"]["augment_site_shift_prob"] == 0.5
        for split in ("val", "test"):
            assert list(run[f"{split}_by_shift"]) == list(SHIFTS)
            assert {s["n"] for s in run[f"{split}_by_shift"].values()} == {run["n"][split] - run["shift_excluded"][split]}
        assert run["branched_after_epoch"] == 1
        # the unshifted rendering is the protocol's clean test split itself (the raw synthetic slices, prepared once)
        assert run["test_by_shift"]["none"]["accuracy"] == run["test_by_p"]["last"]["0"]["accuracy"]
    # both branched from one prefix trained with the head preprocessing and the augmentation
    assert runs[0]["history"][0] == runs[1]["history"][0]
    assert (out / "runs" / "prefix+augment_site_shift_prob=0.5+preprocess=head__gaussian__p1__seed0"
            / "prefix.json").is_file()
    assert "#### Site shifts" in (out / "results.md").read_text()
    assert (out / "shift_accuracy.png").stat().st_size > 1000


@pytest.mark.slow
def test_honest_shift_profile_trains_without_a_family_and_reports_by_severity(tmp_path):
    """shift2_cpu at its tiniest: the product's configuration, the landmark standardisation lever and the product
    without rotation augmentation, one seed."""
    from robustmri.data.shift_families import family_shifts

    out = tmp_path / "shift2"
    result = _benchmark("run", "--profile", "shift2_cpu", "--out", str(out), "--seeds", "1",
                        "--methods", "naive_head_aug,naive_head_landmarks_aug,naive_head_aug_minus_rotation",
                        "--spatial_size", "32",
                        "--epochs", "1", "--synthetic_patients", "12", "--batch_size", "8",
                        "--keep_checkpoints", "True")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = read_runs(str(out / "runs.jsonl"))
    assert [r["method"] for r in runs] == ["naive_head_aug", "naive_head_landmarks_aug", "naive_head_aug_minus_rotation"]
    assert [r["overrides"].get("augment_exclude") for r in runs] == [None, None, ["rotation"]]
    assert [r["preprocess"] for r in runs] == ["head", "head_landmarks", "head"]
    for run in runs:
        assert run["shift_catalog"] == "families"
        assert run["branched_after_epoch"] is None
        for split in ("val", "test"):
            assert list(run[f"{split}_by_shift"]) == list(family_shifts(32))
            rendered = run["n"][split] - run["shift_excluded"][split]
            assert {s["n"] for s in run[f"{split}_by_shift"].values()} == {rendered}
        assert run["test_by_shift"]["none"]["accuracy"] == run["test_by_p"]["last"]["0"]["accuracy"]
        # the model's own record says what its augmentation left out
        metadata = json.loads((out / "runs" / f"{run['method']}__gaussian__p1__seed0" / "models"
                               / "model_metadata.json").read_text())
        assert metadata["provenance"]["recipe"]["augment_exclude"] == run["overrides"].get("augment_exclude", [])
    # site calibration and the abstention scores per shift for the full configuration only (the profile's
    # shift_measures)
    *measured, left_out = runs
    assert "calibrated_by_shift" not in left_out and "abstention_by_shift" not in left_out
    for run in measured:
        # a tiny validation split may leave too few images per predicted class to calibrate: skipped with a reason
        assert set(run["calibrated_by_shift"]) | set(run["calibration_skipped"]) == set(family_shifts(32))
        assert all(isinstance(reason, str) and reason for reason in run["calibration_skipped"].values())
        assert run["abstention_by_shift"]["choice"] in SCORES
        assert {f"test / {shift}" for shift in family_shifts(32)} <= set(run["abstention_by_shift"]["sets"])
    # both preprocessings see the same slices: what one cannot render is left out of both
    assert runs[0]["test_by_shift"]["none"]["n"] == runs[1]["test_by_shift"]["none"]["n"]
    assert (out / "shifted" / "families" / "32px").is_dir()
    report = (out / "results.md").read_text()
    assert "#### Abstention under the shifts" in report
    for heading in ("**In-range** shifts", "**Out-of-range** shifts", "**New family** shifts", "**Left out**"):
        assert report.count(heading) == 2, heading  # test and validation split
    assert "| `naive_head_aug_minus_rotation` | rotation | `rotate_20` (out-of-range) |" in report


#: Runs the benchmark command given after ``--`` with one run killed by SIGKILL, at a training iteration
#: (``train``, 1-based and global) or when its checkpoints are first evaluated (``evaluate``).
KILLING_DRIVER = """
import os, sys
import fire
from ignite.engine import Events
from robustmri.bench import benchmark

run_name, where, iteration, command = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:]

def execute(workflow):
    workflow.initialize()
    if where == "train" and os.path.basename(os.path.dirname(workflow.parser["ckpt_dir"])) == run_name:
        workflow.parser.get_parsed_content("train#trainer").add_event_handler(
            Events.ITERATION_COMPLETED(once=iteration), lambda engine: os.kill(os.getpid(), 9))
    workflow.run()
    workflow.finalize()

evaluate = benchmark.evaluate_checkpoints_on

def evaluate_or_die(network, checkpoints, *args, **kwargs):
    if where == "evaluate" and f"{os.sep}{run_name}{os.sep}" in str(checkpoints["last"]):
        os.kill(os.getpid(), 9)
    return evaluate(network, checkpoints, *args, **kwargs)

benchmark.execute, benchmark.evaluate_checkpoints_on = execute, evaluate_or_die
fire.Fire(benchmark.Benchmark(os.path.join(sys.argv[1], "bundle")), command=command)
"""


def _without_timings(value):
    """A run record without what differs between two runs of the same training: wall times and dates."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items()
                if k not in ("timings", "finished", "resumed_after_epoch") and not k.endswith("_s")}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


@pytest.mark.slow
def test_a_benchmark_killed_inside_runs_resumes_them_to_the_records_of_an_uninterrupted_one(tmp_path):
    # fp32 fixed: ``precision: auto`` times fp32 against bf16 in each process, so on a busy machine one process of
    # the interrupted benchmark can choose otherwise than the uninterrupted one
    args = ["run", "--profile", "smoke", "--noises", "gaussian", "--seeds", "1", "--methods", "naive,isp",
            "--epochs", "4", "--influence_epoch", "2", "--precision", "fp32"]
    whole = _benchmark(*args, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    expected = {r["method"]: r for r in read_runs(str(tmp_path / "whole" / "runs.jsonl"))}
    assert sorted(expected) == ["isp", "naive"] and expected["isp"]["resumed_after_epoch"] is None
    per_epoch = -(-expected["naive"]["n"]["train"] // 8)
    driver = tmp_path / "driver.py"
    driver.write_text(KILLING_DRIVER)
    out = tmp_path / "killed"

    def killed(run_name, where, iteration=0):
        result = subprocess.run([sys.executable, str(driver), str(ROOT), run_name, where, str(iteration), *args,
                                 "--out", str(out)], capture_output=True, text=True, timeout=600,
                                env={**os.environ, "BRAIN_TUMOR_DATA": ""})
        return result

    # the shared prefix killed in its 2nd epoch; then ISP killed in its 4th (its own state after epoch 3);
    # then ISP killed after its training finished, while its checkpoints are evaluated
    for run_name, where, iteration in (("prefix__gaussian__p1__seed0", "train", per_epoch + per_epoch // 2),
                                       ("isp__gaussian__p1__seed0", "train", 3 * per_epoch + per_epoch // 2),
                                       ("isp__gaussian__p1__seed0", "evaluate", 0)):
        result = killed(run_name, where, iteration)
        assert result.returncode == -9, (run_name, where, result.stderr[-3000:])
    assert [r["method"] for r in read_runs(str(out / "runs.jsonl"))] == ["naive"]  # naive finished in between

    last = _benchmark(*args, "--out", str(out))  # the same command again
    assert last.returncode == 0, last.stderr[-3000:]
    log = (out / "benchmark.log").read_text()
    assert "prefix__gaussian__p1__seed0: resuming after epoch 1 of 2" in log
    assert "isp__gaussian__p1__seed0: resuming after epoch 3 of 4" in log
    assert "isp__gaussian__p1__seed0: training had finished; evaluating" in log
    got = {r["method"]: r for r in read_runs(str(out / "runs.jsonl"))}
    assert got["isp"]["resumed_after_epoch"] == 3 and got["isp"]["timings"]["train_s"] is None
    assert got["naive"]["resumed_after_epoch"] is None and got["naive"]["timings"]["train_s"] is None  # its prefix was
    for method in ("naive", "isp"):
        assert _without_timings(got[method]) == _without_timings(expected[method]), method
    assert got["isp"]["test_by_p"] == expected["isp"]["test_by_p"]  # bootstrap intervals included


@pytest.mark.slow
def test_an_unknown_option_is_one_line_and_starts_nothing(tmp_path):
    result = _benchmark("run", "--profile", "smoke", "--out", str(tmp_path / "bench"), "--help")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("benchmark.py: unknown option(s) --help")
    assert not (tmp_path / "bench").exists()


@pytest.mark.slow
def test_a_profile_that_cannot_branch_is_one_line_and_starts_nothing(tmp_path):
    # the smoke profile's runs branch after influence_epoch 1: one epoch leaves them nothing to train
    result = _benchmark("run", "--profile", "smoke", "--out", str(tmp_path / "bench"), "--epochs", "1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "benchmark.py: the smoke profile's runs branch after influence_epoch 1, so --epochs 1 leaves them nothing")
    assert not (tmp_path / "bench").exists()
