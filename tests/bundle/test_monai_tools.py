"""MONAI's own bundle tools on the model ``make demo`` trains, typed from ``bundle/`` as the bundle docs give them,
with the shipped ``configs/metadata.json`` as ``--meta_file``."""

import json

import numpy as np
import pytest
import torch

from conftest import MONAI_SCHEMA_SHA256
from helpers import bundle, output_dirs
from robustmri.engine.checkpoint import load_weights
from robustmri.networks import PaperCNN

#: The training configs of ``make demo`` (the Makefile's DEMO_CONFIGS).
DEMO_CONFIGS = "['configs/train.json','configs/quick.json']"
META = ["--meta_file", "configs/metadata.json"]


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    """``make demo``'s model cut to one epoch on 40 pseudo-patients: the same network, trained briefly."""
    out = tmp_path_factory.mktemp("demo")
    bundle("run", "training", "--config_file", DEMO_CONFIGS, "--epochs", "1", "--synthetic_patients", "40",
           *output_dirs(out))
    return out / "models"


@pytest.fixture(scope="module")
def inputs():
    return torch.rand(4, 1, 64, 64, generator=torch.Generator().manual_seed(0))


def _logits(checkpoint, inputs):
    trained = json.loads((checkpoint.parent / "model_metadata.json").read_text())["trained_with"]
    assert (trained["spatial_size"], trained["network_padding"]) == (64, 2)  # what configs/metadata.json describes
    network = load_weights(PaperCNN(spatial_size=64, padding=2), str(checkpoint)).eval()
    with torch.no_grad():
        return network(inputs)


@pytest.mark.slow
def test_verify_metadata_and_verify_net_in_out_pass_on_the_demo_configs(monai_schema):
    bundle("verify_metadata", *META, "--filepath", monai_schema, "--hash_val", MONAI_SCHEMA_SHA256,
           "--hash_type", "sha256")
    bundle("verify_net_in_out", "network_def", *META, "--config_file", DEMO_CONFIGS, "--device", "cpu")


@pytest.mark.slow
def test_ckpt_export_embeds_the_64_px_metadata_and_returns_the_declared_logits(demo_model, inputs, tmp_path):
    ts = tmp_path / "model.ts"
    bundle("ckpt_export", "network_def", "--filepath", ts, "--ckpt_file", demo_model / "model.pt", *META,
           "--config_file", "configs/train.json")
    extra = {"metadata.json": "", "train.json": ""}
    model = torch.jit.load(str(ts), _extra_files=extra)
    embedded = json.loads(extra["metadata.json"])["network_data_format"]
    assert embedded["inputs"]["image"]["spatial_shape"] == [64, 64] and embedded["outputs"]["pred"]["type"] == "logits"
    assert json.loads(extra["train.json"])["spatial_size"] == 64
    expected = _logits(demo_model / "model.pt", inputs)
    with torch.no_grad():
        np.testing.assert_allclose(model(inputs).numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(expected.sum(dim=1), torch.ones(4), atol=1e-3)  # logits, as declared


@pytest.mark.slow
def test_onnx_export_runs_at_the_size_the_metadata_gives(demo_model, inputs, tmp_path):
    import onnxruntime

    onnx_file = tmp_path / "model.onnx"
    bundle("onnx_export", "network_def", "--filepath", onnx_file, "--ckpt_file", demo_model / "model.pt", *META,
           "--config_file", "configs/train.json")
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [1, 64, 64]
    # MONAI exports with a batch of one (the metadata's shape); the graph gives the checkpoint's logits
    (logits,) = session.run(None, {session.get_inputs()[0].name: inputs[:1].numpy()})
    np.testing.assert_allclose(logits, _logits(demo_model / "model.pt", inputs[:1]).numpy(), rtol=1e-4, atol=1e-5)
