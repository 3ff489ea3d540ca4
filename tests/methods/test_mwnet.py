import copy
import json

import numpy as np
import pytest
import torch
from monai.engines import SupervisedTrainer
from torch import nn

from robustmri.methods.mwnet import (
    MetaWeightedCrossEntropy,
    MWNetHandler,
    WeightNet,
    meta_loss_after_virtual_step,
)

from helpers import run_noisy, tiny_batches, tiny_network


def _data(n, seed, dim=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def test_meta_gradient_matches_central_finite_differences():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    weight_net = WeightNet(hidden=5).double()
    x, y = _data(10, 1)
    xm, ym = _data(6, 2)
    params = dict(weight_net.named_parameters())
    meta = meta_loss_after_virtual_step(model, weight_net, x, y, xm, ym, virtual_lr=0.5)
    analytic = torch.autograd.grad(meta, list(params.values()))
    assert sum(g.abs().sum() for g in analytic) > 1e-6  # the check is not vacuous
    eps = 1e-6
    for (name, p), g in zip(params.items(), analytic):
        for index in np.ndindex(*p.shape):
            shifted = {}
            for sign in (1, -1):
                perturbed = {k: v.detach().clone() for k, v in params.items()}
                perturbed[name][index] += sign * eps
                shifted[sign] = meta_loss_after_virtual_step(model, weight_net, x, y, xm, ym, 0.5, perturbed).item()
            numeric = (shifted[1] - shifted[-1]) / (2 * eps)
            assert numeric == pytest.approx(g[index].item(), rel=1e-5, abs=1e-9), f"{name}{index}"


def _train(network, loss, handlers, batches):
    optimiser = torch.optim.SGD(network.parameters(), lr=0.1)
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=2, train_data_loader=batches, network=network,
                                optimizer=optimiser, loss_function=loss, train_handlers=handlers)
    trainer.run()
    return network


def test_constant_weight_and_zero_meta_lr_reproduce_plain_training(tmp_path):
    torch.manual_seed(0)
    start = tiny_network()
    batches = tiny_batches(seed=3)
    plain = _train(copy.deepcopy(start), nn.CrossEntropyLoss(), [], batches)

    weight_net = WeightNet(hidden=7)
    nn.init.zeros_(weight_net.net[2].weight)  # V(l) = sigmoid(bias): the same weight for every loss
    before = copy.deepcopy(weight_net.state_dict())
    loss = MetaWeightedCrossEntropy(weight_net)
    val = [{"image": np.random.default_rng(i).random((1, 4, 4)).astype(np.float32), "label": i % 3, "id": i}
           for i in range(10)]
    handler = MWNetHandler(loss, val, str(tmp_path), meta_lr=0.0, virtual_lr=0.1, meta_batch_size=4)
    reweighted = _train(copy.deepcopy(start), loss, [handler], batches)

    for key, value in plain.state_dict().items():  # parameters and BatchNorm buffers alike
        torch.testing.assert_close(reweighted.state_dict()[key].float(), value.float(), rtol=1e-5, atol=1e-6)
    for key, value in before.items():
        torch.testing.assert_close(weight_net.state_dict()[key], value, rtol=0, atol=0)
    assert len(handler.history) == 2 and (tmp_path / "mwnet_summary.json").is_file()


def test_the_meta_step_moves_the_weight_net(tmp_path):
    torch.manual_seed(0)
    weight_net = WeightNet(hidden=7)
    before = copy.deepcopy(weight_net.state_dict())
    loss = MetaWeightedCrossEntropy(weight_net)
    val = [{"image": np.full((1, 4, 4), i / 10, np.float32), "label": i % 3, "id": i} for i in range(10)]
    handler = MWNetHandler(loss, val, str(tmp_path), meta_lr=0.01)
    _train(tiny_network(), loss, [handler], tiny_batches(2, seed=3))
    assert any(not torch.equal(weight_net.state_dict()[k], v) for k, v in before.items())


@pytest.mark.slow
def test_mwnet_runs_and_reports_weights(tmp_path):
    summary = json.loads((run_noisy(tmp_path, "mwnet", "--epochs", "2") / "mwnet_summary.json").read_text())
    assert len(summary["history"]) == 2 and all(0 < w < 1 for w in summary["history"][-1]["weight_by_loss"].values())
    assert set(summary["final_mean_weight"]) == {"wrong_labels", "correct_labels"}
