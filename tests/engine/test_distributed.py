"""Multi-process training through ``configs/multi_gpu_train.json``: ``torchrun --nproc_per_node=2`` on the CPU (gloo).

Two processes on a small machine check the logic (the overlay merges, the ranks agree, rank 0
alone writes), not speed. Every process started here is killed by its PID if it outlives its
time.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from helpers import TINY, output_dirs
from conftest import BUNDLE, ROOT

METHOD_CONFIGS = ["train", "isr", "isp", "at", "n2v", "alr", "mwnet", "pie", "pint", "audit"]


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def run_torchrun(args, nproc=2, timeout=420):
    """``torchrun --nproc_per_node=<nproc> -m monai.bundle <args>`` from ``bundle/``; ``(returncode, output)``."""
    env = {**os.environ, "BRAIN_TUMOR_DATA": "", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "monai.bundle", *map(str, args)]
    process = subprocess.Popen(command, cwd=BUNDLE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:  # the launcher and its workers share its session: end them all by its id
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    left = _left_behind(process.pid)
    assert not left, f"torchrun exited ({process.returncode}) and left {left} of its processes behind (killed now)"
    return process.returncode, output


def _left_behind(group: int, wait: float = 10.0) -> int:
    """How many processes of process group ``group`` outlived ``wait`` seconds (then killed by the group id)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return 0
        time.sleep(0.2)
    alive = sum(1 for pid in os.listdir("/proc") if pid.isdigit() and _group_of(int(pid)) == group)
    os.killpg(group, signal.SIGKILL)
    return max(alive, 1)


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


@pytest.mark.parametrize("method", METHOD_CONFIGS)
def test_the_overlay_merges_onto_every_method_config(method):
    """Parsed (not run) without a process group: the DDP pieces are in place for every method."""
    from robustmri.engine.workflow import load_workflow

    workflow = load_workflow(BUNDLE, [f"{method}.json", "multi_gpu_train.json"], {"dataset_dir": ""})
    parser = workflow.parser
    assert parser["network#_target_"] == "robustmri.engine.distributed.prepare_distributed_network"
    assert "for_this_rank" in parser["train#trainer#train_handlers"]
    assert "@method_handlers" in parser["train#trainer#train_handlers"]
    assert parser["train#sampler#_target_"] == "robustmri.data.in_memory.EpochSampler"  # the seeded order, sharded
    assert parser["initialize"][0] == "$robustmri.engine.distributed.init_process_group()"
    assert parser["ema#network"] == "$robustmri.influence.adapter.unwrap(@network)"
    if method in ("isr", "isp", "audit", "pie"):
        assert "@" + {"isr": "isr", "isp": "isp", "audit": "audit", "pie": "pie"}[method] in json.dumps(
            parser["method_handlers"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["isr", "isp"])
def test_isr_and_isp_train_under_torchrun_with_two_processes(tmp_path, method):
    code, output = run_torchrun(["run", "training", "--config_file",
                                 f"['configs/{method}.json','configs/multi_gpu_train.json']", *TINY,
                                 "--epochs", "3", "--influence_epoch", "1", "--dataset_dir", "",
                                 *output_dirs(tmp_path)])
    assert code == 0, output[-4000:]
    assert "rank 0 of 2 (gloo)" in output and "rank 1 of 2 (gloo)" in output
    models, evaluation = tmp_path / "models", tmp_path / "eval"
    model = torch.load(models / "model.pt", weights_only=True)
    assert not any(key.startswith("module.") for key in model)  # the network itself, not its DDP wrapper
    assert json.loads((models / "model_metadata.json").read_text())["trained_with"]["network"].endswith("PaperCNN")
    history = json.loads((evaluation / "history.json").read_text())
    assert [entry["epoch"] for entry in history] == [1, 2, 3]
    summary = json.loads((evaluation / "influence_summary.json").read_text())
    assert summary["method"] == method.upper() and summary["n_train"] > 0
    assert len(list(evaluation.glob("events.out.tfevents.*"))) == 2  # rank 0's trainer and evaluator files only
    state = torch.load(models / "training_state.pt", weights_only=True)
    assert state["epoch"] == 3
    # every rank ended with rank 0's weights: the saved state's network averaged into model.pt
    assert output.count(f"{method.upper()} after epoch 1") == 2  # the step ran on both ranks


def _dump_handler_state(tmp_path, method: str) -> str:
    """An overlay: when training completes, every rank saves the method handler's resumable state as
    ``handler_rank<r>.pt`` in the output folder (only rank 0 writes otherwise: this shows what each rank holds)."""
    path = tmp_path / f"dump_{method}.json"
    path.write_text(json.dumps({"+initialize": [
        f"$@train#trainer.add_event_handler(ignite.engine.Events.COMPLETED, lambda engine, handler=@{method}, "
        "folder=@output_dir: torch.save(handler.training_state(), "
        "os.path.join(folder, f'handler_rank{robustmri.engine.distributed.rank()}.pt')))"]}))
    return str(path)


def assert_same_state(a, b, path="state"):
    """Tensors equal, and everything else equal, throughout two nested states."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        for key in a:
            assert_same_state(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for k, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{k}]")
    else:
        assert a == b, (path, a, b)


#: Noisy labels and schedules that give each method's own step something to do in 3 epochs: ALR co-teaches for 2
#: epochs, relabels 3 samples after epoch 2 and fine-tunes on its pool in epoch 3; PINT's teacher takes over after
#: epoch 1.
NOISY_METHOD = ["--label_noise", "symmetric", "--label_noise_rate", "0.2", "--epochs", "3", "--alr_phase1_epochs", "2",
                "--alr_rounds", "1", "--alr_budget", "3", "--pint_warmup_epochs", "1"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["alr", "mwnet", "pint"])
def test_alr_mwnet_and_pint_train_under_torchrun_and_every_rank_holds_the_same_method_state(tmp_path, method):
    """Trains to the end with 2 gloo ranks; rank 0 writes model.pt and the method's summary; the peer network,
    weight net or teacher (and every record) that each rank holds at the end are identical."""
    from robustmri.methods import registry

    configs = f"['configs/{method}.json','configs/multi_gpu_train.json','{_dump_handler_state(tmp_path, method)}']"
    code, output = run_torchrun(["run", "training", "--config_file", configs, *TINY, *NOISY_METHOD,
                                 "--dataset_dir", "", *output_dirs(tmp_path)])
    assert code == 0, output[-4000:]
    assert "rank 0 of 2 (gloo)" in output and "rank 1 of 2 (gloo)" in output
    models, evaluation = tmp_path / "models", tmp_path / "eval"
    model = torch.load(models / "model.pt", weights_only=True)
    assert not any(key.startswith("module.") for key in model)
    assert [entry["epoch"] for entry in json.loads((evaluation / "history.json").read_text())] == [1, 2, 3]
    assert len(list(evaluation.glob("events.out.tfevents.*"))) == 2  # rank 0's trainer and evaluator files only
    summary = json.loads((evaluation / registry()[method].summary).read_text())
    ranks = [torch.load(evaluation / f"handler_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert_same_state(ranks[0], ranks[1])
    if method == "alr":
        assert [e["phase"] for e in summary["epochs"]] == [1, 1, 2]
        # the ranks' selections pooled: with forget rate 0 in epoch 1 every training sample is picked once
        assert summary["epochs"][0]["selected_for_main"] == len(ranks[0]["labels"])
        assert len(summary["rounds"]) == 1 and summary["rounds"][0]["relabelled"] == 3
        assert int(ranks[0]["relabelled"].sum()) == 3
    elif method == "mwnet":
        assert [e["epoch"] for e in summary["history"]] == [1, 2, 3]
    else:
        history = summary["history"]
        assert [e["warmup"] for e in history] == [True, False, False]
        # pooled over both ranks' batches: the shares of pseudo-labels are over the whole epoch
        assert sum(history[1]["pseudo_label_class_shares"]) == pytest.approx(1.0)
        assert ranks[0]["updates"] == torch.load(models / "training_state.pt", weights_only=True)["iteration"]


@pytest.mark.slow
def test_evaluation_under_torchrun_reports_what_one_process_reports(tmp_path):
    """Train once (plain), then evaluate the test split with 2 ranks (sharded, gathered in order) and with 1."""
    from helpers import bundle

    bundle("run", "training", "--config_file", "configs/train.json", *TINY, "--epochs", "1", "--dataset_dir", "",
           *output_dirs(tmp_path))
    single = tmp_path / "single"
    bundle("run", "evaluating", "--config_file", "['configs/train.json','configs/evaluate.json']", "--dataset_dir", "",
           "--synthetic_patients", "30", "--batch_size", "8", "--ckpt_dir", tmp_path / "models",
           "--output_dir", single)
    code, output = run_torchrun(["run", "evaluating", "--config_file",
                                 "['configs/train.json','configs/evaluate.json','configs/multi_gpu_evaluate.json']",
                                 "--dataset_dir", "",
                                 "--synthetic_patients", "30", "--batch_size", "8", "--ckpt_dir", tmp_path / "models",
                                 "--output_dir", tmp_path / "two"])
    assert code == 0, output[-4000:]
    one = json.loads((single / "test" / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "test" / "summary.json").read_text())
    for tag in ("best", "last"):
        for key in ("n", "accuracy", "macro_f1", "roc_auc_macro"):
            assert two[tag][key] == pytest.approx(one[tag][key], rel=1e-6), (tag, key)


def _killing_rank_1(tmp_path, config: str, iteration: int, common: list[str]) -> list[str]:
    """``common`` (``--config_file`` first) with an overlay that SIGKILLs rank 1 when ``iteration`` completes."""
    killer = tmp_path / "kill.json"
    killer.write_text(json.dumps({"+initialize": [
        f"$@train#trainer.add_event_handler(ignite.engine.Events.ITERATION_COMPLETED(once={iteration}), "
        "lambda engine: os.kill(os.getpid(), 9) if robustmri.engine.distributed.rank() == 1 else None)"]}))
    return ["--config_file", f"['{config}','configs/multi_gpu_train.json','{killer}']", *common[2:]]


def _killed_in_epoch_3_and_resumed(tmp_path, config: str, epochs: int, common: list[str]) -> tuple[dict, str]:
    """After the uninterrupted run in ``tmp_path / "whole"`` (``epochs`` epochs): the run in ``tmp_path / "cut"``
    with rank 1 SIGKILLed in epoch 3 (the state after epoch 2 saved, no model), then resumed with
    ``--resume true``; the state the killed run left and the resumed run's output."""
    per_epoch = torch.load(tmp_path / "whole" / "models" / "training_state.pt", weights_only=True)["iteration"] // epochs
    killed = _killing_rank_1(tmp_path, config, 2 * per_epoch + 1, common)
    code, output = run_torchrun(["run", "training", *killed, *output_dirs(tmp_path / "cut")])
    assert code != 0
    state = torch.load(tmp_path / "cut" / "models" / "training_state.pt", weights_only=True)
    assert state["epoch"] == 2 and not (tmp_path / "cut" / "models" / "model.pt").exists()
    code, output = run_torchrun(["run", "training", *common, *output_dirs(tmp_path / "cut"), "--resume", "true"])
    assert code == 0, output[-4000:]
    return state, output


@pytest.mark.slow
def test_a_torchrun_run_killed_after_the_influence_step_resumes_to_the_same_end(tmp_path):
    """2 ranks: SIGKILL one rank mid-epoch 3 (the launcher then ends the other), resume with ``--resume true``."""
    common = ["--config_file", "['configs/isp.json','configs/multi_gpu_train.json']", *TINY, "--epochs", "4",
              "--influence_epoch", "2", "--dataset_dir", ""]
    code, output = run_torchrun(["run", "training", *common, *output_dirs(tmp_path / "whole")])
    assert code == 0, output[-4000:]
    state, output = _killed_in_epoch_3_and_resumed(tmp_path, "configs/isp.json", 4, common)
    assert "ISP after epoch 2" not in output
    for name in ("model.pt", "model_best_val.pt"):
        whole = torch.load(tmp_path / "whole" / "models" / name, weights_only=True)
        resumed = torch.load(tmp_path / "cut" / "models" / name, weights_only=True)
        assert all(torch.equal(whole[k], resumed[k]) for k in whole), name
    assert (json.loads((tmp_path / "whole" / "eval" / "history.json").read_text())
            == json.loads((tmp_path / "cut" / "eval" / "history.json").read_text()))


@pytest.mark.slow
def test_an_alr_torchrun_run_killed_after_its_relabelling_round_resumes_to_the_same_end(tmp_path):
    """2 ranks: SIGKILL rank 1 in epoch 3 (fine-tuning on the pool after the round of epoch 2), resume with
    ``--resume true``: the same weights, history and ALR record as the uninterrupted 2-rank run."""
    common = ["--config_file", "['configs/alr.json','configs/multi_gpu_train.json']", *TINY, *NOISY_METHOD,
              "--dataset_dir", ""]
    code, output = run_torchrun(["run", "training", *common, *output_dirs(tmp_path / "whole")])
    assert code == 0, output[-4000:]
    assert output.count("ALR round 1:") == 2  # logged by both ranks
    state, output = _killed_in_epoch_3_and_resumed(tmp_path, "configs/alr.json", 3, common)
    assert int(state["handlers"]["ALRHandler#0"]["relabelled"].sum()) == 3  # the round is in the saved state
    assert "ALR round" not in output  # not relabelled again
    for name in ("model.pt", "model_best_val.pt"):
        whole = torch.load(tmp_path / "whole" / "models" / name, weights_only=True)
        resumed = torch.load(tmp_path / "cut" / "models" / name, weights_only=True)
        assert all(torch.equal(whole[k], resumed[k]) for k in whole), name
    for name in ("history.json", "alr_summary.json"):
        assert (json.loads((tmp_path / "whole" / "eval" / name).read_text())
                == json.loads((tmp_path / "cut" / "eval" / name).read_text())), name


def _in_two_gloo_ranks(tmp_path, work, timeout=60) -> list:
    """``work(rank)`` in 2 forked processes joined in a gloo group (no interpreter start-up); each rank's result.
    A process that outlives ``timeout`` is killed by its PID."""
    import multiprocessing

    def main(rank):
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=rank, world_size=2)
        try:
            torch.save(work(rank), tmp_path / f"rank{rank}.pt")
        finally:
            dist.destroy_process_group()

    processes = [multiprocessing.get_context("fork").Process(target=main, args=(r,)) for r in (0, 1)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout)
        if process.is_alive():
            os.kill(process.pid, signal.SIGKILL)
            process.join()
    assert [p.exitcode for p in processes] == [0, 0]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def test_the_helpers_methods_use_across_ranks_give_every_rank_the_pooled_result(tmp_path):
    """VoG records pooled (a sample recorded on both ranks keeps the mean), gradients averaged, lists gathered in
    rank order, rank 0's object broadcast: checked against what one process computes from both ranks' inputs."""
    from robustmri.engine import distributed
    from robustmri.methods.alr import VoGTracker

    ids = [10, 11, 12]
    recorded = {0: ([10, 11], torch.tensor([[1.0, 2.0], [3.0, 4.0]])), 1: ([12, 11], torch.tensor([[5.0, 6.0],
                                                                                                   [7.0, 8.0]]))}
    grads = {0: torch.tensor([1.0, -2.0, 3.0]), 1: torch.tensor([3.0, 2.0, 0.0])}

    def work(rank):
        tracker = VoGTracker(ids, dim=2, window=2)
        tracker.start_epoch(1)
        tracker.record([10, 11, 12], torch.full((3, 2), 9.0))  # an older epoch, the same on both ranks
        tracker.start_epoch(2)
        tracker.record(*recorded[rank])
        tracker.share_epoch()
        parameter = torch.nn.Parameter(torch.zeros(3))
        parameter.grad = grads[rank].clone()
        distributed.average_gradients([parameter])
        return {"vog": tracker.state_dict(), "scores": tracker.scores(ids), "grad": parameter.grad,
                "gathered": distributed.gather_lists([f"r{rank}a", f"r{rank}b"]),
                "broadcast": distributed.broadcast_object(f"from {rank}"),
                "max": distributed.all_reduce(torch.tensor([rank, 1 - rank]), torch.distributed.ReduceOp.MAX)}

    ranks = _in_two_gloo_ranks(tmp_path, work)
    one = VoGTracker(ids, dim=2, window=2)  # one process that saw both ranks' batches (11 twice: their mean)
    one.start_epoch(1)
    one.record(ids, torch.full((3, 2), 9.0))
    one.start_epoch(2)
    one.record([10, 11, 12], torch.tensor([[1.0, 2.0], [5.0, 6.0], [5.0, 6.0]]))
    for result in ranks:
        assert torch.equal(result["vog"]["gradients"], one.gradients) and torch.equal(result["vog"]["seen"], one.seen)
        np.testing.assert_allclose(result["scores"], one.scores(ids))
        assert torch.equal(result["grad"], torch.tensor([2.0, 0.0, 1.5]))
        assert result["gathered"] == ["r0a", "r0b", "r1a", "r1b"] and result["broadcast"] == "from 0"
        assert result["max"].tolist() == [1, 1]
