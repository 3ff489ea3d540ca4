"""ONNX export: graph, metadata, parity with PyTorch; the runtime's provider choice and metadata checks."""

import hashlib
import json
import logging

import numpy as np
import onnx
import pytest
import torch

from robustmri import CLASS_NAMES
from robustmri.data.preprocessing import INTENSITY_NORMALISATION
from robustmri.data.protocol import build_protocol
from robustmri.deploy.export import ParityError, ProbabilityHead, check_parity, export_onnx, split_images
from robustmri.deploy.onnx_runtime import CPU, CUDA, ModelMetadataError, OnnxClassifier, choose_providers

from conftest import BUNDLE
from deploy_helpers import TINY_SIZE, export_tiny, tiny_network


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    data = build_protocol(None, spatial_size=TINY_SIZE, synthetic_patients=20, seed=1)
    test_images = split_images(data, "test")
    network, checkpoint, onnx_file, result = export_tiny(tmp, parity_images=test_images)
    return network, checkpoint, onnx_file, result, test_images


def test_graph_has_named_io_dynamic_batch_and_passes_the_checker(exported):
    _, _, onnx_file, result, _ = exported
    model = onnx.load(onnx_file)
    onnx.checker.check_model(model, full_check=True)
    (image,), (pred,) = model.graph.input, model.graph.output
    assert image.name == "image" and pred.name == "pred"
    dims = image.type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value  # symbolic batch axis
    assert [d.dim_value for d in dims[1:]] == [1, TINY_SIZE, TINY_SIZE]
    assert image.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert result["opset"] >= 18


def test_metadata_says_what_inference_needs(exported):
    _, checkpoint, onnx_file, _, _ = exported
    meta = {p.key: p.value for p in onnx.load(onnx_file).metadata_props}
    assert json.loads(meta["class_names"]) == list(CLASS_NAMES)
    assert int(meta["spatial_size"]) == TINY_SIZE
    assert meta["intensity_normalisation"] == INTENSITY_NORMALISATION
    assert meta["model_version"] == "9.9.9"
    assert meta["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert "padding=2" in meta["network"] and "not for clinical use" in meta["intended_use"].lower()


def test_parity_on_the_test_split(exported):
    network, _, onnx_file, result, test_images = exported
    parity = result["parity"]
    assert parity["passed"] and parity["n"] == len(test_images) > 0
    assert parity["max_abs_diff"] <= 1e-4 and parity["class_mismatches"] == 0
    # independently: onnxruntime on odd batch sizes against PyTorch's softmax of the logits
    classifier = OnnxClassifier(onnx_file, device="cpu")
    for batch in (test_images[:1], test_images[:7]):
        got = classifier.predict(batch)
        with torch.no_grad():
            expected = torch.softmax(network(torch.from_numpy(batch)), 1).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-4)
        np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))
        np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)


def test_parity_check_catches_a_different_model(exported):
    _, _, onnx_file, _, test_images = exported
    other = ProbabilityHead(tiny_network(seed=5))
    with pytest.raises(ParityError, match="differs from PyTorch"):
        check_parity(onnx_file, other, test_images)


def test_export_refuses_class_names_that_do_not_fit(tmp_path):
    with pytest.raises(ValueError, match="do not match"):
        export_onnx(tiny_network(), tmp_path / "m.onnx", ["a", "b"], TINY_SIZE)


def _rewrite_metadata(src, dst, **changes):
    model = onnx.load(src)
    props = {p.key: p.value for p in model.metadata_props}
    props.update(changes)
    del model.metadata_props[:]
    for key, value in props.items():
        if value is not None:
            model.metadata_props.add(key=key, value=value)
    onnx.save(model, dst)
    return dst


def test_runtime_refuses_other_normalisation_or_missing_metadata(exported, tmp_path):
    _, _, onnx_file, _, _ = exported
    other = _rewrite_metadata(onnx_file, tmp_path / "z.onnx", intensity_normalisation="z-score")
    with pytest.raises(ModelMetadataError, match="z-score"):
        OnnxClassifier(other, device="cpu")
    bare = _rewrite_metadata(onnx_file, tmp_path / "bare.onnx", spatial_size=None)
    with pytest.raises(ModelMetadataError, match="spatial_size"):
        OnnxClassifier(bare, device="cpu")
    with pytest.raises(FileNotFoundError):
        OnnxClassifier(tmp_path / "missing.onnx")


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


def test_reported_provider_is_the_one_that_runs(exported, monkeypatch, caplog):
    """A CUDA provider listed but not usable (CPU-only build or no GPU): the session runs on CPU and says so."""
    import onnxruntime

    if CUDA in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime really has CUDA")
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CUDA, CPU])
    with caplog.at_level(logging.WARNING, logger="robustmri.deploy.onnx_runtime"):
        classifier = OnnxClassifier(exported[2], device="auto")
    assert classifier.provider == CPU and classifier.describe()["provider"] == CPU
    assert "not usable" in caplog.text


def test_export_config_reuses_train_json():
    train = json.loads((BUNDLE / "configs" / "train.json").read_text())
    for name in ("export.json", "infer_dicom.json"):
        config = json.loads((BUNDLE / "configs" / name).read_text())
        overridden = sorted(set(config) & set(train) - {"imports", "initialize", "run"})
        assert not overridden, f"{name} redefines {overridden} of train.json; merge instead of copying"


def test_deployment_modules_do_not_need_torch():
    import subprocess
    import sys

    code = ("import sys, robustmri.deploy.onnx_runtime, robustmri.deploy.dicom_inference, robustmri.deploy.dicom_sr; "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr[-2000:]
