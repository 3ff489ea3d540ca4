"""PINT: the EMA teacher, its uncertainty, the teacher-guided loss and pint.json end to end."""

import json
import math

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from torch import nn

from robustmri.methods.pint import (
    PINTHandler,
    TeacherGuidedCrossEntropy,
    ema_update,
    make_teacher,
    most_uncertain,
    perturbed_uncertainty,
    teacher_guided_loss,
)

from helpers import run_noisy, tiny_batches, tiny_network


def test_teacher_is_the_ema_closed_form_and_gets_no_gradients(tmp_path):
    """With Mean Teacher's ramp d_k = min(d, 1 - 1/k), the teacher is the plain mean of the student's
    first m = 1/(1 - d) snapshots, then an EMA of decay d from there:
    theta_t(n) = d^(n - m) mean(theta_s(1..m)) + (1 - d) sum_{k > m} d^(n - k) theta_s(k).
    The random initial weights do not appear; BatchNorm running statistics follow the same formula."""
    torch.manual_seed(0)
    student, decay, m = tiny_network(), 0.8, 5
    loss = TeacherGuidedCrossEntropy(uncertain_fraction=0.5, label_weight=0.0)
    handler = PINTHandler(loss, str(tmp_path), decay=decay, warmup_epochs=1)
    snapshots = []
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=2, train_data_loader=tiny_batches(),
                                network=student, optimizer=torch.optim.SGD(student.parameters(), lr=0.1),
                                loss_function=loss, train_handlers=[handler])
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: snapshots.append(
        {k: v.detach().clone() for k, v in student.state_dict().items()}))
    trainer.run()
    n = len(snapshots)
    assert n == 8
    teacher_state = handler.teacher.state_dict()
    for name, value in teacher_state.items():
        if not value.is_floating_point():  # the batch counter is copied
            assert torch.equal(value, snapshots[-1][name])
            continue
        expected = decay ** (n - m) * sum(snapshots[k][name] for k in range(m)) / m + (1 - decay) * sum(
            decay ** (n - k) * snapshots[k - 1][name] for k in range(m + 1, n + 1))
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    for teacher_param in handler.teacher.parameters():
        assert teacher_param.grad is None and not teacher_param.requires_grad
    # the second epoch used the teacher (after warm-up): its statistics were recorded
    second = handler.history[1]
    assert second["uncertain_share"] == pytest.approx(0.5) and sum(second["pseudo_label_class_shares"]) == \
        pytest.approx(1.0) and (tmp_path / "pint_summary.json").is_file()


def test_uncertainty_lies_between_zero_and_log_c():
    torch.manual_seed(1)
    teacher = make_teacher(tiny_network())
    images = torch.randn(20, 1, 4, 4) * 5
    mean, uncertainty = perturbed_uncertainty(teacher, images, repeats=3, noise_std=0.5)
    assert ((uncertainty >= 0) & (uncertainty <= math.log(3) + 1e-6)).all()
    torch.testing.assert_close(mean.sum(1), torch.ones(20))
    # the bounds are reached: a uniform prediction has entropy log C, a one-hot one 0
    constant = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    nn.init.zeros_(constant[1].weight)
    nn.init.zeros_(constant[1].bias)
    assert perturbed_uncertainty(constant, images)[1] == pytest.approx(math.log(3))
    nn.init.constant_(constant[1].bias, 0.0)
    constant[1].bias.data[0] = 100.0
    assert perturbed_uncertainty(constant, images)[1].max() < 1e-6


def test_label_weight_one_is_plain_cross_entropy_and_zero_uses_weighted_pseudo_labels():
    torch.manual_seed(2)
    logits, labels = torch.randn(8, 3), torch.randint(0, 3, (8,))
    pseudo, uncertainty = torch.randint(0, 3, (8,)), torch.rand(8) * math.log(3)
    plain = nn.functional.cross_entropy(logits, labels)
    torch.testing.assert_close(teacher_guided_loss(logits, labels, pseudo, uncertainty, 0.25, 1.0), plain)
    torch.testing.assert_close(teacher_guided_loss(logits, labels, pseudo, uncertainty, 0.0, 0.0), plain)
    # label weight 0, fraction 0.25: the two most uncertain of eight train on certainty-weighted pseudo-labels
    most = set(sorted(range(8), key=lambda i: float(uncertainty[i]))[-2:])
    expected = []
    for i in range(8):
        if i in most:
            expected.append((1 - uncertainty[i] / math.log(3)) * nn.functional.cross_entropy(logits[i:i + 1], pseudo[i:i + 1]))
        else:
            expected.append(nn.functional.cross_entropy(logits[i:i + 1], labels[i:i + 1]))
    torch.testing.assert_close(teacher_guided_loss(logits, labels, pseudo, uncertainty, 0.25, 0.0),
                               torch.stack(expected).mean())


def test_the_uncertain_share_is_a_rank_not_a_threshold():
    """A teacher unsure of everything (as under 40 % symmetric flips) still leaves 1 - fraction on their labels."""
    uncertainty = torch.full((10,), 0.95 * math.log(3))
    uncertainty[3] += 0.01
    assert most_uncertain(uncertainty, 0.1).nonzero().flatten().tolist() == [3]
    assert most_uncertain(uncertainty, 0.4).sum() == 4 and most_uncertain(uncertainty, 0.0).sum() == 0
    with pytest.raises(ValueError, match="uncertain_fraction"):
        most_uncertain(uncertainty, 1.5)


def test_ema_update_rejects_a_bad_decay():
    with pytest.raises(ValueError, match="decay"):
        ema_update(tiny_network(), tiny_network(), 1.5)


@pytest.mark.slow
def test_pint_runs_with_the_teacher_after_warmup(tmp_path):
    summary = json.loads((run_noisy(tmp_path, "pint", "--epochs", "2", "--pint_warmup_epochs", "1") / "pint_summary.json")
                         .read_text())
    assert summary["history"][0]["warmup"] and not summary["history"][1]["warmup"]
    # the uncertain share follows the label-noise rate (rank-based: round(0.2 x 8) = 2 of each batch of 8)
    assert summary["uncertain_fraction"] == 0.2
    assert summary["history"][1]["uncertain_share"] == pytest.approx(0.2, abs=0.06)
    assert sum(summary["history"][1]["pseudo_label_class_shares"]) == pytest.approx(1.0)
