"""Branching: a run resumed from a saved training state equals one that never stopped."""

import os

import pytest
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
    return workflow.parser.get_parsed_content("network"), workflow.parser.get_parsed_content("ema")


@pytest.mark.slow
def test_a_branched_isp_run_equals_an_uninterrupted_one(tmp_path):
    probe = load_workflow(BUNDLE, ["isp.json"], TINY)
    data = build_protocol(**protocol_arguments(probe))
    state = str(tmp_path / "prefix" / "state.pt")

    whole, whole_average = _run(tmp_path, "whole", "isp.json", data)
    # naive training up to the influence epoch, then ISP from the saved state
    _run(tmp_path, "prefix", "train.json", data, handlers_after=[
        {"_target_": "robustmri.engine.training_state.SaveTrainingState", "path": state, "epoch": 2, "stop": True}])
    assert os.path.isfile(state) and not os.path.exists(state + ".partial")
    saved = torch.load(state, weights_only=True)
    assert saved["epoch"] == 2 and saved["lr_scheduler"] is not None  # the per-iteration schedule goes on too
    assert saved["ema"]["decay"] == 0.99 and saved["ema"]["updates"] > 0  # and so does the weight average
    branched, branched_average = _run(tmp_path, "branch", "isp.json", data, handlers_before=[
        {"_target_": "robustmri.engine.training_state.LoadTrainingState", "path": state}])

    # the influence step ran in the branch (when it started), and training went on to the same weights
    assert os.path.isfile(tmp_path / "branch" / "eval" / "influence.csv")
    assert (tmp_path / "branch" / "eval" / "influence.csv").read_text() == \
        (tmp_path / "whole" / "eval" / "influence.csv").read_text()
    for key, value in whole.state_dict().items():
        assert torch.allclose(value.float(), branched.state_dict()[key].float(), atol=1e-6), key
    # the product's model, the weight average, is the same too, and it is what model.pt holds
    assert whole_average.updates == branched_average.updates
    model = torch.load(tmp_path / "branch" / "models" / "model.pt", weights_only=True)
    for key, value in whole_average.model.state_dict().items():
        assert torch.allclose(value.float(), branched_average.model.state_dict()[key].float(), atol=1e-6), key
        assert torch.equal(model[key], branched_average.model.state_dict()[key].cpu()), key
    assert not torch.allclose(model["classifier.weight"], branched.state_dict()["classifier.weight"])
    # the branch trained on after the prefix (its weights are not just the saved ones)
    saved = torch.load(state, weights_only=True)["model"]
    assert not torch.allclose(saved["classifier.weight"], branched.state_dict()["classifier.weight"])


@pytest.mark.slow
def test_a_state_saved_with_a_weight_average_does_not_resume_a_run_without_one(tmp_path):
    probe = load_workflow(BUNDLE, ["train.json"], TINY)
    data = build_protocol(**protocol_arguments(probe))
    state = str(tmp_path / "prefix" / "state.pt")
    _run(tmp_path, "prefix", "train.json", data, handlers_after=[
        {"_target_": "robustmri.engine.training_state.SaveTrainingState", "path": state, "epoch": 2, "stop": True}])
    assert not (tmp_path / "prefix" / "models" / "model.pt").exists()  # stopped early: no trained model
    workflow = load_workflow(BUNDLE, ["train.json"], {**TINY, "ema_decay": None,
                                                      "ckpt_dir": str(tmp_path / "other" / "models"),
                                                      "output_dir": str(tmp_path / "other" / "eval")},
                             drop_handlers=("ProgressBar",))
    workflow.parser["train#handlers"] = [{"_target_": "robustmri.engine.training_state.LoadTrainingState",
                                          "path": state}, *workflow.parser["train#handlers"]]
    inject_protocol(workflow, data)
    with pytest.raises(Exception) as caught:
        execute(workflow)
    cause = caught.value
    while cause.__cause__ is not None:
        cause = cause.__cause__
    assert "disagree on keeping a weight average" in str(cause)


def test_every_method_handler_is_resumable_and_one_that_is_not_is_refused():
    """Every trainer handler of ``robustmri.methods`` (a class with ``attach``) saves its state; a method handler
    without the Resumable protocol makes resuming fail with a message naming it."""
    import importlib
    import inspect
    import pkgutil

    from ignite.engine import Engine, Events

    import robustmri.methods
    from robustmri.engine.training_state import is_resumable, restore_run_state

    handlers = []
    for module in pkgutil.iter_modules(robustmri.methods.__path__):
        found = importlib.import_module(f"robustmri.methods.{module.name}")
        handlers += [c for _, c in inspect.getmembers(found, inspect.isclass)
                     if c.__module__ == found.__name__ and callable(getattr(c, "attach", None))]
    names = {c.__name__ for c in handlers}
    assert {"ALRHandler", "MWNetHandler", "PINTHandler", "ATHandler"} <= names
    assert [c.__name__ for c in handlers if not is_resumable(c.__new__(c))] == []

    class Forgetful:
        def __call__(self, engine):
            pass

    Forgetful.__module__ = "robustmri.methods.example"
    engine = Engine(lambda engine, batch: None)
    engine.add_event_handler(Events.EPOCH_COMPLETED, Forgetful())
    with pytest.raises(ValueError, match=r"state.pt: cannot resume: the state of .*Forgetful is not saved"):
        restore_run_state(engine, {}, "state.pt")


# -- resuming a killed run (TrainingCheckpoint, the bundle's ``resume``): precision and other runs' states ------------

def _workflow(tmp_path, name, data, **overrides):
    workflow = load_workflow(BUNDLE, ["train.json"], {**TINY, "epochs": 2, **overrides,
                                                      "ckpt_dir": str(tmp_path / name / "models"),
                                                      "output_dir": str(tmp_path / name / "eval")},
                             drop_handlers=("ProgressBar",))
    if data is not None:
        inject_protocol(workflow, data)
    return workflow


def _stop_in_epoch_2(workflow):
    per_epoch = len(workflow.parser.get_parsed_content("train#dataloader"))
    workflow.parser["initialize"] = [*workflow.parser["initialize"], (
        f"$@train#trainer.add_event_handler(ignite.engine.Events.ITERATION_COMPLETED(once={per_epoch + 1}), "
        "lambda engine: (_ for _ in ()).throw(RuntimeError('stopped in epoch 2')))")]


def test_a_resumed_run_goes_on_in_the_precision_its_state_recorded(tmp_path, monkeypatch):
    import json

    import robustmri.engine.precision as precision
    from robustmri.engine.training_state import CannotResume

    # whatever this machine has, auto here would choose fp32 (no native bf16) ...
    monkeypatch.setattr(precision, "cpu_capabilities", lambda: {
        "cpu": "Test CPU", "torch_cpu_capability": "AVX2", "amx_bf16": False, "avx512_bf16": False, "bf16": False,
        "sve_bf16": False, "amx_tile": False})
    data = build_protocol(**protocol_arguments(load_workflow(BUNDLE, ["train.json"], TINY)))
    cut = _workflow(tmp_path, "run", data, precision="bf16")  # ... and the run that was killed trained in bf16
    _stop_in_epoch_2(cut)
    with pytest.raises(RuntimeError):
        execute(cut)
    models = tmp_path / "run" / "models"
    state = torch.load(models / "training_state.pt", weights_only=True)
    assert state["epoch"] == 1 and (state["precision"], state["precision_reason"]) == ("bf16", "requested")
    metadata = json.loads((models / "model_metadata.json").read_text())["trained_with"]
    assert (metadata["precision"], metadata["precision_reason"]) == ("bf16", "requested")

    with pytest.raises(CannotResume, match=r"training_state.pt: cannot resume: it trained in bf16 and this run "
                                           r"asks for precision fp32: resume with --precision auto \(or bf16\)$"):
        execute(_workflow(tmp_path, "run", data, precision="fp32", resume=True))

    resumed = _workflow(tmp_path, "run", data, precision="auto", resume=True)
    execute(resumed)
    network = resumed.parser.get_parsed_content("network")
    assert network.robustmri_precision == "bf16" and "recorded in" in network.robustmri_precision_reason
    assert "here auto would choose fp32" in network.robustmri_precision_reason
    assert torch.load(models / "training_state.pt", weights_only=True)["precision"] == "bf16"
    metadata = json.loads((models / "model_metadata.json").read_text())["trained_with"]
    assert metadata["precision"] == "bf16" and "recorded in" in metadata["precision_reason"]


def test_a_state_of_another_or_a_finished_run_is_refused_in_one_line_and_no_state_starts_afresh(tmp_path, caplog):
    from robustmri.engine.training_state import OTHER_RUN_ADVICE, CannotResume

    with caplog.at_level("INFO", logger="robustmri.engine.training_state"):
        execute(_workflow(tmp_path, "run", None, epochs=1, resume=True))
    state_path = tmp_path / "run" / "models" / "training_state.pt"
    assert f"resume: no training state at {state_path}; starting from epoch 1" in caplog.messages
    settings = torch.load(state_path, weights_only=True)["settings"]
    assert settings["spatial_size"] == 32 and settings["learning_rate"] == 0.002 and settings["method"] == "naive"

    refusals = {  # overrides of the same command -> the one line that refuses it
        "{}": "cannot resume: this run already completed its 1 epochs (state saved after epoch 1): nothing to resume",
        '{"epochs": 3, "spatial_size": 48}': f"cannot resume: it was written by another run (epochs 1 there, 3 here; "
                                             f"spatial_size 32 there, 48 here): {OTHER_RUN_ADVICE}",
        '{"epochs": 3, "learning_rate": 0.01}': "(epochs 1 there, 3 here; learning_rate 0.002 there, 0.01 here)",
    }
    import json

    for overrides, expected in refusals.items():
        with pytest.raises(CannotResume) as refused:
            execute(_workflow(tmp_path, "run", None, resume=True, **{"epochs": 1, **json.loads(overrides)}))
        message = str(refused.value)
        assert message.startswith(f"{state_path}: cannot resume: ") and expected in message and "\n" not in message
        assert refused.value.code == message  # a SystemExit: the command prints it and exits with status 1
