"""File inference states the intended use once, at the top of the JSON it writes (not once per file)."""

import json
from types import SimpleNamespace

import torch

from robustmri import CLASS_NAMES, INTENDED_USE
from robustmri.deploy.inference import PredictionsWriter


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
