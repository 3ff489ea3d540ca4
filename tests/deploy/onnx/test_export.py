"""ONNX export: graph, metadata, parity with PyTorch; the runtime's provider choice and metadata checks."""

import hashlib
import json
import logging
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from robustmri import CLASS_NAMES, INTENDED_USE
from robustmri.data.preprocessing import INTENSITY_NORMALISATION
from robustmri.data.protocol import build_protocol
from robustmri.deploy.onnx.export import ParityError, ProbabilityHead, check_parity, export_onnx, split_images
from robustmri.deploy.onnx.export_checkpoint import export_checkpoint
from robustmri.engine.trained_model import parse_network_def, recorded_protocol, recorded_provenance, trained_config
from robustmri.deploy.onnx.runtime import CPU, CUDA, ModelMetadataError, OnnxClassifier, choose_providers
from robustmri.networks import PaperCNN

from conftest import BUNDLE, ROOT
from deploy_helpers import TINY_SIZE, export_tiny, rewrite_metadata, tiny_network, write_trained


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    data = build_protocol(None, spatial_size=TINY_SIZE, synthetic_patients=20, seed=1, preprocess="minmax")
    test_images = split_images(data, "test")
    network, checkpoint, onnx_file, result = export_tiny(tmp, parity_images=test_images)
    return network, checkpoint, onnx_file, result, test_images


@pytest.mark.slow
def test_graph_has_named_io_dynamic_batch_and_passes_the_checker(exported):
    _, _, onnx_file, result, _ = exported
    model = onnx.load(onnx_file)
    onnx.checker.check_model(model, full_check=True)
    (image,), (pred, score) = model.graph.input, model.graph.output
    assert image.name == "image" and pred.name == "pred" and score.name == "ood_score"
    dims = image.type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value  # symbolic batch axis
    (score_dim,) = score.type.tensor_type.shape.dim  # [N]: one score per image, same symbolic batch axis
    assert score_dim.dim_param == dims[0].dim_param
    assert [d.dim_value for d in dims[1:]] == [1, TINY_SIZE, TINY_SIZE]
    assert image.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert result["opset"] >= 18


@pytest.mark.slow
def test_metadata_says_what_inference_needs(exported):
    _, checkpoint, onnx_file, _, _ = exported
    meta = {p.key: p.value for p in onnx.load(onnx_file).metadata_props}
    assert json.loads(meta["class_names"]) == list(CLASS_NAMES)
    assert int(meta["spatial_size"]) == TINY_SIZE
    assert meta["intensity_normalisation"] == INTENSITY_NORMALISATION
    assert meta["model_version"] == "9.9.9"
    assert meta["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert meta["intended_use"] == INTENDED_USE and INTENDED_USE in onnx.load(onnx_file).doc_string
    assert meta["ood_detector"] == "mahalanobis_tied_penultimate" and float(meta["ood_target_acceptance"]) == 0.95
    assert "higher = more out of distribution" in meta["ood_detector_description"]
    assert float(meta["ood_series_max_not_assessable"]) == 0.5 and "more than 50%" in meta["ood_abstention_rule"]
    assert int(meta["ood_n_train"]) > 0 and np.isfinite(float(meta["ood_threshold"]))
    assert meta["network"] == ("robustmri.networks.paper_cnn.PaperCNN(kernel_size=5, padding=2, feature_dim=8); "
                               "4,623 parameters; final layer classifier: Linear(8, 3)")


@pytest.mark.slow
def test_parity_on_the_test_split(exported):
    network, _, onnx_file, result, test_images = exported
    parity = result["parity"]
    assert parity["passed"] and parity["n"] == len(test_images) > 0
    assert parity["max_abs_diff"] <= 1e-4 and parity["class_mismatches"] == 0
    assert parity["ood_score_max_rel_diff"] <= parity["ood_score_rtol"] == 1e-3
    # independently: onnxruntime on odd batch sizes against PyTorch's softmax of the logits
    classifier = OnnxClassifier(onnx_file, device="cpu")
    for batch in (test_images[:1], test_images[:7]):
        got = classifier.predict(batch)
        with torch.no_grad():
            expected = torch.softmax(network(torch.from_numpy(batch)), 1).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-4)
        np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))
        np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_parity_check_catches_a_different_model(exported):
    _, _, onnx_file, _, test_images = exported
    other = ProbabilityHead(tiny_network(seed=5))
    with pytest.raises(ParityError, match="differs from PyTorch"):
        check_parity(onnx_file, other, test_images)


def test_export_refuses_class_names_that_do_not_fit(tmp_path):
    with pytest.raises(ValueError, match="do not match"):
        export_onnx(tiny_network(), tmp_path / "m.onnx", ["a", "b"], TINY_SIZE)


@pytest.mark.slow
def test_runtime_refuses_other_normalisation_or_missing_metadata(exported, tmp_path):
    """Models intact (digest recomputed as an exporter would) but saying what this library cannot reproduce."""
    _, _, onnx_file, _, _ = exported
    other = rewrite_metadata(onnx_file, tmp_path / "z.onnx", reseal=True, intensity_normalisation="z-score")
    with pytest.raises(ModelMetadataError, match="z-score"):
        OnnxClassifier(other, device="cpu")
    with pytest.raises(ValueError, match=r"lacks \['spatial_size'\], which change the model's output"):
        rewrite_metadata(onnx_file, tmp_path / "bare.onnx", reseal=True, spatial_size=None)
    bare = rewrite_metadata(onnx_file, tmp_path / "bare.onnx", reseal=True, network=None)
    with pytest.raises(ModelMetadataError, match="network"):
        OnnxClassifier(bare, device="cpu")
    with pytest.raises(FileNotFoundError):
        OnnxClassifier(tmp_path / "missing.onnx")


@pytest.mark.slow
def test_classifier_checks_input_shape(exported):
    classifier = OnnxClassifier(exported[2], device="cpu")
    assert classifier.class_names == list(CLASS_NAMES) and classifier.spatial_size == TINY_SIZE
    with pytest.raises(ValueError, match="expected images"):
        classifier.predict(np.zeros((2, 1, 16, 16), np.float32))


@pytest.mark.parametrize("available, device, expected", [
    ([CUDA, CPU], "auto", [CUDA, CPU]),
    ([CUDA, CPU], "cuda", [CUDA, CPU]),
    ([CUDA, CPU], "cpu", [CPU]),
    ([CPU], "auto", [CPU]),
    (["AzureExecutionProvider", CPU], "auto", [CPU]),
])
def test_provider_choice(monkeypatch, available, device, expected):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: list(available))
    assert choose_providers(device) == expected


def test_cuda_asked_for_without_it_says_what_to_install(monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CPU])
    with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
        choose_providers("cuda")
    with pytest.raises(ValueError, match="device must be"):
        choose_providers("tpu")


@pytest.mark.slow
def test_reported_provider_is_the_one_that_runs(exported, monkeypatch, caplog):
    """A CUDA provider listed but not usable (CPU-only build or no GPU): the session runs on CPU and says so."""
    import onnxruntime

    if CUDA in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime really has CUDA")
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CUDA, CPU])
    with caplog.at_level(logging.WARNING, logger="robustmri.deploy.onnx.runtime"):
        classifier = OnnxClassifier(exported[2], device="auto")
    assert classifier.provider == CPU and classifier.describe()["provider"] == CPU
    assert "not usable" in caplog.text


def test_trained_config_reuses_train_json():
    """The deployment workflows' own parts set only their ids: the generated configs take the rest from train.json."""
    train = json.loads((BUNDLE / "configs" / "train.json").read_text())
    for name in ("export.json", "infer_dicom.json"):
        config = json.loads((BUNDLE / "configs" / "parts" / name).read_text())
        overridden = sorted(set(config) & set(train) - {"imports", "initialize", "run"})
        assert not overridden, f"{name} redefines {overridden} of train.json; merge instead of copying"


@pytest.mark.slow
def test_deployment_modules_do_not_need_torch():
    import subprocess
    import sys

    code = ("import sys, robustmri.deploy.onnx.runtime, robustmri.deploy.dicom.study, robustmri.deploy.dicom.sr; "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr[-2000:]


# -- export of a bundle checkpoint (scripts/export_onnx.py): the network from the bundle's network_def, its size from model_metadata.json --------


def _metadata(onnx_file) -> dict:
    return {p.key: p.value for p in onnx.load(onnx_file).metadata_props}


def _with_batchnorm_statistics(network: torch.nn.Module) -> torch.nn.Module:
    """``network`` in eval mode with non-trivial BatchNorm statistics, so export parity checks them too."""
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return network.eval()


def _bundle_paper_cnn(seed: int = 0) -> PaperCNN:
    """train.json's network_def at 32 x 32, padding 2, with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    network = PaperCNN(in_channels=1, num_classes=3, spatial_size=TINY_SIZE, padding=2)
    return _with_batchnorm_statistics(network)


@pytest.mark.slow
def test_script_rebuilds_the_network_as_trained_without_size_arguments(tmp_path, monkeypatch):
    """As after ``make demo``: only --checkpoint and --output; 32 x 32 and padding 2 come from model_metadata.json."""
    monkeypatch.setenv("BRAIN_TUMOR_DATA", "")
    network = _bundle_paper_cnn()
    checkpoint = write_trained(tmp_path / "models", network, TINY_SIZE, network_padding=2)
    onnx_file = tmp_path / "models" / "model.onnx"
    result = export_checkpoint(BUNDLE, checkpoint=str(checkpoint), output=str(onnx_file), synthetic_patients=20)
    meta = _metadata(onnx_file)
    assert int(meta["spatial_size"]) == TINY_SIZE and "padding=2" in meta["network"]
    assert meta["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert result["parity"]["passed"] and result["parity"]["n"] > 0
    images = np.random.default_rng(0).random((3, 1, TINY_SIZE, TINY_SIZE), dtype=np.float32)
    with torch.no_grad():
        expected = torch.softmax(network(torch.from_numpy(images)), 1).numpy()
    np.testing.assert_allclose(OnnxClassifier(onnx_file, device="cpu").predict(images), expected, atol=1e-4)


@pytest.mark.slow
def test_script_sizes_given_on_the_command_line_win(tmp_path, monkeypatch):
    monkeypatch.setenv("BRAIN_TUMOR_DATA", "")
    checkpoint = write_trained(tmp_path / "models", _bundle_paper_cnn(), TINY_SIZE, network_padding=2)
    config = trained_config(BUNDLE, str(checkpoint))
    assert config.get_parsed_content("spatial_size") == TINY_SIZE and config.get_parsed_content("network_padding") == 2
    config = trained_config(BUNDLE, str(checkpoint), spatial_size=48, network_padding=3)
    assert config.get_parsed_content("spatial_size") == 48 and config.get_parsed_content("network_padding") == 3
    network = config.get_parsed_content("network_def")
    assert isinstance(network, PaperCNN) and network.encoder[0].padding == (3, 3)
    # 48 x 48 with padding 2 gives the same 64 features as 32 x 32: the checkpoint loads and exports at 48
    onnx_file = tmp_path / "model48.onnx"
    export_checkpoint(BUNDLE, checkpoint=str(checkpoint), output=str(onnx_file), spatial_size=48, parity_split="none")
    assert int(_metadata(onnx_file)["spatial_size"]) == 48


def test_script_refuses_a_network_other_than_the_trained_one(tmp_path, monkeypatch):
    monkeypatch.setenv("BRAIN_TUMOR_DATA", "")
    checkpoint = write_trained(tmp_path / "models", _small_densenet(), TINY_SIZE)
    with pytest.raises(ValueError, match=r"trained with monai.networks.nets.densenet.DenseNet .* but network_def "
                                         r"builds robustmri.networks.paper_cnn.PaperCNN: pass the training network"):
        export_checkpoint(BUNDLE, checkpoint=str(checkpoint), output=str(tmp_path / "m.onnx"), parity_split="none")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("text", [
    '{"_target_": "DenseNet121", "spatial_dims": 2, "in_channels": 1, "out_channels": 3}',
    "{'_target_': 'DenseNet121', 'spatial_dims': 2, 'in_channels': 1, 'out_channels': 3}",
    {"_target_": "DenseNet121", "spatial_dims": 2, "in_channels": 1, "out_channels": 3},
])
def test_network_def_from_the_command_line(text):
    assert parse_network_def(text) == {"_target_": "DenseNet121", "spatial_dims": 2, "in_channels": 1,
                                                     "out_channels": 3}


def test_network_def_that_is_not_a_network_is_refused():
    with pytest.raises(ValueError, match="neither JSON nor a Python dict literal"):
        parse_network_def("DenseNet121(")
    with pytest.raises(ValueError, match="must be a dict with a '_target_'"):
        parse_network_def("{'spatial_dims': 2}")


#: MONAI's DenseNet (the class DenseNet121 fixes the sizes of) kept small: DenseNet121 itself takes
#: about 40 s to trace for ONNX on this two-core machine, and the export path is the same.
SMALL_DENSENET = {"_target_": "DenseNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 3, "init_features": 8,
                  "growth_rate": 4, "block_config": [2, 2]}


def _small_densenet(seed: int = 0) -> torch.nn.Module:
    from monai.networks.nets import DenseNet

    torch.manual_seed(seed)
    arguments = {key: value for key, value in SMALL_DENSENET.items() if key != "_target_"}
    network = DenseNet(**arguments)
    return _with_batchnorm_statistics(network)


@pytest.mark.slow
def test_script_exports_a_monai_densenet_through_network_def(tmp_path):
    """The command line as a user types it: --network_def as Python text, no sizes; parity with PyTorch passes."""
    network = _small_densenet()
    checkpoint = write_trained(tmp_path / "models", network, TINY_SIZE)
    onnx_file = tmp_path / "models" / "model.onnx"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "export_onnx.py"), "--checkpoint", str(checkpoint),
                             "--output", str(onnx_file), "--network_def", str(SMALL_DENSENET),
                             "--synthetic_patients", "20"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "BRAIN_TUMOR_DATA": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["parity"]["passed"] and report["parity"]["n"] > 0 and report["parity"]["class_mismatches"] == 0
    meta = _metadata(onnx_file)
    assert int(meta["spatial_size"]) == TINY_SIZE
    assert meta["network"].startswith("monai.networks.nets.densenet.DenseNet; ")
    assert "final layer class_layers.out: Linear(16, 3)" in meta["network"]
    images = split_images(build_protocol(None, spatial_size=TINY_SIZE, synthetic_patients=20, preprocess="minmax"),
                          "test")[:5]
    with torch.no_grad():
        expected = torch.softmax(network(torch.from_numpy(images)), 1).numpy()
    np.testing.assert_allclose(OnnxClassifier(onnx_file, device="cpu").predict(images), expected, atol=1e-4)


@pytest.mark.slow
def test_script_fits_the_detector_on_the_recorded_training_splits(tmp_path, monkeypatch):
    """Without --seed/--synthetic_patients, export takes them from the checkpoint's provenance, so the detector is
    fitted on the training run's own splits (a demo model trained on 24 embedded patients, seed 3)."""
    import json

    from robustmri.data.protocol import build_protocol
    from robustmri.engine.model_metadata import data_provenance

    monkeypatch.setenv("BRAIN_TUMOR_DATA", "")
    checkpoint = write_trained(tmp_path / "models", _bundle_paper_cnn(), TINY_SIZE, network_padding=2)
    trained = build_protocol(None, spatial_size=TINY_SIZE, synthetic_patients=24, seed=3, preprocess="minmax")
    record = json.loads((tmp_path / "models" / "model_metadata.json").read_text())
    record["provenance"] = {"data": {**data_provenance(trained), "synthetic_patients": 24},
                            "protocol": {"seed": 3, "noise": "gaussian", "synthetic_patients": 24}}
    (tmp_path / "models" / "model_metadata.json").write_text(json.dumps(record))
    recorded = recorded_provenance(str(checkpoint))
    assert recorded_protocol(recorded) == {"seed": 3, "noise": "gaussian", "synthetic_patients": 24}
    export_checkpoint(BUNDLE, checkpoint=str(checkpoint), output=str(tmp_path / "models" / "model.onnx"))
    meta = _metadata(tmp_path / "models" / "model.onnx")
    assert int(meta["ood_n_train"]) == len(trained.split("train")) and int(meta["ood_n_validation"]) == len(
        trained.split("val"))


def test_export_reads_the_data_set_the_model_was_trained_on_unless_told_otherwise(tmp_path, monkeypatch, caplog):
    """The detector is fitted on the training run's splits: the recorded folder by default, not the embedded set."""
    import robustmri.engine.trained_model as trained_module
    from robustmri.engine.model_metadata import TRAINING_DATA_FILE

    monkeypatch.setenv("BRAIN_TUMOR_DATA", "")
    checkpoint = write_trained(tmp_path / "models", _bundle_paper_cnn(), TINY_SIZE)
    site = str(tmp_path / "site")
    (tmp_path / "models" / TRAINING_DATA_FILE).write_text(json.dumps({"dataset_dir": site}))
    assert trained_config(BUNDLE, str(checkpoint)).get_parsed_content("protocol#dataset_dir") == site
    with caplog.at_level(logging.WARNING, logger="robustmri.engine.model_metadata"):
        assert trained_config(BUNDLE, str(checkpoint), dataset_dir="").get_parsed_content("protocol#dataset_dir") == ""
    assert f"was trained on {site} but this run uses the embedded synthetic set" in caplog.text

    seen = []

    def stop(*args, **kwargs):
        seen.append(kwargs)
        raise RuntimeError("stop after the config")

    monkeypatch.setattr(trained_module, "trained_config", stop)  # what export_checkpoint rebuilds the model with
    for given in (None, ""):
        with pytest.raises(RuntimeError, match="stop after the config"):
            export_checkpoint(BUNDLE, checkpoint=str(checkpoint), output=str(tmp_path / "m.onnx"), dataset_dir=given)
    assert "dataset_dir" not in seen[0] and seen[1]["dataset_dir"] == ""


@pytest.mark.slow
def test_export_carries_the_checkpoints_state_with_its_threshold_and_where_it_was_calibrated(tmp_path):
    """A state as a site calibration leaves it (another threshold, calibrated on site images) travels into the
    model as is: no refit, its threshold and calibration record in the metadata, the float32 graph checked
    against the float64 state."""
    import dataclasses

    from deploy_helpers import synthetic_detector_data
    from robustmri.abstention.fit import fit_state, scores_of

    network = tiny_network()
    checkpoint = tmp_path / "model.pt"
    torch.save(network.state_dict(), checkpoint)
    (train_images, train_labels), validation = synthetic_detector_data()
    fitted = fit_state(network, train_images, train_labels, validation, checkpoint)
    site = dataclasses.replace(fitted, threshold=fitted.threshold * 1.5, acceptance=0.97, calibrated_on={
        "kind": "site images", "n": 12, "sha256": "ab" * 32, "date": "2026-01-02"})
    onnx_file = tmp_path / "model.onnx"
    result = export_onnx(network, onnx_file, CLASS_NAMES, TINY_SIZE, checkpoint=checkpoint, preprocess="minmax",
                         parity_images=validation, abstention=site)
    meta = _metadata(onnx_file)
    assert float(meta["ood_threshold"]) == site.threshold != fitted.threshold
    assert json.loads(meta["ood_calibrated_on"]) == site.calibrated_on
    assert json.loads(meta["ood_fitted_on"]) == fitted.fitted_on
    assert (meta["ood_n_validation"], float(meta["ood_validation_acceptance"])) == ("12", 0.97)
    classifier = OnnxClassifier(onnx_file, device="cpu")
    assert classifier.ood_threshold == site.threshold
    _, scores = classifier.predict_with_scores(validation)
    np.testing.assert_allclose(scores, scores_of(site, network, validation), rtol=1e-3)  # float32 against float64
    assert result["parity"]["passed"] and 0 <= result["parity"]["ood_state_max_rel_diff"] <= 1e-3
    with pytest.raises(ValueError, match="fitted for other weights than model.pt"):
        export_onnx(network, tmp_path / "other.onnx", CLASS_NAMES, TINY_SIZE, checkpoint=checkpoint,
                    preprocess="minmax", abstention=dataclasses.replace(site, checkpoint_sha256="0" * 64))


@pytest.mark.slow
def test_export_checkpoint_uses_the_saved_state_and_fits_one_only_when_missing(tmp_path, monkeypatch):
    import dataclasses

    import robustmri.abstention.fit as fit_module
    from robustmri.abstention.state import abstention_path, load_state, save_state
    from helpers import write_abstention_state

    monkeypatch.setenv("BRAIN_TUMOR_DATA", "")
    network = _bundle_paper_cnn()
    checkpoint = write_trained(tmp_path / "models", network, TINY_SIZE, network_padding=2)
    write_abstention_state(checkpoint, network, TINY_SIZE)
    state = dataclasses.replace(load_state(checkpoint), threshold=123.5)
    save_state(state, checkpoint)
    fit_state = fit_module.fit_state
    monkeypatch.setattr(fit_module, "fit_state", lambda *a, **k: pytest.fail("refitted a saved state"))
    export_checkpoint(BUNDLE, checkpoint=str(checkpoint), output=str(tmp_path / "saved.onnx"), synthetic_patients=20,
                      parity_split="none")
    assert float(_metadata(tmp_path / "saved.onnx")["ood_threshold"]) == 123.5
    # without a state, export fits it (today's behaviour) and saves it beside the checkpoint for every other path
    monkeypatch.setattr(fit_module, "fit_state", fit_state)
    os.remove(abstention_path(checkpoint))
    export_checkpoint(BUNDLE, checkpoint=str(checkpoint), output=str(tmp_path / "fitted.onnx"), synthetic_patients=20,
                      parity_split="none")
    fitted = load_state(checkpoint)
    assert fitted is not None and float(_metadata(tmp_path / "fitted.onnx")["ood_threshold"]) == fitted.threshold
