"""Branching: a run resumed from a saved training state equals one that never stopped."""

import os

import torch

from robustmri.data.protocol import build_protocol
from robustmri.engine.workflow import execute, inject_protocol, load_workflow, protocol_arguments
from tests.helpers import BUNDLE

TINY = {"spatial_size": 32, "network_padding": 2, "synthetic_patients": 30, "batch_size": 8, "dataset_dir": "",
        "epochs": 3, "influence_epoch": 2, "seed": 1}


def _run(tmp_path, name, config, data, handlers_before=(), handlers_after=()):
    workflow = load_workflow(BUNDLE, [config], {**TINY, "ckpt_dir": str(tmp_path / name / "models"),
                                                "output_dir": str(tmp_path / name / "eval")},
                             drop_handlers=("ProgressBar",))
    workflow.parser["train#handlers"] = [*handlers_before, *workflow.parser["train#handlers"], *handlers_after]
    inject_protocol(workflow, data)
    execute(workflow)
    return workflow.parser.get_parsed_content("network")


def test_a_branched_isp_run_equals_an_uninterrupted_one(tmp_path):
    probe = load_workflow(BUNDLE, ["isp.json"], TINY)
    data = build_protocol(**protocol_arguments(probe))
    state = str(tmp_path / "prefix" / "state.pt")

    whole = _run(tmp_path, "whole", "isp.json", data)
    # naive training up to the influence epoch, then ISP from the saved state
    _run(tmp_path, "prefix", "train.json", data, handlers_after=[
        {"_target_": "robustmri.engine.training_state.SaveTrainingState", "path": state, "epoch": 2, "stop": True}])
    assert os.path.isfile(state) and not os.path.exists(state + ".partial")
    saved = torch.load(state, weights_only=True)
    assert saved["epoch"] == 2 and saved["lr_scheduler"] is not None  # the per-iteration schedule goes on too
    branched = _run(tmp_path, "branch", "isp.json", data, handlers_before=[
        {"_target_": "robustmri.engine.training_state.LoadTrainingState", "path": state}])

    # the influence step ran in the branch (when it started), and training went on to the same weights
    assert os.path.isfile(tmp_path / "branch" / "eval" / "influence.csv")
    assert (tmp_path / "branch" / "eval" / "influence.csv").read_text() == \
        (tmp_path / "whole" / "eval" / "influence.csv").read_text()
    for key, value in whole.state_dict().items():
        assert torch.allclose(value.float(), branched.state_dict()[key].float(), atol=1e-6), key
    # the branch trained on after the prefix (its weights are not just the saved ones)
    saved = torch.load(state, weights_only=True)["model"]
    assert not torch.allclose(saved["classifier.weight"], branched.state_dict()["classifier.weight"])
