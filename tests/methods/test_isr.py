"""ISR: the weights' maths, and the bundle's isr.json end to end."""

import csv
import json

import pytest
import torch

from robustmri.methods.isr import isr_weights

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


def influence_outputs(folder, column: str) -> tuple[list[dict], dict, list[float]]:
    """influence.csv rows, influence_summary.json and one column of the rows; the pictures exist."""
    rows = list(csv.DictReader(open(folder / "eval" / "influence.csv")))
    assert rows and {"id", "file", "label", "score", column} <= set(rows[0])
    summary = json.loads((folder / "eval" / "influence_summary.json").read_text())
    for picture in ("influence_histogram.png", "influence_examples.png"):
        assert (folder / "eval" / picture).stat().st_size > 1000
    assert (folder / "models" / "model_final.pt").is_file()
    return rows, summary, [float(r[column]) for r in rows]


@pytest.mark.slow
def test_isr_json_weights_every_sample_into_one_to_alpha(tmp_path):
    run_in_process("training", "configs/isr.json", "--epochs", "2", "--influence_epoch", "1", *TINY,
           *output_dirs(tmp_path))
    rows, summary, weights = influence_outputs(tmp_path, "weight")
    assert summary["method"] == "ISR" and summary["n_train"] == len(rows) and summary["damping"] == 0.01
    assert min(weights) == pytest.approx(1.0) and max(weights) == pytest.approx(2.0)
