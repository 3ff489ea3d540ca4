"""One preprocessing from training to every deployed path.

For each preprocessing, raw slices framed unlike training's (non-square, off-centre heads) are
prepared by the training protocol, the bundle's ``inference.json``, the exported ONNX model's
runtime (files and DICOM series) and, in tests/apps, MONAI Label. Every path must give the
same network input bit for bit, and the same probabilities from the same weights.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from robustmri import CLASS_NAMES
from robustmri.abstention.fit import fit_state
from robustmri.abstention.state import save_state
from robustmri.bench.dicom_fixtures import write_mr_series
from robustmri.data.preprocessing import DESCRIPTIONS, PREPROCESSING
from robustmri.data.protocol import build_protocol
from robustmri.data.readers import read_image
from robustmri.data.synthetic import generate_slices
from robustmri.deploy.dicom.classify import classify_series
from robustmri.deploy.dicom.headers import scan_folders
from robustmri.deploy.onnx.export import export_onnx
from robustmri.deploy.onnx.runtime import ModelIntegrityError, ModelMetadataError, OnnxClassifier
from robustmri.engine.workflow import execute, load_workflow

from conftest import BUNDLE
from deploy_helpers import TINY_SIZE, accepting_detector_data, rewrite_metadata, tiny_network, write_trained


def raw_slices(n: int = 9) -> tuple[list[np.ndarray], list[int]]:
    """Synthetic heads as 8-bit slices with a different framing each: wider, taller, off-centre."""
    synthetic = generate_slices(n_patients=9, size=48, seed=3)
    slices, labels = [], []
    for k in range(n):
        image = np.rint(synthetic["images"][k] * 200 + 10)
        pads = ((3 * k % 11, 2), (1, 5 + 4 * k))
        slices.append(np.pad(image, pads, constant_values=10.0))
        labels.append(int(synthetic["labels"][k]))
    return slices, labels


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The slices as PNG files in class folders (a data set the protocol reads) and as one DICOM series."""
    root = tmp_path_factory.mktemp("parity")
    slices, labels = raw_slices()
    files = []
    for k, (image, label) in enumerate(zip(slices, labels)):
        folder = root / "data" / CLASS_NAMES[label]
        folder.mkdir(parents=True, exist_ok=True)
        files.append(folder / f"slice{k}.png")
        Image.fromarray(image.astype(np.uint8)).save(files[-1])
    dicom = write_mr_series(root / "dicom", slices, rescale=(1.0, 0.0))
    return root, files, dicom


@pytest.fixture(scope="module", params=sorted(PREPROCESSING))
def deployed(request, dataset, tmp_path_factory):
    """For one preprocessing: the training inputs by file, a trained-model folder, its ONNX export."""
    name = request.param
    root, files, _ = dataset
    data = build_protocol(str(root / "data"), spatial_size=TINY_SIZE, noise="none", split_fractions=(0.4, 0.3, 0.3),
                          preprocess=name, num_workers=1)
    training = {item["file"]: item["image"] for split in ("train", "val", "test") for item in data.split(split)}
    assert sorted(training) == sorted(str(f) for f in files)
    models = tmp_path_factory.mktemp(f"model_{name}")
    network = tiny_network(seed=2)
    checkpoint = write_trained(models, network, TINY_SIZE, preprocess=name)
    onnx_file = models / "model.onnx"
    ood_train, ood_validation = accepting_detector_data(np.stack(list(training.values())))  # 9 slices: too few to fit
    state = fit_state(network, *ood_train, ood_validation, checkpoint, target_acceptance=1.0)
    save_state(state, checkpoint)  # the state training writes beside the model, which file inference applies
    export_onnx(network, onnx_file, CLASS_NAMES, TINY_SIZE, checkpoint=checkpoint, preprocess=name, abstention=state)
    return name, training, network, models, onnx_file


def torch_probabilities(network, inputs) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(network(torch.from_numpy(np.stack(inputs))), 1).numpy()


def test_the_preprocessings_differ_on_these_slices(dataset):
    _, files, _ = dataset
    image = read_image(files[4])
    assert not np.allclose(PREPROCESSING["minmax"](image, TINY_SIZE), PREPROCESSING["head"](image, TINY_SIZE),
                           atol=0.05)


@pytest.mark.slow
def test_bundle_inference_prepares_and_classifies_as_training(deployed, tmp_path):
    name, training, network, models, _ = deployed
    workflow = load_workflow(BUNDLE, ["inference.json"], {"ckpt_dir": str(models), "input_files": sorted(training),
                                                          "output_file": str(tmp_path / "p.json"), "device": "cpu"},
                             workflow_type="infer")
    parser = workflow.parser
    assert parser.get_parsed_content("preprocess") == name  # read back from model_metadata.json
    transform = parser.get_parsed_content("preprocessing")
    for file, expected in training.items():
        np.testing.assert_array_equal(transform({"image": file})["image"].numpy(), expected)
    # the network of inference.json (its own padding and size) gives training's probabilities
    parser["network_def"] = {"_target_": "robustmri.networks.PaperCNN", "spatial_size": TINY_SIZE, "padding": 2,
                             "channels": [4, 4, 8, 8, 8]}
    execute(workflow)
    predictions = json.loads((tmp_path / "p.json").read_text())["predictions"]
    files = [p["file"] for p in predictions]
    got = np.array([[p["probabilities"][c] for c in CLASS_NAMES] for p in predictions])
    np.testing.assert_allclose(got, torch_probabilities(network, [training[f] for f in files]), atol=1e-5)


@pytest.mark.slow
def test_onnx_runtime_prepares_files_and_dicom_as_training(deployed, dataset):
    name, training, network, _, onnx_file = deployed
    _, files, dicom = dataset
    classifier = OnnxClassifier(onnx_file, device="cpu")
    assert classifier.preprocess == name and classifier.describe()["intensity_normalisation"] == DESCRIPTIONS[name]
    for file in files:
        np.testing.assert_array_equal(classifier.prepare(read_image(file)), training[str(file)])
    # the DICOM series of the same pixels: each slice's probabilities are training's
    (series,) = scan_folders([dicom[0].rsplit("/", 1)[0]], progress=False).series
    record = classify_series(series, classifier)
    by_position = {row["instance_number"]: row for row in record["slices"]}
    inputs = [training[str(files[k])] for k in range(len(files))]
    expected = torch_probabilities(network, inputs)
    for k in range(len(files)):
        got = [by_position[k + 1]["probabilities"][c] for c in CLASS_NAMES]
        np.testing.assert_allclose(got, expected[k], atol=1e-4)


@pytest.mark.slow
def test_a_model_whose_preprocessing_changed_is_refused(deployed, tmp_path):
    import onnx

    name, _, _, _, onnx_file = deployed
    description = {p.key: p.value for p in onnx.load(onnx_file).metadata_props}["intensity_normalisation"]
    # an intact model exported with another description (digest recomputed): refused by the preprocessing check
    changed = rewrite_metadata(onnx_file, tmp_path / "changed.onnx", reseal=True,
                               intensity_normalisation=description + " (changed)")
    with pytest.raises(ModelMetadataError, match=f"preprocessing '{name}' described as"):
        OnnxClassifier(changed, device="cpu")
    # the same change made after export: refused by the integrity check
    tampered = rewrite_metadata(onnx_file, tmp_path / "tampered.onnx", intensity_normalisation=description + " (x)")
    with pytest.raises(ModelIntegrityError, match="metadata changed after export"):
        OnnxClassifier(tampered, device="cpu")
