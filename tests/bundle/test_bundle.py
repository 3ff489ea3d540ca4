"""The bundle as users run it: ``python -m monai.bundle ...`` from ``bundle/``, on a tiny embedded set."""

import json

import pytest
import torch

from conftest import BUNDLE, MONAI_SCHEMA_SHA256
from helpers import TINY, bundle, gradient_image, output_dirs, write_png
from robustmri import INTENDED_USE
from robustmri.data.protocol import build_protocol
from robustmri.engine.predictions import predict_items
from robustmri.engine.checkpoint import load_weights
from robustmri.evaluation.metrics import classification_report
from robustmri.networks import PaperCNN

CONFIGS = {
    "train": "configs/train.json",
    "evaluate": "['configs/train.json','configs/evaluate.json']",
    "inference": "configs/inference.json",
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    dirs = output_dirs(out)
    bundle("run", "training", "--config_file", CONFIGS["train"], "--epochs", "1", *TINY, *dirs)
    return out, dirs


@pytest.mark.slow
def test_training_writes_checkpoints_and_history(trained):
    out, _ = trained
    assert (out / "models" / "model.pt").is_file() and (out / "models" / "model_best_val.pt").is_file()
    history = json.loads((out / "eval" / "history.json").read_text())
    assert len(history) == 1 and 0.0 <= history[0]["val_accuracy"] <= 1.0 and history[0]["train_loss"] > 0
    assert (out / "eval" / "training_curves.png").stat().st_size > 1000


@pytest.mark.slow
def test_evaluation_reports_best_and_last_at_the_size_the_model_was_trained_with(trained):
    out, dirs = trained
    # no --spatial_size / --network_padding: evaluate.json reads them beside the checkpoint (trained_model.json)
    bundle("run", "evaluating", "--config_file", CONFIGS["evaluate"], "--synthetic_patients", "30", *dirs)
    summary = json.loads((out / "eval" / "test" / "summary.json").read_text())
    assert set(summary) == {"best", "last", "intended_use"} and summary["intended_use"] == INTENDED_USE
    for tag in ("best", "last"):
        metrics = json.loads((out / "eval" / "test" / tag / "metrics.json").read_text())
        assert metrics["n"] == summary[tag]["n"] > 0 and metrics["intended_use"] == INTENDED_USE
        assert sum(map(sum, metrics["confusion_matrix"]["counts"])) == metrics["n"]
        assert (out / "eval" / "test" / tag / "metrics_per_class.csv").is_file()
    # what was evaluated is the checkpoint itself: model.pt loaded by hand gives the same confusion matrix and ROC-AUC
    # with the preprocessing the model records (train.json's default, head)
    preprocess = json.loads((out / "models" / "model_metadata.json").read_text())["trained_with"]["preprocess"]
    assert preprocess == "head"
    data = build_protocol(None, spatial_size=32, synthetic_patients=30, preprocess=preprocess)
    network = load_weights(PaperCNN(spatial_size=32, padding=2), str(out / "models" / "model.pt")).eval()
    logits, labels, _ = predict_items(network, data.test)
    mine = classification_report(labels.numpy(), torch.softmax(logits, dim=1).numpy(), ["a", "b", "c"])
    metrics = json.loads((out / "eval" / "test" / "last" / "metrics.json").read_text())
    assert metrics["confusion_matrix"]["counts"] == mine["confusion_matrix"]["counts"]
    # the probabilities too (ROC-AUC moves with any of them), not just the arg-max of a barely trained model
    assert summary["last"]["roc_auc_macro"] == pytest.approx(mine["roc_auc_macro"], abs=1e-9)
    assert summary["last"]["checkpoint"].endswith("model.pt")


@pytest.mark.slow
def test_inference_on_files_reads_the_size_the_model_was_trained_with(trained, tmp_path):
    out, dirs = trained
    good = write_png(tmp_path / "in" / "a.png", gradient_image(48))
    (tmp_path / "in" / "b.png").write_bytes(b"nope")
    result_file = tmp_path / "pred.json"
    # no --spatial_size / --network_padding: inference.json reads them from models/model_metadata.json
    bundle("run", "inference", "--config_file", CONFIGS["inference"], "--synthetic_patients", "30", *dirs,
           "--input_files", str(tmp_path / "in"), "--output_file", str(result_file))
    result = json.loads(result_file.read_text())
    assert result["n_assessable"] + result["n_not_assessable"] == 1 and result["n_failed"] == 1
    assert result["intended_use"] == INTENDED_USE
    prediction = result["predictions"][0]
    # scored by the abstention state training wrote beside the model: a class only when assessable
    assert result["abstention"]["threshold"] > 0 and (out / "models" / "model_abstention.pt").is_file()
    assert prediction["assessable"] == (prediction["abstention_score"] <= result["abstention"]["threshold"])
    assert prediction["file"] == str(good) and prediction["class"] in (
        ("meningioma", "glioma", "pituitary") if prediction["assessable"] else (None,))
    assert abs(sum(prediction["probabilities"].values()) - 1) < 1e-5
    assert "not a readable image" in result["errors"][0]["error"]


def test_metadata_passes_monais_published_schema_which_checks_every_tensor(monai_schema, tmp_path):
    # in-process for speed; tests/bundle/test_monai_tools.py runs the command as typed
    from monai.bundle import verify_metadata

    schema = {"filepath": str(monai_schema), "hash_val": MONAI_SCHEMA_SHA256, "hash_type": "sha256"}
    verify_metadata(meta_file=str(BUNDLE / "configs" / "metadata.json"), **schema)
    broken = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    del broken["network_data_format"]["outputs"]["pred"]["value_range"]
    (tmp_path / "meta.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="'value_range' is a required property"):
        verify_metadata(meta_file=str(tmp_path / "meta.json"), **schema)


@pytest.mark.slow
def test_metadata_states_the_library_intended_use_and_training_copies_it(trained):
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    assert meta["intended_use"] == INTENDED_USE and "does not detect tumours" in meta["description"]
    out, _ = trained
    assert json.loads((out / "models" / "model_metadata.json").read_text())["intended_use"] == INTENDED_USE


def test_metadata_version_is_in_changelog_and_is_the_library_version_it_requires():
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"] and meta["required_packages_version"]["robustmri"] == meta["version"]
    assert {"pytorch-ignite", "pydicom", "h5py"} <= set(meta["required_packages_version"])


def test_metadata_says_the_network_returns_logits_and_the_bundle_applies_softmax():
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())["network_data_format"]
    assert meta["outputs"]["pred"]["type"] == "logits" and meta["outputs"]["pred"]["value_range"] == []
    assert meta["post_processed_outputs"]["pred"]["type"] == "probabilities"
    train = json.loads((BUNDLE / "configs" / "train.json").read_text())
    assert train["train"]["postprocessing"]["transforms"] == [{"_target_": "Activationsd", "keys": "pred",
                                                                "softmax": True}]
    torch.manual_seed(0)
    network = PaperCNN(spatial_size=train["spatial_size"], padding=train["network_padding"]).eval()
    with torch.no_grad():
        logits = network(torch.rand(4, 1, train["spatial_size"], train["spatial_size"]))
    assert logits.shape == (4, meta["outputs"]["pred"]["num_channels"])
    assert not torch.allclose(logits.sum(dim=1), torch.ones(4))  # not probabilities: the softmax is not in forward


@pytest.mark.slow
@pytest.mark.parametrize("config", ["train", "inference"])
def test_verify_net_in_out_on_the_bundle_as_shipped(config, tmp_path):
    # an empty ckpt_dir: the bundle without a trained model, as model-zoo CI checks it (a model trained here,
    # e.g. by make demo, is checked with its own metadata in the test below)
    bundle("verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
           "--config_file", CONFIGS[config], "--ckpt_dir", str(tmp_path), "--device", "cpu")


@pytest.mark.slow
def test_training_writes_what_the_model_was_trained_with_beside_the_checkpoint(trained):
    out, _ = trained
    metadata = json.loads((out / "models" / "model_metadata.json").read_text())
    assert metadata["trained_with"]["spatial_size"] == 32 and metadata["trained_with"]["network_padding"] == 2
    assert metadata["trained_with"]["ema_decay"] == 0.99 and "moving average" in metadata["trained_with"]["model_weights"]
    assert metadata["network_data_format"]["inputs"]["image"]["spatial_shape"] == [32, 32]
    # where the data lie is kept beside, never in the metadata that travels (None: the embedded set)
    assert json.loads((out / "models" / "training_data.json").read_text()) == {"dataset_dir": None}
    shipped = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    assert metadata["version"] == shipped["version"] and metadata["changelog"] == shipped["changelog"]
    assert metadata["trained_with"]["data"]["source"].startswith("embedded synthetic set")


@pytest.mark.slow
def test_ckpt_export_and_verify_net_in_out_read_the_trained_settings(trained, tmp_path):
    """The documented commands after training at 32 x 32: no size given, the TorchScript metadata says 32."""
    import torch

    out, dirs = trained
    ts = tmp_path / "model.ts"
    meta = str(out / "models" / "model_metadata.json")
    bundle("ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file", str(out / "models" / "model.pt"),
           "--meta_file", meta, "--config_file", CONFIGS["inference"], "--ckpt_dir", str(out / "models"))
    extra = {"metadata.json": ""}
    model = torch.jit.load(str(ts), _extra_files=extra)
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 3)
    assert json.loads(extra["metadata.json"])["network_data_format"]["inputs"]["image"]["spatial_shape"] == [32, 32]
    bundle("verify_net_in_out", "network_def", "--meta_file", meta, "--config_file", CONFIGS["inference"],
           "--ckpt_dir", str(out / "models"), "--device", "cpu")
