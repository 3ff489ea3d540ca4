"""Influence methods with MONAI networks, given to the bundle by ``--network_def`` alone.

ISR and ISP (``configs/isr.json``, ``configs/isp.json``) with MONAI's DenseNet121 and a small
ResNet, the label audit (``configs/audit.json``) with the ResNet on 20 % flipped labels, and the
label review's self-influence on the ResNet the audit trained, against an autograd reference.
Every run is tiny (32 x 32, 30 synthetic patients, 2 epochs, influence after epoch 1); the
paper's CNN runs the same configs in tests/methods.
"""

import csv
import json
import math

import numpy as np
import pytest
import torch
from monai.networks.nets import DenseNet121, ResNet
from torch import nn

from robustmri.data.protocol import build_protocol
from robustmri.engine.checkpoint import load_weights
from robustmri.influence import self_influence_scores

from helpers import NOISY, TINY, output_dirs, run_in_process

#: The networks as a user writes them on the command line, and how the test rebuilds each to load its checkpoint.
MONAI_NETWORKS = {
    "DenseNet121": ({"_target_": "DenseNet121", "spatial_dims": 2, "in_channels": 1, "out_channels": 3},
                    lambda: DenseNet121(spatial_dims=2, in_channels=1, out_channels=3)),
    "ResNet": ({"_target_": "ResNet", "block": "basic", "layers": [1, 1, 1, 1], "block_inplanes": [8, 16, 32, 64],
                "spatial_dims": 2, "n_input_channels": 1, "num_classes": 3},
               lambda: ResNet(block="basic", layers=[1, 1, 1, 1], block_inplanes=[8, 16, 32, 64], spatial_dims=2,
                              n_input_channels=1, num_classes=3)),
}
SHORT = ["--epochs", "2", "--influence_epoch", "1"]


def _train(folder, config: str, network: str, *extra):
    """``configs/<config>`` on the tiny set with ``network`` given by --network_def only; the eval folder."""
    run_in_process("training", f"configs/{config}", *TINY, *output_dirs(folder), "--network_def",
                   str(MONAI_NETWORKS[network][0]), *extra)
    _assert_trained_with(folder / "models", network)
    return folder / "eval"


def _assert_trained_with(models, network: str) -> None:
    """The run trained the MONAI network: recorded as such, and its checkpoint loads into a fresh one."""
    record = json.loads((models / "model_metadata.json").read_text())["trained_with"]
    assert record["network"].endswith(f".{network}") and record["spatial_size"] == 32
    load_weights(MONAI_NETWORKS[network][1](), str(models / "model.pt"))  # strict: every key and shape fits


def _influence_outputs(out, method: str, column: str) -> tuple[list[dict], dict, np.ndarray, np.ndarray]:
    """influence.csv rows and influence_summary.json, checked for what any network must give; scores and ``column``."""
    rows = list(csv.DictReader(open(out / "influence.csv")))
    summary = json.loads((out / "influence_summary.json").read_text())
    assert summary["method"] == method and summary["epoch"] == 1 and summary["damping"] == 0.01
    assert summary["n_train"] == len(rows) > 0 and summary["n_val"] > 0
    assert len({row["id"] for row in rows}) == len(rows)
    assert {row["label"] for row in rows} <= {"meningioma", "glioma", "pituitary"}
    scores = np.array([float(row["score"]) for row in rows])
    assert np.isfinite(scores).all() and scores.std() > 0
    assert summary["harmful"] == int((scores < 0).sum()) and summary["helpful"] == int((scores > 0).sum())
    for picture in ("influence_histogram.png", "influence_examples.png"):
        assert (out / picture).stat().st_size > 1000
    return rows, summary, scores, np.array([float(row[column]) for row in rows])


@pytest.mark.slow
@pytest.mark.parametrize("network", list(MONAI_NETWORKS))
def test_isr_with_a_monai_network(tmp_path, network):
    out = _train(tmp_path, "isr.json", network, *SHORT)
    _, _, scores, weights = _influence_outputs(out, "ISR", "weight")
    assert weights.min() == pytest.approx(1.0, abs=1e-5) and weights.max() == pytest.approx(2.0, abs=1e-5)
    order = np.argsort(scores, kind="stable")  # emphasis "helpful": the weight grows with the score
    assert (np.diff(weights[order]) >= -1e-5).all()


@pytest.mark.slow
@pytest.mark.parametrize("network", list(MONAI_NETWORKS))
def test_isp_with_a_monai_network(tmp_path, network):
    out = _train(tmp_path, "isp.json", network, *SHORT)
    _, _, _, linf = _influence_outputs(out, "ISP", "perturbation_linf")
    l2 = np.array([float(row["perturbation_l2"]) for row in csv.DictReader(open(out / "influence.csv"))])
    assert linf.max() > 0 and (linf <= 1.0 + 1e-6).all()  # images moved, and stayed in [0, 1]
    assert (l2 >= linf - 1e-6).all() and (l2 <= linf * 32 + 1e-6).all()  # |d|_inf <= |d|_2 <= 32 |d|_inf


@pytest.fixture(scope="module")
def audited_resnet(tmp_path_factory):
    """The audit after 2 epochs of the small ResNet on 20 % flipped training labels; its output folder."""
    folder = tmp_path_factory.mktemp("audit_resnet")
    _train(folder, "audit.json", "ResNet", "--epochs", "2", *NOISY)
    return folder


@pytest.mark.slow
def test_audit_with_a_monai_network(audited_resnet):
    out = audited_resnet / "eval"
    report = json.loads((out / "audit_summary.json").read_text())
    assert report["n"] > 0 and report["wrong_labels"] == round(0.2 * report["n"])
    rows = report["precision_at_k"]
    assert rows and any(row["k"] == report["wrong_labels"] for row in rows)
    for row in rows:
        assert all(0.0 <= row[key] <= 1.0 for key in ("influence", "loss", "random"))
        assert row["random"] == pytest.approx(report["wrong_labels"] / report["n"])
    ranking = list(csv.DictReader(open(out / "audit_ranking.csv")))
    assert len(ranking) == report["n"] and "true_label" not in ranking[0]


@pytest.mark.slow
def test_label_review_self_influence_with_a_monai_network(audited_resnet):
    """self_influence_scores on the audited ResNet equal -g_i . (H + lambda I)^-1 g_i / N built by autograd."""
    network = load_weights(MONAI_NETWORKS["ResNet"][1](), str(audited_resnet / "models" / "model.pt")).eval()
    data = build_protocol(None, spatial_size=32, synthetic_patients=30, label_noise="symmetric", label_noise_rate=0.2,
                          preprocess="minmax")
    images = np.stack([item["image"] for item in data.train]).astype(np.float32)
    labels = np.array([item["label"] for item in data.train])
    damping = 0.01
    scores = self_influence_scores(network, images, labels, damping=damping, batch_size=16)

    seen = []  # the final layer's input, taken by the test's own hook
    handle = network.fc.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        network(torch.from_numpy(images))
    handle.remove()
    features, target = seen[0].double(), torch.from_numpy(labels)
    theta = torch.cat([network.fc.weight, network.fc.bias[:, None]], 1).detach().double().reshape(-1)

    def loss(flat, rows=slice(None)):
        matrix = flat.reshape(3, -1)
        return nn.functional.cross_entropy(features[rows] @ matrix[:, :-1].T + matrix[:, -1], target[rows])

    hessian = torch.autograd.functional.hessian(loss, theta) + damping * torch.eye(theta.numel(), dtype=torch.float64)
    n = len(labels)
    reference = []
    for i in range(n):
        flat = theta.clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(loss(flat, slice(i, i + 1)), flat)
        reference.append(-(gradient @ torch.linalg.solve(hessian, gradient)).item() / n)
    reference = np.array(reference)
    assert (scores <= 0).all() and math.isclose(scores.min(), reference.min(), rel_tol=1e-6)
    np.testing.assert_allclose(scores, reference, rtol=1e-6, atol=1e-9 * np.abs(reference).max())
