"""The bundle as users run it: ``python -m monai.bundle ...`` from ``bundle/``, on a tiny embedded set."""

import json
import os
import subprocess
import sys

import pytest
from conftest import BUNDLE

TINY = ["--spatial_size", "32", "--network_padding", "2", "--synthetic_patients", "30", "--batch_size", "8"]
CONFIGS = {
    "train": "configs/train.json",
    "evaluate": "['configs/train.json','configs/evaluate.json']",
    "inference": "['configs/train.json','configs/inference.json']",
}


def bundle(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=BUNDLE, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "BRAIN_TUMOR_DATA": ""})
    if check and result.returncode != 0:
        raise AssertionError(f"monai.bundle {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    dirs = ["--ckpt_dir", str(out / "models"), "--output_dir", str(out / "eval")]
    bundle("run", "training", "--config_file", CONFIGS["train"], "--epochs", "1", *TINY, *dirs)
    return out, dirs


@pytest.mark.slow
def test_training_writes_checkpoints_and_history(trained):
    out, _ = trained
    assert (out / "models" / "model.pt").is_file() and (out / "models" / "model_final.pt").is_file()
    history = json.loads((out / "eval" / "history.json").read_text())
    assert len(history) == 1 and 0.0 <= history[0]["val_accuracy"] <= 1.0 and history[0]["train_loss"] > 0
    assert (out / "eval" / "training_curves.png").stat().st_size > 1000


@pytest.mark.slow
def test_evaluation_reports_best_and_last(trained):
    out, dirs = trained
    bundle("run", "evaluating", "--config_file", CONFIGS["evaluate"], *TINY, *dirs)
    summary = json.loads((out / "eval" / "test" / "summary.json").read_text())
    assert set(summary) == {"best", "last"}
    for tag in ("best", "last"):
        metrics = json.loads((out / "eval" / "test" / tag / "metrics.json").read_text())
        assert metrics["n"] == summary[tag]["n"] > 0
        assert sum(map(sum, metrics["confusion_matrix"]["counts"])) == metrics["n"]
        assert (out / "eval" / "test" / tag / "metrics_per_class.csv").is_file()


@pytest.mark.slow
def test_inference_on_files(trained, tmp_path):
    from helpers import gradient_image, write_png

    out, dirs = trained
    good = write_png(tmp_path / "in" / "a.png", gradient_image(48))
    (tmp_path / "in" / "b.png").write_bytes(b"nope")
    result_file = tmp_path / "pred.json"
    bundle("run", "inference", "--config_file", CONFIGS["inference"], *TINY, *dirs,
           "--input_files", str(tmp_path / "in"), "--output_file", str(result_file))
    result = json.loads(result_file.read_text())
    assert result["n_classified"] == 1 and result["n_failed"] == 1
    prediction = result["predictions"][0]
    assert prediction["file"] == str(good) and prediction["class"] in ("meningioma", "glioma", "pituitary")
    assert abs(sum(prediction["probabilities"].values()) - 1) < 1e-5
    assert "not a readable image" in result["errors"][0]["error"]


def test_verify_metadata_passes_offline_and_catches_missing_keys(tmp_path):
    schema = "configs/metadata_schema.json"
    bundle("verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", schema)
    broken = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    del broken["changelog"]
    (tmp_path / "meta.json").write_text(json.dumps(broken))
    result = bundle("verify_metadata", "--meta_file", str(tmp_path / "meta.json"), "--filepath", schema, check=False)
    assert result.returncode != 0 and "changelog" in result.stdout + result.stderr


def test_metadata_version_is_in_changelog():
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    assert {"pytorch-ignite", "pydicom", "h5py"} <= set(meta["required_packages_version"])


def test_verify_net_in_out():
    bundle("verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
           "--config_file", CONFIGS["train"], "--device", "cpu")


@pytest.mark.slow
def test_ckpt_export(trained, tmp_path):
    out, _ = trained
    ts = tmp_path / "model.ts"
    bundle("ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file", str(out / "models" / "model.pt"),
           "--meta_file", "configs/metadata.json", "--config_file", CONFIGS["train"], *TINY)
    import torch

    model = torch.jit.load(str(ts))
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 3)


@pytest.mark.parametrize("method", ["isr", "isp", "at", "n2v"])
def test_method_configs_reuse_every_train_setting(method):
    train = json.loads((BUNDLE / "configs" / "train.json").read_text())
    derived = json.loads((BUNDLE / "configs" / f"{method}.json").read_text())
    missing = [key for key in train if key not in derived]
    assert not missing, f"{method}.json lacks {missing}: add them as '%configs/train.json#<key>'"
    allowed = ("loss", "method_handlers") + (("data",) if method == "n2v" else ())  # n2v wraps data: denoised
    copied = [k for k in train if derived[k] != f"%configs/train.json#{k}" and k not in allowed]
    assert not copied, f"{method}.json overrides {copied}; reuse train.json instead of copying"


@pytest.mark.slow
@pytest.mark.parametrize("method, column", [("isr", "weight"), ("isp", "perturbation_linf")])
def test_influence_workflows_run_end_to_end(tmp_path, method, column):
    import csv

    dirs = ["--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval")]
    bundle("run", "training", "--config_file", f"configs/{method}.json", "--epochs", "2", "--influence_epoch", "1",
           *TINY, *dirs)
    rows = list(csv.DictReader(open(tmp_path / "eval" / "influence.csv")))
    assert rows and {"id", "file", "label", "score", column} <= set(rows[0])
    summary = json.loads((tmp_path / "eval" / "influence_summary.json").read_text())
    assert summary["method"] == method.upper() and summary["n_train"] == len(rows)
    values = [float(r[column]) for r in rows]
    if method == "isr":
        assert min(values) == pytest.approx(1.0) and max(values) == pytest.approx(2.0)
    else:
        assert max(values) > 0
    for picture in ("influence_histogram.png", "influence_examples.png"):
        assert (tmp_path / "eval" / picture).stat().st_size > 1000
    assert (tmp_path / "models" / "model_final.pt").is_file()
