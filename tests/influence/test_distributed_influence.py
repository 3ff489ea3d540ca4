"""The influence step under a process group (2 gloo ranks on the CPU) means what it means in one process.

Scores, ISR weights and ISP's perturbed images from 2 ranks equal those of 1 process within
1e-5 relative. The ranks start with different BatchNorm statistics (as after training on
different batches): the step must take rank 0's. Worker processes are joined with a timeout
and killed by PID.
"""

import copy
import os

import numpy as np
import pytest
import torch

from robustmri.engine.losses import SampleWeightedCrossEntropy
from robustmri.influence.distributed import shard_bounds
from robustmri.methods.isp import ISPHandler
from robustmri.methods.isr import ISRHandler
from robustmri.networks import PaperCNN

from helpers import assert_close, run_ranks

SIZE, N_TRAIN, N_VAL = 32, 31, 11  # odd counts: the shards differ in length


def _data(seed=0):
    rng = np.random.default_rng(seed)
    def items(n, offset):
        return [{"image": rng.random((1, SIZE, SIZE), dtype=np.float32), "label": int(rng.integers(0, 3)),
                 "id": offset + k, "file": f"s{offset + k}.png"} for k in range(n)]
    return items(N_TRAIN, 0), items(N_VAL, 1000)


def _network(bn_seed: int) -> torch.nn.Module:
    """The same weights everywhere; BatchNorm statistics from ``bn_seed``'s batches (a rank's own)."""
    torch.manual_seed(0)
    network = PaperCNN(in_channels=1, num_classes=3, spatial_size=SIZE, padding=2)
    network.train()
    generator = torch.Generator().manual_seed(bn_seed)
    with torch.no_grad():
        for _ in range(3):
            network(torch.rand(8, 1, SIZE, SIZE, generator=generator))
    return network.eval()


def _step(network, output_dir, solver="exact"):
    """ISR and ISP after one epoch on fresh copies of the data; what each produced."""
    train, val = _data()
    loss = SampleWeightedCrossEntropy()
    isr = ISRHandler(loss, 1, copy.deepcopy(train), val, os.path.join(output_dir, "isr"), solver=solver, batch_size=8)
    isr.run(None, network, torch.device("cpu"))
    isp_train = copy.deepcopy(train)
    isp = ISPHandler(1, isp_train, val, os.path.join(output_dir, "isp"), solver=solver, batch_size=8, ratio=0.7)
    isp.run(None, network, torch.device("cpu"))
    return {"scores": isr.result.scores, "ids": isr.result.ids, "weights": loss.weights_by_id,
            "isp_scores": isp.result.scores,
            "images": torch.stack([torch.from_numpy(np.asarray(item["image"])) for item in isp_train]),
            "traffic": isp.traffic}


def _worker(rank, world_size, port, folder, solver):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world_size)
    try:
        result = _step(_network(bn_seed=10 + rank), os.path.join(folder, f"rank{rank}"), solver)
        torch.save(result, os.path.join(folder, f"result{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()








def test_shards_cover_every_sample_once():
    for n in (0, 1, 5, 31):
        for world in (1, 2, 3, 4):
            bounds = [shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(bounds[r][1] == bounds[r + 1][0] for r in range(world - 1))
            assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_two_ranks_give_the_scores_weights_and_images_of_one_process(tmp_path, solver):
    single = _step(_network(bn_seed=10), str(tmp_path / "single"), solver)  # rank 0's BatchNorm statistics
    ranks = run_ranks(_worker, tmp_path, solver)
    other_bn = _step(_network(bn_seed=11), str(tmp_path / "other"), solver)
    assert not torch.allclose(other_bn["scores"], single["scores"], rtol=1e-4)  # the statistics do matter
    for result in ranks:
        assert torch.equal(result["ids"], single["ids"])
        assert_close(result["scores"], single["scores"])
        assert_close(result["isp_scores"], single["isp_scores"])
        assert_close(result["weights"], single["weights"])
        assert_close(result["images"], single["images"])  # every rank holds the whole perturbed set
    assert torch.equal(ranks[0]["scores"], ranks[1]["scores"]) and torch.equal(ranks[0]["images"], ranks[1]["images"])
    assert not torch.equal(ranks[0]["images"], torch.stack([torch.from_numpy(i["image"]) for i in _data()[0]]))
    # rank 0 alone writes; the exchange is measured: a float32 image plus a few bytes per image
    assert (tmp_path / "rank0" / "isp" / "influence.csv").is_file()
    assert not (tmp_path / "rank1" / "isp").exists() or not any((tmp_path / "rank1" / "isp").iterdir())
    traffic = ranks[0]["traffic"]
    assert traffic["ranks"] == 2 and traffic["image_bytes"] == SIZE * SIZE * 4
    assert SIZE * SIZE * 4 <= traffic["bytes_per_image"] < SIZE * SIZE * 4 * 1.5
