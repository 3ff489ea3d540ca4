"""File inference (the bundle's inference.json): every readable image is scored by the checkpoint's abstention
state; one the model cannot vouch for keeps its probabilities but gets no class."""

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from robustmri import CLASS_NAMES, INTENDED_USE
from robustmri.abstention.fit import scores_of
from robustmri.abstention.state import load_state, save_state
from robustmri.data.preprocessing import PREPROCESSING
from robustmri.data.protocol import build_protocol
from robustmri.data.readers import read_image
from robustmri.deploy.inference import PredictionsWriter
from robustmri.engine.workflow import execute, load_workflow
from robustmri.networks import PaperCNN

from conftest import BUNDLE
from deploy_helpers import write_trained
from helpers import gradient_image, write_abstention_state, write_png

SIZE = 32


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A checkpoint with its model_metadata.json and abstention state, and input files: a training slice, uniform
    noise, a smooth gradient (neither is a head) and an unreadable file."""
    folder = tmp_path_factory.mktemp("inference")
    torch.manual_seed(0)
    network = PaperCNN(spatial_size=SIZE, padding=2).eval()
    checkpoint = write_trained(folder / "models", network, SIZE)
    write_abstention_state(checkpoint, network, SIZE)
    inputs = folder / "in"
    # a slice the state was fitted on (write_abstention_state's data): in distribution by construction
    head = build_protocol(None, spatial_size=SIZE, synthetic_patients=30, seed=0, preprocess="minmax").train[0]["image"]
    files = {"head": write_png(inputs / "head.png", head[0] * 255),
             "noise": write_png(inputs / "noise.png", np.random.default_rng(0).random((64, 64)) * 255),
             "gradient": write_png(inputs / "gradient.png", gradient_image(64))}
    (inputs / "broken.png").write_bytes(b"not a PNG")
    return network, checkpoint, inputs, files


def _infer(checkpoint, inputs, output_file) -> dict:
    execute(load_workflow(BUNDLE, ["inference.json"], {"ckpt_dir": str(checkpoint.parent), "input_files": str(inputs),
                                                       "output_file": str(output_file), "device": "cpu"},
                          workflow_type="infer"))
    return json.loads(output_file.read_text())


@pytest.mark.slow
def test_images_unlike_the_training_slices_are_not_assessable_and_get_no_class(model, tmp_path):
    network, checkpoint, inputs, files = model
    state = load_state(checkpoint)
    result = _infer(checkpoint, inputs, tmp_path / "predictions.json")
    assert list(result)[:2] == ["intended_use", "abstention"]  # both once, at the top
    assert result["abstention"]["score"] == "mahalanobis" and result["abstention"]["threshold"] == state.threshold
    assert result["abstention"]["calibrated_on"] == state.calibrated_on
    by_name = {name: next(p for p in result["predictions"] if p["file"] == str(file)) for name, file in files.items()}
    assert len(result["predictions"]) == 3 and result["n_failed"] == 1
    for name in ("noise", "gradient"):
        assert not by_name[name]["assessable"] and by_name[name]["class"] is None
        assert by_name[name]["reason"].startswith("not assessable")
    assert by_name["head"]["assessable"] and by_name["head"]["class"] in CLASS_NAMES
    for prediction in result["predictions"]:
        assert prediction["assessable"] == (prediction["abstention_score"] <= state.threshold)
        assert sum(prediction["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)  # kept, also when refused
        # the score is the state's score of the image as the model's preprocessing prepares it
        image = PREPROCESSING["minmax"](read_image(prediction["file"]), SIZE)[None]
        assert prediction["abstention_score"] == pytest.approx(scores_of(state, network, image[None])[0], rel=1e-4)
    assert (result["n_assessable"], result["n_not_assessable"]) == (1, 2) and result["n_classified"] == 1


@pytest.mark.slow
def test_a_higher_threshold_lets_every_image_have_its_class(model, tmp_path):
    network, checkpoint, inputs, files = model
    state = load_state(checkpoint)
    save_state(dataclasses.replace(state, threshold=1e30), checkpoint)
    try:
        result = _infer(checkpoint, inputs, tmp_path / "predictions.json")
    finally:
        save_state(state, checkpoint)
    assert result["n_not_assessable"] == 0 and result["n_assessable"] == 3
    for prediction in result["predictions"]:
        probabilities = prediction["probabilities"]
        assert prediction["assessable"] and prediction["class"] == max(probabilities, key=probabilities.get)


def test_file_inference_json_states_the_intended_use_once(tmp_path):
    writer = PredictionsWriter(str(tmp_path / "inference.json"), CLASS_NAMES)
    batch = [{"file": "a.png"}, {"file": "b.png", "error": "not a readable image"}]
    output = [{"pred": torch.tensor([0.2, 0.5, 0.3])}, {"pred": torch.zeros(3)}]
    engine = SimpleNamespace(state=SimpleNamespace(batch=batch, output=output))
    writer.reset(engine)
    writer.collect(engine)
    writer.write(engine)
    written = json.loads((tmp_path / "inference.json").read_text())
    assert written["intended_use"] == INTENDED_USE
    assert written["n_classified"] == 1 and written["predictions"][0]["class"] == "glioma"
    assert all("intended_use" not in row for row in written["predictions"] + written["errors"])
