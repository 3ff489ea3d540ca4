"""The sample-weighted loss that ISR and PIE hand to the stock trainer."""

import torch
from ignite.engine import Engine, Events
from torch import nn

from robustmri.engine.losses import SampleWeightedCrossEntropy, weighted_cross_entropy


def test_unit_weights_give_plain_cross_entropy():
    logits, labels = torch.randn(7, 3), torch.randint(3, (7,))
    plain = nn.functional.cross_entropy(logits, labels)
    assert torch.allclose(weighted_cross_entropy(logits, labels, torch.ones(7)), plain)
    assert torch.allclose(weighted_cross_entropy(logits, labels, None), plain)
    doubled = weighted_cross_entropy(logits, labels, torch.full((7,), 2.0))
    assert torch.allclose(doubled, 2 * plain)


def test_sample_weighted_loss_looks_up_batch_ids():
    loss = SampleWeightedCrossEntropy()
    engine = Engine(lambda e, b: None)
    loss.attach(engine)
    logits, labels = torch.randn(3, 3), torch.tensor([0, 1, 2])
    batches = [{"id": torch.tensor([5, 9, 2])}]
    captured = {}

    @engine.on(Events.ITERATION_COMPLETED)
    def check(e):
        captured["unweighted"] = loss(logits, labels)
        loss.set_weights(torch.tensor([2, 5, 9]), torch.tensor([1.0, 2.0, 3.0]))
        captured["weighted"] = loss(logits, labels)

    engine.run(batches, max_epochs=1)
    per_sample = nn.functional.cross_entropy(logits, labels, reduction="none")
    assert torch.allclose(captured["unweighted"], per_sample.mean())
    assert torch.allclose(captured["weighted"], (per_sample * torch.tensor([2.0, 3.0, 1.0])).mean())
