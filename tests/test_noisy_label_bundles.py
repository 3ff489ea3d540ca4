"""The noisy-label workflows as users run them, on the tiny embedded set with 20% flipped labels."""

import csv
import json

import pytest
from conftest import BUNDLE
from test_bundle import TINY, bundle

METHODS = ("coteach_vog", "mwnet", "pie", "pint", "audit")
NOISY = ["--label_noise", "symmetric", "--label_noise_rate", "0.2"]


@pytest.mark.parametrize("method", METHODS)
def test_noisy_label_configs_reuse_every_train_setting(method):
    train = json.loads((BUNDLE / "configs" / "train.json").read_text())
    derived = json.loads((BUNDLE / "configs" / f"{method}.json").read_text())
    missing = [key for key in train if key not in derived]
    assert not missing, f"{method}.json lacks {missing}: add them as '%configs/train.json#<key>'"
    copied = [k for k in train if derived[k] != f"%configs/train.json#{k}" and k not in ("loss", "method_handlers")]
    assert not copied, f"{method}.json overrides {copied}; reuse train.json instead of copying"


def _run(tmp_path, method, *extra):
    dirs = ["--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval")]
    bundle("run", "training", "--config_file", f"configs/{method}.json", *TINY, *NOISY, *dirs, *extra)
    assert (tmp_path / "models" / "model_final.pt").is_file()
    return tmp_path / "eval"


@pytest.mark.slow
@pytest.mark.parametrize("oracle", ["true", "noisy"])
def test_coteach_vog_runs_rounds_of_exactly_the_budget(tmp_path, oracle):
    out = _run(tmp_path, "coteach_vog", "--epochs", "5", "--alr_budget", "3", "--alr_oracle", oracle)
    summary = json.loads((out / "coteach_vog_summary.json").read_text())
    assert summary["phase1_epochs"] == 3 and summary["round_epochs"] == 1 and len(summary["rounds"]) == 2
    assert summary["kept"]["n_kept"] > 0 and set(summary["kept"]["clean_recall_by_class"]) == {"0", "1", "2"}
    for k, record in enumerate(summary["rounds"], start=1):
        assert record["relabelled"] == 3 and record["total_relabelled"] == 3 * k
        if oracle == "noisy":  # repeating the given labels corrects nothing
            assert record["labels_changed"] == 0 and record["wrong_labels_after"] == record["wrong_labels_before"]
        else:
            assert record["wrong_labels_after"] == record["wrong_labels_before"] - record["labels_changed"]
    assert all("val_balanced_accuracy" in e and "val_macro_f1" in e for e in summary["epochs"])


@pytest.mark.slow
def test_mwnet_runs_and_reports_weights(tmp_path):
    summary = json.loads((_run(tmp_path, "mwnet", "--epochs", "2") / "mwnet_summary.json").read_text())
    assert len(summary["history"]) == 2 and all(0 < w < 1 for w in summary["history"][-1]["weight_by_loss"].values())
    assert set(summary["final_mean_weight"]) == {"wrong_labels", "correct_labels"}


@pytest.mark.slow
def test_pie_runs_and_writes_the_hard_set(tmp_path):
    out = _run(tmp_path, "pie", "--epochs", "2", "--pie_epoch", "1", "--pie_sparsity", "0.5", "--pie_finetune_steps", "3")
    summary = json.loads((out / "pie_summary.json").read_text())
    rows = list(csv.DictReader(open(out / "pie_hard_samples.csv")))
    assert summary["n_hard"] == len(rows) and abs(summary["achieved_sparsity"] - 0.5) < 0.01


@pytest.mark.slow
def test_pint_runs_with_the_teacher_after_warmup(tmp_path):
    summary = json.loads((_run(tmp_path, "pint", "--epochs", "2", "--pint_warmup_epochs", "1") / "pint_summary.json")
                         .read_text())
    assert summary["history"][0]["warmup"] and not summary["history"][1]["warmup"]
    # the uncertain share follows the label-noise rate (rank-based: round(0.2 x 8) = 2 of each batch of 8)
    assert summary["uncertain_fraction"] == 0.2
    assert summary["history"][1]["uncertain_share"] == pytest.approx(0.2, abs=0.06)
    assert sum(summary["history"][1]["pseudo_label_class_shares"]) == pytest.approx(1.0)


@pytest.mark.slow
def test_audit_reports_precision_at_k_against_baselines(tmp_path):
    out = _run(tmp_path, "audit", "--epochs", "2")
    report = json.loads((out / "label_audit.json").read_text())
    assert report["wrong_labels"] == round(0.2 * report["n"])
    assert report["precision_at_k"] and {"influence", "loss", "random"} <= set(report["precision_at_k"][0])
    rows = list(csv.DictReader(open(out / "label_audit.csv")))
    assert len(rows) == report["n"] and "true_label" not in rows[0]
