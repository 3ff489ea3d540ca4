"""The abstention bench on a tiny trained checkpoint of the embedded set: the protocol rebuilt as trained,
AURC per score against a computation of this test's own, and the choice made on shifted validation only."""

import json

import numpy as np
import pytest
import torch

from robustmri.bench.abstention import bench_abstention
from robustmri.data.protocol import build_protocol
from robustmri.deploy.onnx.export import split_arrays
from robustmri.evaluation.risk_coverage import aurc
from robustmri.networks import PaperCNN

from conftest import BUNDLE
from deploy_helpers import TINY_SIZE, write_trained

PATIENTS, SEED = 40, 2


@pytest.fixture(scope="module")
def data():
    return build_protocol(None, spatial_size=TINY_SIZE, synthetic_patients=PATIENTS, seed=SEED, preprocess="minmax")


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """train.json's network (PaperCNN, 32 px, padding 2) trained a few epochs on the embedded training split."""
    torch.manual_seed(0)
    network = PaperCNN(in_channels=1, num_classes=3, spatial_size=TINY_SIZE, padding=2).train()
    images, labels = (torch.from_numpy(a) for a in split_arrays(data, "train"))
    optimiser = torch.optim.Adam(network.parameters(), lr=1e-3)
    for _ in range(8):
        for batch in torch.randperm(len(images)).split(16):
            optimiser.zero_grad()
            torch.nn.functional.cross_entropy(network(images[batch]), labels[batch]).backward()
            optimiser.step()
    network.eval()
    return network, write_trained(tmp_path_factory.mktemp("abstention") / "models", network, TINY_SIZE, 2)


@pytest.fixture(scope="module")
def report(trained, tmp_path_factory):
    _, checkpoint = trained
    out = tmp_path_factory.mktemp("bench")
    # the checkpoint itself as its own ensemble member: two identical members never disagree
    result = bench_abstention(str(BUNDLE), str(checkpoint), str(out), dataset_dir="", seed=SEED,
                              synthetic_patients=PATIENTS, shifts=["blur", "gamma_0.7"],
                              ensemble=[str(checkpoint)], progress=False)
    return result, out


@pytest.mark.slow
def test_files_and_sets(report, data):
    result, out = report
    assert json.loads((out / "abstention_bench.json").read_text())["choice"] == result["choice"]
    for name in ("abstention_bench.md", "risk_coverage_test.png", "risk_coverage_shifted_test.png"):
        assert (out / name).stat().st_size > 0
    assert set(result["sets"]) == {f"{split}{suffix}" for split in ("validation", "test")
                                   for suffix in ("", " / none", " / blur", " / gamma_0.7")}
    assert result["sets"]["test"]["n"] == len(data.split("test")) and result["n_train"] == len(data.split("train"))
    assert result["excluded"] == {"validation": 0, "test": 0}
    assert result["scores"] == ["mahalanobis", "max_softmax", "energy", "mahalanobis+max_softmax",
                                "mahalanobis_gate+max_softmax", "ensemble_entropy", "ensemble_disagreement"]


@pytest.mark.slow
def test_aurc_equals_this_tests_own_computation(report, trained, data):
    network, _ = trained
    result, _ = report
    images, labels = (torch.from_numpy(a) for a in split_arrays(data, "test"))
    with torch.no_grad():
        logits = network(images).double()
    correct = (logits.argmax(1) == labels).numpy()
    row = result["sets"]["test"]
    assert row["accuracy"] == pytest.approx(correct.mean())
    energy = (-torch.logsumexp(logits, 1)).numpy()
    assert row["scores"]["energy"]["aurc"] == pytest.approx(aurc(energy, correct), abs=1e-9)
    accepted = np.argsort(energy)[:int(np.ceil(0.95 * len(energy)))]  # no ties among these float energies
    assert row["scores"]["energy"]["risk_at_95"] == pytest.approx(1 - correct[accepted].mean())
    softmax = (1 - torch.softmax(logits, 1).max(1).values).numpy()
    assert row["scores"]["max_softmax"]["aurc"] == pytest.approx(aurc(softmax, correct), abs=1e-9)
    # identical members: no disagreement anywhere, so the score is constant and its AURC is the error rate
    for entry in result["sets"].values():
        assert entry["scores"]["ensemble_disagreement"]["aurc"] == pytest.approx(1 - entry["accuracy"], abs=1e-9)
        assert entry["ensemble"]["accuracy"] == pytest.approx(entry["accuracy"])
        for name, value in entry["scores"].items():  # excess over the oracle of the score's own answers
            oracle = entry["ensemble"]["oracle_aurc"] if name.startswith("ensemble_") else entry["oracle_aurc"]
            assert value["excess_aurc"] >= -1e-12 and value["aurc"] - value["excess_aurc"] == pytest.approx(oracle)


@pytest.mark.slow
def test_the_choice_is_made_on_shifted_validation_only(report):
    result, out = report
    candidates = [name for name in result["scores"] if not name.startswith("ensemble_")]  # the checkpoint's own
    shifted = {name: np.mean([row["scores"][name]["aurc"] for row in result["sets"].values()
                              if row["split"] == "validation" and row["shift"] in ("blur", "gamma_0.7")])
               for name in candidates}
    assert result["choice"]["score"] == min(shifted, key=shifted.get)
    assert result["summary"][result["choice"]["score"]]["shifted validation"]["aurc"] == pytest.approx(
        min(shifted.values()))
    chosen = result["choice"]["score"]
    assert result["choice"]["test"] == result["sets"]["test"]["scores"][chosen]
    assert f"Chosen: **{chosen}**" in (out / "abstention_bench.md").read_text()


@pytest.mark.slow
def test_the_protocol_comes_from_the_checkpoints_provenance(trained, data, tmp_path):
    """Without --seed and --synthetic_patients the bench scores the splits the checkpoint was trained on."""
    from robustmri.engine.model_metadata import METADATA_FILE, data_provenance

    network, _ = trained
    checkpoint = write_trained(tmp_path / "models", network, TINY_SIZE, 2)
    record = json.loads((tmp_path / "models" / METADATA_FILE).read_text())
    recorded = {"seed": SEED, "noise": "gaussian", "synthetic_patients": PATIENTS}
    record["provenance"] = {"data": {**data_provenance(data), "synthetic_patients": PATIENTS}, "protocol": recorded}
    (tmp_path / "models" / METADATA_FILE).write_text(json.dumps(record))
    result = bench_abstention(str(BUNDLE), str(checkpoint), str(tmp_path / "out"), dataset_dir="", shifts=(),
                              scores=["energy"], progress=False)
    assert result["protocol"] == recorded and result["scores"] == ["energy"]
    assert set(result["sets"]) == {"validation", "test"} and result["choice"]["by"].endswith("on the validation sets")
    assert result["sets"]["test"]["n"] == len(data.split("test")) and result["n_train"] == len(data.split("train"))
    assert not (tmp_path / "out" / "risk_coverage_shifted_test.png").exists()


def test_unknown_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown site shift"):
        bench_abstention(str(BUNDLE), str(tmp_path / "model.pt"), str(tmp_path), shifts=["gamma_9"])
    with pytest.raises(ValueError, match="unknown abstention score"):
        bench_abstention(str(BUNDLE), str(tmp_path / "model.pt"), str(tmp_path), scores=["dropout"])
