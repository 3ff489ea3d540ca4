"""The label audit and PIE under a process group (2 gloo ranks on the CPU) mean what they mean in one process.

Audit: influence scores, self-influence and losses from 2 ranks equal those of 1 process within
1e-5 relative, and the rankings and precision at k are the same. PIE: the hard-sample mask and
the loss weights are the same. The ranks start with different BatchNorm statistics (as after
training on different batches): both steps must take rank 0's. Worker processes are joined
with a timeout and killed by PID. The end-to-end runs start ``torchrun --nproc_per_node=2`` on
``audit.json`` and ``pie.json`` with ``multi_gpu_train.json`` (gloo).
"""

import copy
import json
import os
import re

import numpy as np
import pytest
import torch

from robustmri.engine.losses import SampleWeightedCrossEntropy
from robustmri.influence import influence_ranking
from robustmri.methods.audit import AuditHandler, loss_ranking
from robustmri.methods.pie import PIEHandler, find_hard_samples, finetune
from robustmri.networks import PaperCNN

from engine.test_distributed import run_torchrun
from helpers import NOISY, TINY, assert_close, output_dirs, run_ranks

SIZE, N_TRAIN, N_VAL = 32, 31, 11  # odd counts: the shards differ in length
SPARSITY = 0.3
FINETUNE_SEED = 123  # the torch random state the fine-tune starts from, in one process and on rank 0


def _data(seed=0):
    """Training items with a recorded true label (every fourth flipped) and a validation set."""
    rng = np.random.default_rng(seed)

    def items(n, offset):
        return [{"image": rng.random((1, SIZE, SIZE), dtype=np.float32), "label": int(rng.integers(0, 3)),
                 "id": offset + k, "file": f"s{offset + k}.png"} for k in range(n)]
    train, val = items(N_TRAIN, 0), items(N_VAL, 1000)
    for k, item in enumerate(train):
        item["true_label"] = (item["label"] + 1) % 3 if k % 4 == 0 else item["label"]
    return train, val


def _trained_state() -> dict:
    """A network fitted a little to the training items, so that pruning changes some predictions and not all."""
    torch.manual_seed(0)
    network = PaperCNN(in_channels=1, num_classes=3, spatial_size=SIZE, padding=2)
    finetune(network, _data()[0], steps=40, lr=3e-3, batch_size=8)
    return network.state_dict()


def _network(state: dict, bn_seed: int) -> torch.nn.Module:
    """The same weights everywhere; BatchNorm statistics from ``bn_seed``'s batches (a rank's own)."""
    network = PaperCNN(in_channels=1, num_classes=3, spatial_size=SIZE, padding=2)
    network.load_state_dict(state)
    network.train()
    generator = torch.Generator().manual_seed(bn_seed)
    with torch.no_grad():
        for _ in range(3):
            network(torch.rand(8, 1, SIZE, SIZE, generator=generator) * (1 + (bn_seed - 10)))  # rank 1: brighter
    return network.eval()


def _steps(network, output_dir):
    """The audit and PIE after one epoch on fresh copies of the data; what each produced."""
    train, val = _data()
    audit = AuditHandler(1, copy.deepcopy(train), val, os.path.join(output_dir, "audit"), ks=[3, 0.5, "flipped"],
                         batch_size=8)
    audit.run(None, copy.deepcopy(network), torch.device("cpu"))  # each step must take rank 0's network itself
    loss = SampleWeightedCrossEntropy()
    pie = PIEHandler(loss, 1, copy.deepcopy(train), os.path.join(output_dir, "pie"), sparsity=SPARSITY,
                     finetune_steps=4, finetune_lr=0.01, batch_size=8, seed=3)
    torch.manual_seed(FINETUNE_SEED)
    pie.run(None, copy.deepcopy(network), torch.device("cpu"))
    return {"audit": audit.values, "report": audit.report, "hard": pie.result["hard"],
            "pie_ids": pie.result["ids"], "dense": pie.result["dense_prediction"],
            "pruned": pie.result["pruned_prediction"], "weights": loss.weights_by_id}


def _worker(rank, world_size, port, folder):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world_size)
    try:
        state = torch.load(os.path.join(folder, "state.pt"), weights_only=True)
        result = _steps(_network(state, bn_seed=10 + rank), os.path.join(folder, f"rank{rank}"))
        torch.save(result, os.path.join(folder, f"result{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()








@pytest.mark.slow
def test_two_ranks_audit_and_find_hard_samples_as_one_process(tmp_path):
    state = _trained_state()
    torch.save(state, tmp_path / "state.pt")
    single = _steps(_network(state, bn_seed=10), str(tmp_path / "single"))  # rank 0's BatchNorm statistics
    ranks = run_ranks(_worker, tmp_path, timeout=150)
    other_bn = _steps(_network(state, bn_seed=11), str(tmp_path / "other"))
    assert not torch.allclose(other_bn["audit"]["scores"], single["audit"]["scores"], rtol=1e-4)  # they matter
    assert not torch.allclose(other_bn["audit"]["self_influence"], single["audit"]["self_influence"], rtol=1e-4)
    assert not np.array_equal(other_bn["dense"][N_TRAIN // 2 + 1:], single["dense"][N_TRAIN // 2 + 1:])
    one = single["audit"]
    assert 0 < len(single["hard"]) < N_TRAIN  # pruning changed some predictions, not all
    unrepaired = find_hard_samples(_network(state, bn_seed=10), _data()[0], SPARSITY, finetune_steps=0)
    assert not np.array_equal(unrepaired["pruned_prediction"][N_TRAIN // 2 + 1:],
                              single["pruned"][N_TRAIN // 2 + 1:])  # rank 1's shard needs rank 0's fine-tune
    for result in ranks:
        audit = result["audit"]
        assert torch.equal(audit["ids"], one["ids"]) and torch.equal(audit["labels"], one["labels"])
        for key in ("scores", "self_influence", "losses"):
            assert_close(audit[key], one[key])
        np.testing.assert_array_equal(influence_ranking(audit["scores"]), influence_ranking(one["scores"]))
        np.testing.assert_array_equal(influence_ranking(audit["self_influence"]),
                                      influence_ranking(one["self_influence"]))
        np.testing.assert_array_equal(loss_ranking(audit["losses"]), loss_ranking(one["losses"]))
        assert result["report"].pop("ranks") == 2
        assert result["report"] == single["report"]  # precision at k of every ranking, and the counts
        np.testing.assert_array_equal(result["pie_ids"], single["pie_ids"])
        np.testing.assert_array_equal(result["hard"], single["hard"])
        np.testing.assert_array_equal(result["dense"], single["dense"])
        np.testing.assert_array_equal(result["pruned"], single["pruned"])
        assert torch.equal(result["weights"], single["weights"])
    for key in ("scores", "self_influence", "losses"):  # every rank holds the very same numbers
        assert torch.equal(ranks[0]["audit"][key], ranks[1]["audit"][key])
    assert {row["k"] for row in single["report"]["precision_at_k"]} == {3, 8, 16}
    assert {"influence", "self_influence", "loss", "random"} <= set(single["report"]["precision_at_k"][0])
    assert (single["weights"] == 2.0).sum() == len(single["hard"])
    # rank 0 alone writes
    for name in ("audit/audit_summary.json", "audit/audit_ranking.csv", "pie/pie_summary.json",
                 "pie/pie_hard_samples.csv"):
        assert (tmp_path / "rank0" / name).is_file()
        assert not (tmp_path / "rank1" / name).exists()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["audit", "pie"])
def test_audit_and_pie_run_under_torchrun_with_two_processes(tmp_path, method):
    """Both ranks log the same result of the step; rank 0 alone writes its files."""
    extra = ["--audit_epoch", "2"] if method == "audit" else ["--pie_epoch", "1", "--pie_sparsity", "0.5",
                                                              "--pie_finetune_steps", "3"]
    code, output = run_torchrun(["run", "training", "--config_file",
                                 f"['configs/{method}.json','configs/multi_gpu_train.json']", *TINY, *NOISY,
                                 "--epochs", "2", "--dataset_dir", "", *extra, *output_dirs(tmp_path)])
    assert code == 0, output[-4000:]
    assert "rank 0 of 2 (gloo)" in output and "rank 1 of 2 (gloo)" in output
    pattern = r"label audit after epoch 2: .*" if method == "audit" else r"PIE after epoch 1: .*"
    lines = re.findall(pattern, output)
    assert len(lines) == 2 and lines[0] == lines[1], lines  # the step ran on both ranks, with the same result
    summary = json.loads((tmp_path / "eval" / f"{method}_summary.json").read_text())
    if method == "audit":
        assert summary["ranks"] == 2 and summary["self_influence"] and summary["precision_at_k"]
        assert len((tmp_path / "eval" / "audit_ranking.csv").read_text().splitlines()) == summary["n"] + 1
    else:
        assert abs(summary["achieved_sparsity"] - 0.5) < 0.01
        rows = (tmp_path / "eval" / "pie_hard_samples.csv").read_text().splitlines()
        assert len(rows) == summary["n_hard"] + 1
