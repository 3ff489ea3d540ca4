"""Resuming a killed run (``--resume true``) ends exactly where an uninterrupted run ends.

The runs are the user's command, ``python -m monai.bundle run training ... --resume true``, in
subprocesses on the tiny embedded set with deterministic CPU settings. A run is killed with
SIGKILL in the middle of an epoch (a test overlay sends the signal to its own process at a
given iteration, so the point of death does not depend on timing) once before the influence
step and once after it, then resumed with the documented command.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from helpers import TINY, kill_at_iteration, killed_in_a_child, output_dirs
from conftest import BUNDLE, ROOT

pytestmark = pytest.mark.slow  # every test trains, kills and resumes bundle runs in subprocesses


#: 44 training samples in batches of 8: 6 iterations per epoch; the influence step after epoch 2 of 4.
SCHEDULE = ["--epochs", "4", "--influence_epoch", "2", "--seed", "3"]
ITERATIONS_PER_EPOCH = 6


def _command(config, folder, *extra):
    return [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", config, *TINY, *SCHEDULE,
            *output_dirs(folder), "--dataset_dir", "", *extra]


def _run(args, timeout=240):
    """Run ``args`` from ``bundle/``; kill it by its PID if it outlives ``timeout``; the finished process."""
    env = {**os.environ, "BRAIN_TUMOR_DATA": "", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(args, cwd=BUNDLE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode, output


def _killer(tmp_path, iteration: int) -> str:
    """An overlay that SIGKILLs the training process when ``iteration`` (1-based, global) completes."""
    path = tmp_path / f"kill_at_{iteration}.json"
    path.write_text(json.dumps({"+initialize": [
        f"$@train#trainer.add_event_handler(ignite.engine.Events.ITERATION_COMPLETED(once={iteration}), "
        "lambda engine: os.kill(os.getpid(), 9))"]}))
    return str(path)


def _final(folder):
    models, evaluation = folder / "models", folder / "eval"
    return {"model": torch.load(models / "model.pt", weights_only=True),
            "best": torch.load(models / "model_best_val.pt", weights_only=True),
            "history": json.loads((evaluation / "history.json").read_text()),
            "influence": (evaluation / "influence.csv").read_text()}


def _assert_same(resumed, whole):
    assert resumed["history"] == whole["history"]  # every epoch's loss and validation metrics
    assert resumed["influence"] == whole["influence"]
    for name in ("model", "best"):
        for key, value in whole[name].items():
            assert torch.equal(resumed[name][key], value), (name, key)


def test_a_run_killed_mid_epoch_and_resumed_ends_like_an_uninterrupted_one(tmp_path):
    config = "configs/isp.json"
    code, output = _run(_command(config, tmp_path / "whole"))
    assert code == 0, output[-3000:]
    whole = _final(tmp_path / "whole")
    assert len(whole["history"]) == 4
    n_train = json.loads((tmp_path / "whole" / "eval" / "influence_summary.json").read_text())["n_train"]
    per_epoch = -(-n_train // 8)

    # killed mid-epoch 2 (before the influence step: the state after epoch 1 is resumed and the step runs),
    # resumed and killed again mid-epoch 3 (after it: the state after epoch 2 holds the perturbed images and
    # the step's "done"), then resumed to the end
    folder = tmp_path / "killed"
    for killed_in_epoch in (2, 3):
        iteration = (killed_in_epoch - 1) * per_epoch + per_epoch // 2
        resume = ["--resume", "true"] if killed_in_epoch > 2 else []
        code, output = _run(_command(f"['{config}','{_killer(tmp_path, iteration)}']", folder, *resume))
        assert code == -signal.SIGKILL, output[-3000:]
        state = torch.load(folder / "models" / "training_state.pt", weights_only=True)
        assert state["epoch"] == killed_in_epoch - 1 and state["iteration"] == (killed_in_epoch - 1) * per_epoch
        assert not (folder / "models" / "model.pt").exists()
        isp = next(v for k, v in state["handlers"].items() if k.startswith("ISPHandler"))
        assert isp["done"] == (killed_in_epoch > 2)
        assert len(isp["ids"]) == (n_train if killed_in_epoch > 2 else 0)

    code, output = _run(_command(config, folder, "--resume", "true"))  # the documented command
    assert code == 0, output[-3000:]
    assert "epoch 2 of 4 done" in output and "ISP after epoch 2" not in output  # not perturbed twice
    _assert_same(_final(folder), whole)


class _Interrupt(Exception):
    pass


def _interrupt_at(iteration: int) -> str:
    return (f"$@train#trainer.add_event_handler(ignite.engine.Events.ITERATION_COMPLETED(once={iteration}), "
            f"lambda engine: (_ for _ in ()).throw(RuntimeError('interrupted at iteration {iteration}')))")


def test_an_isr_run_interrupted_after_the_influence_step_resumes_with_its_sample_weights(tmp_path):
    """In process (fast): ISR's weights live in the loss; a run stopped in epoch 3 resumes with them."""
    from robustmri.engine.workflow import execute, load_workflow

    overrides = {"spatial_size": 32, "network_padding": 2, "synthetic_patients": 30, "batch_size": 8,
                 "dataset_dir": "", "epochs": 3, "influence_epoch": 1, "seed": 2}

    def run(name, resume=False, stop_in_epoch=None):
        workflow = load_workflow(BUNDLE, ["isr.json"], {**overrides, "resume": resume,
                                                        "ckpt_dir": str(tmp_path / name / "models"),
                                                        "output_dir": str(tmp_path / name / "eval")},
                                 drop_handlers=("ProgressBar",))
        if stop_in_epoch is not None:
            per_epoch = len(workflow.parser.get_parsed_content("train#dataloader"))
            iteration = (stop_in_epoch - 1) * per_epoch + per_epoch // 2
            workflow.parser["initialize"] = [*workflow.parser["initialize"], _interrupt_at(iteration)]
        execute(workflow)
        return workflow.parser.get_parsed_content("loss")

    whole = run("whole")
    with pytest.raises(Exception):
        run("cut", stop_in_epoch=3)
    state = torch.load(tmp_path / "cut" / "models" / "training_state.pt", weights_only=True)
    assert state["epoch"] == 2
    saved = next(v for k, v in state["handlers"].items() if k.startswith("SampleWeightedCrossEntropy"))
    assert saved["weights_by_id"] is not None and saved["weights_by_id"].max() > 1.0  # ISR's weights, in [1, 2]
    resumed = run("cut", resume=True)
    assert torch.equal(resumed.weights_by_id, whole.weights_by_id)
    for name in ("model.pt", "model_best_val.pt"):
        a = torch.load(tmp_path / "whole" / "models" / name, weights_only=True)
        b = torch.load(tmp_path / "cut" / "models" / name, weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    history = [json.loads((tmp_path / n / "eval" / "history.json").read_text()) for n in ("whole", "cut")]
    assert history[0] == history[1] and len(history[0]) == 3


# -- ALR, MW-Net and PINT: their handlers' own state (peer network, weight net, teacher) resumes too -----------------

#: Noisy labels (what the three methods are for), 3 or 4 epochs: ALR co-teaches for 2 epochs, then relabels 3 samples
#: after epochs 2 and 3 and fine-tunes; PINT's teacher takes over after epoch 1.
METHOD_RUNS = {
    "alr": {"epochs": 4, "alr_phase1_epochs": 2, "alr_rounds": 2, "alr_budget": 3},
    "mwnet": {"epochs": 3},
    "pint": {"epochs": 3, "pint_warmup_epochs": 1},
}
#: The epochs in whose middle the run is killed, one after another (each time resumed with ``resume``).
KILLED_IN = {"alr": (2, 3), "mwnet": (2,), "pint": (2,)}
HANDLER = {"alr": "ALRHandler#0", "mwnet": "MWNetHandler#0", "pint": "PINTHandler#0"}


def _method_workflow(tmp_path, method, folder, data, resume=False, kill_at=None):
    from robustmri.engine.workflow import inject_protocol, load_workflow

    overrides = {"spatial_size": 32, "network_padding": 2, "synthetic_patients": 30, "batch_size": 8,
                 "dataset_dir": "", "seed": 4, "label_noise": "symmetric", "label_noise_rate": 0.2,
                 **METHOD_RUNS[method], "resume": resume, "ckpt_dir": str(tmp_path / folder / "models"),
                 "output_dir": str(tmp_path / folder / "eval")}
    workflow = load_workflow(BUNDLE, [f"{method}.json"], overrides, drop_handlers=("ProgressBar",))
    if data is not None:
        inject_protocol(workflow, data)
    if kill_at is not None:  # SIGKILL to this very process when that iteration completes
        kill_at_iteration(workflow, kill_at)
    return workflow


def _method_final(folder, method):
    from robustmri.methods import registry

    return {"model": torch.load(folder / "models" / "model.pt", weights_only=True),
            "best": torch.load(folder / "models" / "model_best_val.pt", weights_only=True),
            "history": json.loads((folder / "eval" / "history.json").read_text()),
            "summary": json.loads((folder / "eval" / registry()[method].summary).read_text())}


@pytest.mark.forks_training
@pytest.mark.parametrize("method", ["alr", "mwnet", "pint"])
def test_alr_mwnet_and_pint_killed_mid_epoch_and_resumed_end_like_an_uninterrupted_run(tmp_path, method):
    from robustmri.data.protocol import build_protocol
    from robustmri.engine.workflow import execute, protocol_arguments

    data = build_protocol(**protocol_arguments(_method_workflow(tmp_path, method, "probe", None)))
    execute(_method_workflow(tmp_path, method, "whole", data))
    whole = _method_final(tmp_path / "whole", method)
    epochs = METHOD_RUNS[method]["epochs"]
    state = torch.load(tmp_path / "whole" / "models" / "training_state.pt", weights_only=True)
    per_epoch = state["iteration"] // epochs

    models = tmp_path / "cut" / "models"
    for k, killed_in_epoch in enumerate(KILLED_IN[method]):
        iteration = (killed_in_epoch - 1) * per_epoch + per_epoch // 2
        code = killed_in_a_child(lambda: execute(_method_workflow(tmp_path, method, "cut", data, resume=k > 0,
                                                                   kill_at=iteration)))
        assert code == -signal.SIGKILL
        state = torch.load(models / "training_state.pt", weights_only=True)
        assert state["epoch"] == killed_in_epoch - 1 and not (models / "model.pt").exists()
        saved = state["handlers"][HANDLER[method]]
        if method == "alr":  # after epoch 2 (phase 1's last): the kept set and round 1's relabelled samples
            assert int(saved["relabelled"].sum()) == (3 if killed_in_epoch == 3 else 0)
            assert len(saved["rounds_log"]) == (1 if killed_in_epoch == 3 else 0)
            assert bool(saved["kept"].any()) == (killed_in_epoch == 3)
            assert saved["vog"]["main"]["seen"].any()
        elif method == "pint":
            assert saved["updates"] == per_epoch and len(saved["history"]) == 1
        else:
            assert len(saved["history"]) == 1 and saved["meta_optimizer"]["state"]

    execute(_method_workflow(tmp_path, method, "cut", data, resume=True))
    resumed = _method_final(tmp_path / "cut", method)
    assert resumed["history"] == whole["history"] and len(whole["history"]) == epochs
    assert resumed["summary"] == whole["summary"]  # the method's own per-epoch record (and ALR's rounds)
    for name in ("model", "best"):
        for key, value in whole[name].items():
            assert torch.equal(resumed[name][key], value), (name, key)


@pytest.mark.slow
def test_resume_true_after_another_run_ends_in_one_line_naming_why(tmp_path):
    """The command a user types, after a run of another config: one line and exit status 1, no traceback."""
    quick = ["--spatial_size", "32", "--network_padding", "2", "--epochs", "1", "--synthetic_patients", "40",
             "--dataset_dir", "", *output_dirs(tmp_path)]
    code, output = _run([sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
                         "['configs/train.json','configs/quick.json']", *quick, "--resume", "true"])
    state = tmp_path / "models" / "training_state.pt"
    assert code == 0 and f"resume: no training state at {state}; starting from epoch 1" in output, output[-3000:]

    code, output = _run([sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
                         "['configs/isr.json','configs/quick.json']", *quick, "--influence_epoch", "1",
                         "--resume", "true"])
    last = output.strip().splitlines()[-1]
    assert code == 1 and "Traceback" not in output, output[-3000:]
    assert last.startswith(f"{state}: cannot resume: it was written by another run (method 'naive' there, ")
    assert last.endswith("resume with the command that wrote it, or start afresh with another ckpt_dir "
                         "(or without the file)")
