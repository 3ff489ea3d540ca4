"""The weight average (``ema``) and the trained model written at the end (``model.pt``)."""

import os

import pytest
import torch
from ignite.engine import Engine, Events
from torch import nn

from robustmri.engine.checkpoint import SaveFinalModel
from robustmri.engine.ema import UpdateWeightAverage, WeightAverage
from robustmri.engine.training_state import attached_weight_average


def _network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 2))


def _train(network: nn.Module, steps: int, handlers=()) -> Engine:
    """``steps`` SGD steps on fixed random batches, with ``handlers`` attached to the engine."""
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 1, 6, 6, generator=generator), torch.randint(0, 2, (4,), generator=generator))
               for _ in range(steps)]

    def step(engine, batch):
        network.train()
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(network(batch[0]), batch[1])
        loss.backward()
        optimizer.step()
        return loss.item()

    engine = Engine(step)
    for handler in handlers:
        handler.attach(engine)
    engine.run(batches, max_epochs=1)
    return engine


def test_the_average_follows_its_recurrence_for_weights_and_batchnorm_statistics():
    network = _network()
    average = WeightAverage(network, decay=0.9)
    expected, history = None, []

    def record(engine):  # the hand recurrence, from the states after each step
        nonlocal expected
        state = {k: v.detach().clone() for k, v in network.state_dict().items()}
        history.append(state)
        if expected is None:
            expected = {k: v.clone() for k, v in state.items()}
        else:
            expected = {k: (0.9 * expected[k] + 0.1 * v) if v.is_floating_point() else v.clone()
                        for k, v in state.items()}

    class Recorder:
        def attach(self, engine):
            engine.add_event_handler(Events.ITERATION_COMPLETED, record)

    _train(network, 6, [average, Recorder()])
    assert average.updates == 6
    for key, value in average.model.state_dict().items():
        assert torch.allclose(value, expected[key], atol=1e-6), key
    # it is an average, not the last weights, and BatchNorm's statistics are averaged too
    assert not torch.allclose(average.model.state_dict()["0.weight"], history[-1]["0.weight"])
    assert not torch.allclose(average.model.state_dict()["1.running_mean"], history[-1]["1.running_mean"])
    assert average.model.state_dict()["1.num_batches_tracked"] == history[-1]["1.num_batches_tracked"]  # copied
    assert not any(p.requires_grad for p in average.model.parameters())


def test_the_average_never_changes_what_is_trained():
    plain, averaged = _network(), _network()
    _train(plain, 5)
    _train(averaged, 5, [WeightAverage(averaged, decay=0.99)])
    for key, value in plain.state_dict().items():
        assert torch.equal(value, averaged.state_dict()[key]), key


def test_without_a_decay_the_model_is_the_network_itself():
    network = _network()
    average = WeightAverage(network, decay=None)
    engine = _train(network, 2, [average])
    assert average.model is network and not average.enabled and attached_weight_average(engine) is None


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 2])
def test_a_decay_outside_the_open_unit_interval_is_refused(decay):
    with pytest.raises(ValueError, match="ema_decay must lie in"):
        WeightAverage(_network(), decay=decay)


def test_state_round_trip_and_a_different_decay_is_refused():
    network = _network()
    average = WeightAverage(network, decay=0.9)
    engine = _train(network, 3, [average])
    assert attached_weight_average(engine) is average
    other = WeightAverage(network, decay=0.9)
    other.load_state_dict(average.state_dict())
    assert other.updates == 3
    for key, value in average.model.state_dict().items():
        assert torch.equal(value, other.model.state_dict()[key])
    with pytest.raises(ValueError, match="decay 0.9, this run 0.5"):
        WeightAverage(network, decay=0.5).load_state_dict(average.state_dict())


def test_the_final_model_is_written_on_completion_only(tmp_path):
    network = _network()
    path = tmp_path / "models" / "model.pt"
    _train(network, 2, [SaveFinalModel(network, str(path))])
    saved = torch.load(path, weights_only=True)
    assert saved.keys() == network.state_dict().keys() and not os.path.exists(f"{path}.partial")
    assert all(torch.equal(v, network.state_dict()[k]) for k, v in saved.items())

    stopped = tmp_path / "stopped.pt"

    class Stop:
        def attach(self, engine):
            engine.add_event_handler(Events.ITERATION_COMPLETED(once=1), lambda e: e.terminate())

    engine = Engine(lambda engine, batch: None)
    Stop().attach(engine)
    SaveFinalModel(network, str(stopped)).attach(engine)
    engine.run([0, 1, 2], max_epochs=3)  # terminated during epoch 1 of 3: not a trained model
    assert not stopped.exists()


def test_the_config_handler_updates_the_average_it_is_given():
    network = _network()
    average = WeightAverage(network, decay=0.9)
    engine = _train(network, 3, [UpdateWeightAverage(average)])
    assert average.updates == 3 and attached_weight_average(engine) is average
