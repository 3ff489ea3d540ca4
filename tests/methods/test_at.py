"""Adversarial training (AT): FGSM with a random start, alone and inside the MONAI trainer."""

import pytest
import torch
from torch import nn

from robustmri.methods.at import ATHandler, fgsm_random_start

EPSILON = 8.0 / 255.0


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(16, 3))


def test_perturbation_stays_within_epsilon_and_image_range():
    generator = torch.Generator().manual_seed(0)
    images = 0.2 + 0.6 * torch.rand(6, 1, 12, 12, generator=generator)
    images[:, :, :3] = 0.0  # pixels at both ends of the range must not be pushed out of it
    images[:, :, -3:] = 1.0
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    adversarial = fgsm_random_start(tiny_cnn(), nn.CrossEntropyLoss(), images, labels, EPSILON, 1.25 * EPSILON,
                                    generator)
    delta = adversarial - images
    assert delta.abs().max() <= EPSILON + 1e-6
    assert adversarial.min() >= 0.0 and adversarial.max() <= 1.0
    # the step a = 1.25 eps leaves |delta| >= 0.25 eps wherever the gradient is non-zero; the random
    # start alone would leave a quarter of the pixels below that
    assert (delta[:, :, 3:-3].abs() >= 0.25 * EPSILON - 1e-6).float().mean() > 0.95


def test_gradients_only_flow_to_delta_and_mode_is_kept():
    model = tiny_cnn().eval()
    images, labels = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 1])
    adversarial = fgsm_random_start(model, nn.CrossEntropyLoss(), images, labels, EPSILON)
    assert all(p.grad is None for p in model.parameters())
    assert not model.training and not adversarial.requires_grad


def test_random_start_is_reproducible_with_a_generator():
    model, images, labels = tiny_cnn(), torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 1])
    first = fgsm_random_start(model.eval(), nn.CrossEntropyLoss(), images, labels, EPSILON,
                              generator=torch.Generator().manual_seed(3))
    again = fgsm_random_start(model, nn.CrossEntropyLoss(), images, labels, EPSILON,
                              generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, again)


def test_attack_raises_the_loss_of_a_trained_model_more_than_random_noise():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % 2
    # two separable classes of 4 x 4 "images": mean intensity 0.35 or 0.65
    images = (0.35 + 0.3 * labels.float()[:, None, None, None] + 0.05 * torch.randn(64, 1, 4, 4, generator=generator))
    images = images.clamp(0, 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(100):
        optimiser.zero_grad()
        loss_fn(model(images), labels).backward()
        optimiser.step()
    epsilon = 0.05
    with torch.no_grad():
        clean = loss_fn(model(images), labels).item()
        assert (model(images).argmax(1) == labels).float().mean() == 1.0  # really trained
    adversarial = fgsm_random_start(model, loss_fn, images, labels, epsilon, generator=generator)
    random_signs = torch.randint(0, 2, images.shape, generator=generator).float() * 2 - 1
    noise = (images + epsilon * random_signs).clamp(0, 1)
    with torch.no_grad():
        attacked, noisy = loss_fn(model(adversarial), labels).item(), loss_fn(model(noise), labels).item()
    print(f"loss clean {clean:.4f}, random-sign noise {noisy:.4f}, FGSM {attacked:.4f}")
    assert attacked >= clean
    assert attacked > 1.2 * clean and attacked > 1.2 * noisy  # a real attack, not just any perturbation


def test_invalid_budget_is_refused():
    with pytest.raises(ValueError, match="epsilon"):
        fgsm_random_start(tiny_cnn(), nn.CrossEntropyLoss(), torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), -0.1)
    with pytest.raises(ValueError, match="epsilon and step"):
        ATHandler(epsilon=0.03, step=-1.0)


def test_handler_makes_the_supervised_trainer_train_on_adversarial_images():
    from ignite.engine import Events
    from monai.data import DataLoader
    from monai.engines import SupervisedTrainer

    generator = torch.Generator().manual_seed(0)
    items = [{"image": torch.rand(1, 8, 8, generator=generator), "label": k % 3, "id": k} for k in range(8)]
    clean_by_id = {item["id"]: item["image"] for item in items}
    network = tiny_cnn()
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1,
                                train_data_loader=DataLoader(items, batch_size=4, shuffle=False), network=network,
                                optimizer=torch.optim.SGD(network.parameters(), lr=0.01),
                                loss_function=nn.CrossEntropyLoss(),
                                train_handlers=[ATHandler(epsilon=EPSILON, seed=1)], decollate=False)
    trained_on = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda e: trained_on.append((e.state.batch["id"], e.state.output["image"])))
    trainer.run()
    assert len(trained_on) == 2
    for ids, images in trained_on:
        clean = torch.stack([clean_by_id[int(i)] for i in ids])
        change = (images - clean).abs()
        assert change.max() <= EPSILON + 1e-6 and change.max() > 0.5 * EPSILON
        assert images.min() >= 0 and images.max() <= 1


@pytest.mark.slow
def test_at_config_runs_end_to_end(tmp_path):
    from helpers import TINY, bundle

    dirs = ["--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval")]
    result = bundle("run", "training", "--config_file", "configs/at.json", "--epochs", "1", "--at_epsilon", "0.05",
                    *TINY, *dirs)
    assert "AT: FGSM with random start, epsilon 0.05, step 0.0625" in result.stdout + result.stderr
    assert (tmp_path / "models" / "model.pt").is_file() and (tmp_path / "models" / "model_best_val.pt").is_file()
    assert (tmp_path / "eval" / "history.json").is_file()
