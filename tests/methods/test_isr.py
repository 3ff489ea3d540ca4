"""ISR: the weights' maths, and the bundle's isr.json end to end."""

import csv
import json

import numpy as np
import pytest
import torch

from robustmri.engine.losses import SampleWeightedCrossEntropy
from robustmri.methods.isr import ISRHandler, isr_weights, permuted_weights
from robustmri.networks import PaperCNN

from helpers import TINY, output_dirs, run_in_process


def test_isr_weights_range_and_orientation():
    scores = torch.tensor([-3.0, -1.0, 0.5, 2.0])
    helpful = isr_weights(scores, alpha=2.0, emphasis="helpful")
    harmful = isr_weights(scores, alpha=2.0, emphasis="harmful")
    for w in (helpful, harmful):
        assert w.min() == 1.0 and w.max() == 2.0
    assert helpful.argmax() == 3 and harmful.argmax() == 0
    assert torch.equal(isr_weights(torch.zeros(3)), torch.ones(3))
    with pytest.raises(ValueError, match="emphasis"):
        isr_weights(scores, emphasis="both")


def test_isr_control_permutes_the_real_weights():
    weights = isr_weights(torch.linspace(-1.0, 3.0, 50) ** 3)
    control = permuted_weights(weights, seed=0)
    assert torch.equal(control.sort().values, weights.sort().values)  # the same distribution
    assert (control != weights).float().mean() > 0.5  # another assignment
    assert torch.equal(permuted_weights(weights, seed=0), control)
    assert not torch.equal(permuted_weights(weights, seed=1), control)


def items(count: int, seed: int) -> list[dict]:
    """Protocol items (id, label, file, image [1, 32, 32] in [0.4, 0.6]) for a handler run without the bundle."""
    generator = np.random.default_rng(seed)
    return [{"id": 1000 + k, "label": k % 3, "file": f"f{k}",
             "image": (0.4 + 0.2 * generator.random((1, 32, 32))).astype(np.float32)} for k in range(count)]


def tiny_model() -> PaperCNN:
    """A small random PaperCNN with BatchNorm statistics, in eval mode."""
    torch.manual_seed(0)
    model = PaperCNN(spatial_size=32, padding=2)
    model.train()
    model(torch.rand(16, 1, 32, 32))
    return model.eval()


def test_isr_handler_control_gives_the_samples_the_same_weights_permuted(tmp_path):
    train, val = items(40, 0), items(6, 1)
    weights, summaries = {}, {}
    for name, control in (("real", False), ("control", True)):
        loss = SampleWeightedCrossEntropy()
        ISRHandler(loss, 1, train, val, str(tmp_path / name), control=control, seed=4).run(
            None, tiny_model(), torch.device("cpu"))
        weights[name] = loss.weights_by_id[1000:]
        summaries[name] = json.loads((tmp_path / name / "influence_summary.json").read_text())
    assert torch.equal(weights["control"].sort().values, weights["real"].sort().values)
    assert not torch.equal(weights["control"], weights["real"])
    assert summaries["real"]["isr_control"] is False and summaries["control"]["isr_control"] is True
    assert summaries["control"]["isr_alpha"] == 2.0 and summaries["control"]["seed"] == 4
    assert ISRHandler(SampleWeightedCrossEntropy(), 1, train, val, str(tmp_path), control="false").control is False
    with pytest.raises(ValueError, match="control"):
        ISRHandler(SampleWeightedCrossEntropy(), 1, train, val, str(tmp_path), control="maybe")


def influence_outputs(folder, column: str) -> tuple[list[dict], dict, list[float]]:
    """influence.csv rows, influence_summary.json and one column of the rows; the pictures exist."""
    rows = list(csv.DictReader(open(folder / "eval" / "influence.csv")))
    assert rows and {"id", "file", "label", "score", column} <= set(rows[0])
    summary = json.loads((folder / "eval" / "influence_summary.json").read_text())
    for picture in ("influence_histogram.png", "influence_examples.png"):
        assert (folder / "eval" / picture).stat().st_size > 1000
    assert (folder / "models" / "model.pt").is_file()
    return rows, summary, [float(r[column]) for r in rows]


@pytest.mark.slow
def test_isr_json_weights_every_sample_into_one_to_alpha(tmp_path):
    run_in_process("training", "configs/isr.json", "--epochs", "2", "--influence_epoch", "1", *TINY,
           *output_dirs(tmp_path))
    rows, summary, weights = influence_outputs(tmp_path, "weight")
    assert summary["method"] == "ISR" and summary["n_train"] == len(rows) and summary["damping"] == 0.01
    assert min(weights) == pytest.approx(1.0) and max(weights) == pytest.approx(2.0)
