"""Stability training: the consistency loss, the perturbed copies, the handler inside MONAI's trainer, the
control's budget, resuming, and the bundle configs end to end."""

import math
import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from robustmri.bench.profiles import PROFILES
from robustmri.methods.stability import (COPY_KEY, StabilityHandler, StabilityLoss, flipped_copy, noisy_copy,
                                         stability_loss)

SIGMA = 32.0 / 255.0


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(16, 3))


def by_hand(clean: np.ndarray, perturbed: np.ndarray, labels: np.ndarray, weight: float) -> float:
    """CE on the clean logits + weight * mean_i sum_k p_ik log(p_ik / q_ik), in float64 numpy."""
    def softmax(z):
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    p, q = softmax(clean), softmax(perturbed)
    cross_entropy = -np.mean(np.log(p[np.arange(len(labels)), labels]))
    kl = np.mean(np.sum(p * np.log(p / q), axis=1))
    return cross_entropy + weight * kl


def test_consistency_loss_matches_a_hand_computation():
    clean = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3], [-3.0, 4.0, 1.0]])
    perturbed = np.array([[1.0, 0.0, 0.5], [0.3, -0.2, 0.3], [-2.0, 2.5, 1.5]])
    labels = np.array([0, 2, 1])
    for weight in (1.0, 0.7):
        got = stability_loss(torch.tensor(clean), torch.tensor(perturbed), torch.tensor(labels), weight)
        assert got.dtype == torch.float64
        assert got.item() == pytest.approx(by_hand(clean, perturbed, labels, weight), rel=1e-12)
    # worked out for the first image alone (p = softmax(2, -1, 0.5), q = softmax(1, 0, 0.5)): KL = 0.1898...
    p = np.exp([2.0, -1.0, 0.5]) / np.exp([2.0, -1.0, 0.5]).sum()
    q = np.exp([1.0, 0.0, 0.5]) / np.exp([1.0, 0.0, 0.5]).sum()
    kl = float(np.sum(p * np.log(p / q)))
    one = stability_loss(torch.tensor(clean[:1]), torch.tensor(perturbed[:1]), torch.tensor(labels[:1]), 1.0)
    assert one.item() == pytest.approx(-math.log(p[0]) + kl, rel=1e-12)
    assert kl > 0.1  # the two predictions really differ, so the term is tested, not a zero


def test_weight_zero_is_plain_cross_entropy_and_equal_predictions_add_nothing():
    generator = torch.Generator().manual_seed(0)
    clean, perturbed = torch.randn(5, 3, generator=generator), torch.randn(5, 3, generator=generator)
    labels = torch.tensor([0, 1, 2, 1, 0])
    plain = F.cross_entropy(clean, labels)
    assert torch.allclose(stability_loss(clean, perturbed, labels, 0.0), plain)
    assert torch.allclose(stability_loss(clean, clean + 3.0, labels, 5.0), plain, atol=1e-6)  # same softmax
    assert stability_loss(clean, perturbed, labels, 1.0) > plain


def test_gradients_are_finite_flow_through_both_copies_and_match_finite_differences():
    generator = torch.Generator().manual_seed(1)
    clean = torch.randn(4, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    perturbed = torch.randn(4, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([2, 0, 1, 1])
    assert torch.autograd.gradcheck(lambda a, b: stability_loss(a, b, labels, 0.8), (clean, perturbed))
    stability_loss(clean, perturbed, labels, 0.8).backward()
    assert torch.isfinite(clean.grad).all() and torch.isfinite(perturbed.grad).all()
    assert clean.grad.abs().sum() > 0 and perturbed.grad.abs().sum() > 0
    # confident half-precision logits: the term is computed in float32 from log-softmaxes and stays finite
    confident = torch.tensor([[40.0, -40.0, 0.0]], dtype=torch.bfloat16, requires_grad=True)
    opposite = torch.tensor([[-40.0, 40.0, 0.0]], dtype=torch.bfloat16, requires_grad=True)
    loss = stability_loss(confident, opposite, torch.tensor([0]), 1.0)
    loss.backward()
    assert loss.dtype == torch.float32 and math.isfinite(loss.item()) and loss.item() == pytest.approx(80.0, rel=1e-3)
    assert torch.isfinite(confident.grad.float()).all() and torch.isfinite(opposite.grad.float()).all()


def test_the_trainer_loss_is_cross_entropy_on_plain_batches_and_the_pair_loss_on_stacked_ones():
    generator = torch.Generator().manual_seed(2)
    logits, labels = torch.randn(6, 3, generator=generator), torch.tensor([0, 1, 2, 0, 1, 2])
    loss = StabilityLoss(weight=0.5)
    assert torch.allclose(loss(logits, labels), F.cross_entropy(logits, labels))
    loss.set_pairs(3)
    assert torch.allclose(loss(logits, labels), stability_loss(logits[:3], logits[3:], labels[:3], 0.5))
    with pytest.raises(ValueError, match="expects 2 originals and 2 copies, got a batch of 6"):
        loss.set_pairs(2)
        loss(logits, labels)
    with pytest.raises(ValueError, match="stability_weight must be >= 0"):
        StabilityLoss(weight=-1.0)


def test_gaussian_copy_has_the_asked_sigma_and_is_clipped():
    grey = torch.full((4, 1, 64, 64), 0.5)
    copy = noisy_copy(grey, "gaussian", SIGMA, torch.Generator().manual_seed(0))
    change = (copy - grey).flatten()
    n = change.numel()  # 16384 pixels: the sample sd is within 4 standard errors (sigma / sqrt(2 n)) of sigma
    assert abs(change.std().item() - SIGMA) < 4 * SIGMA / math.sqrt(2 * n)
    assert abs(change.mean().item()) < 4 * SIGMA / math.sqrt(n)
    bright = torch.full((2, 1, 32, 32), 0.95)
    clipped = noisy_copy(bright, "gaussian", 0.2, torch.Generator().manual_seed(0))
    assert clipped.max() == 1.0 and clipped.min() >= 0.0
    assert (clipped == 1.0).float().mean() > 0.3  # P(n > 0.05 / 0.2) = 0.40: the clip really acts


def test_rician_copy_follows_the_rician_moments():
    generator = torch.Generator().manual_seed(0)
    zero = noisy_copy(torch.zeros(4, 1, 64, 64), "rician", SIGMA, generator)
    n = zero.numel()
    # magnitude of pure complex noise: Rayleigh, mean sigma sqrt(pi / 2), sd sigma sqrt(2 - pi / 2)
    standard_error = SIGMA * math.sqrt(2 - math.pi / 2) / math.sqrt(n)
    assert abs(zero.mean().item() - SIGMA * math.sqrt(math.pi / 2)) < 4 * standard_error
    grey = noisy_copy(torch.full((4, 1, 64, 64), 0.5), "rician", SIGMA, generator)
    # E[x'^2] = x^2 + 2 sigma^2 for any x (no clipping at 0.5 +- 4 sigma)
    assert (grey ** 2).mean().item() == pytest.approx(0.25 + 2 * SIGMA ** 2, rel=5e-3)


class _Replay:
    """A numpy Generator stand-in whose ``normal`` hands out given standard-normal draws, scaled."""

    def __init__(self, draws):
        self.draws = list(draws)

    def normal(self, loc, scale, size):
        draw = self.draws.pop(0)
        assert draw.shape == tuple(size)
        return loc + scale * draw


@pytest.mark.parametrize("noise", ["gaussian", "rician"])
def test_the_fresh_copy_is_the_protocols_noise_model_draw_for_draw(noise):
    """The torch copy repeats the formulas of robustmri.data.noise (the fixed training draw); with the same
    standard-normal draws both give the same image, so the two cannot drift apart."""
    from robustmri.data.noise import apply_noise

    images = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(3)) * 1.1
    images = images.clamp(0, 1)
    copy = noisy_copy(images, noise, SIGMA, torch.Generator().manual_seed(4))
    replay = torch.Generator().manual_seed(4)  # noisy_copy draws real then imaginary parts, whole batch at once
    draws = [torch.randn(images.shape, generator=replay).numpy() for _ in range(1 if noise == "gaussian" else 2)]
    expected = apply_noise(images.numpy().astype(np.float64), noise, SIGMA, _Replay(draws))
    np.testing.assert_allclose(copy.numpy(), expected, atol=1e-6)


def test_copies_are_reproducible_from_the_generator_and_leave_the_global_stream_alone():
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    before = torch.get_rng_state()
    first = noisy_copy(images, "gaussian", SIGMA, torch.Generator().manual_seed(9))
    again = noisy_copy(images, "gaussian", SIGMA, torch.Generator().manual_seed(9))
    other = noisy_copy(images, "gaussian", SIGMA, torch.Generator().manual_seed(10))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(torch.get_rng_state(), before)


def test_flip_control_moves_pixels_adds_no_noise_and_uses_both_axes():
    images = torch.rand(32, 1, 6, 7, generator=torch.Generator().manual_seed(0))
    copy = flipped_copy(images, torch.Generator().manual_seed(1))
    axes = []
    for image, flipped in zip(images, copy):
        assert torch.equal(torch.sort(flipped.flatten()).values, torch.sort(image.flatten()).values)  # same multiset
        assert not torch.equal(flipped, image)
        left_right, upside_down = torch.equal(flipped, image.flip(-1)), torch.equal(flipped, image.flip(-2))
        assert left_right != upside_down  # exactly one of the two flips, nothing added
        axes.append(upside_down)
    assert 0 < sum(axes) < len(axes)


def test_bad_options_are_refused_in_one_line():
    loss = StabilityLoss()
    for noise in ("none", "rician_reference", "speckle"):
        with pytest.raises(ValueError, match=f"one of .'gaussian', 'rician'.; got noise '{noise}'"):
            StabilityHandler(loss, noise=noise)
    StabilityHandler(loss, noise="none", perturbation="flip")  # the control needs no noise model
    with pytest.raises(ValueError, match="stability_sigma must be > 0"):
        StabilityHandler(loss, sigma=0.0)
    with pytest.raises(ValueError, match="stability_perturbation must be one of"):
        StabilityHandler(loss, perturbation="blur")
    with pytest.raises(ValueError, match="stability_start_epoch must be >= 0"):
        StabilityHandler(loss, start_epoch=-1)
    with pytest.raises(TypeError, match="StabilityLoss"):
        StabilityHandler(nn.CrossEntropyLoss())


def _trainer(handlers, loss, items, epochs=1, batch_size=4, network=None):
    from monai.data import DataLoader
    from monai.engines import SupervisedTrainer

    network = network if network is not None else tiny_cnn()
    return SupervisedTrainer(device=torch.device("cpu"), max_epochs=epochs,
                             train_data_loader=DataLoader(items, batch_size=batch_size, shuffle=False),
                             network=network, optimizer=torch.optim.SGD(network.parameters(), lr=0.05),
                             loss_function=loss, train_handlers=handlers, decollate=False)


def _items(n=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [{"image": torch.rand(1, 8, 8, generator=generator), "label": k % 3, "id": k} for k in range(n)]


def test_handler_stacks_originals_and_copies_from_its_start_epoch_in_the_supervised_trainer():
    from ignite.engine import Events

    items = _items()
    clean_by_id = {item["id"]: item["image"] for item in items}
    loss = StabilityLoss(weight=1.0)
    handler = StabilityHandler(loss, "gaussian", SIGMA, start_epoch=1, seed=3)
    trainer = _trainer([handler], loss, items, epochs=2)
    seen = []

    def record(engine):
        batch, output = engine.state.batch, engine.state.output
        seen.append({"epoch": engine.state.epoch, "ids": batch["id"], "images": output["image"],
                     "labels": output["label"], "pairs": loss.pairs, "copy": batch.get(COPY_KEY)})
    trainer.add_event_handler(Events.ITERATION_COMPLETED, record)
    trainer.run()
    assert [s["epoch"] for s in seen] == [1, 1, 2, 2]
    for s in seen[:2]:  # before the start epoch: plain batches, plain loss
        assert s["images"].shape[0] == 4 and s["pairs"] is None and s["copy"] is None
        clean = torch.stack([clean_by_id[int(i)] for i in s["ids"]])
        assert torch.equal(s["images"], clean)
    for s in seen[2:]:
        assert s["images"].shape[0] == 8 and s["pairs"] == 4
        assert s["copy"].tolist() == [0] * 4 + [1] * 4
        ids = s["ids"].tolist()
        assert ids[:4] == ids[4:]
        assert torch.equal(s["labels"][:4], s["labels"][4:])
        clean = torch.stack([clean_by_id[i] for i in ids[:4]])
        assert torch.equal(s["images"][:4], clean)
        change = s["images"][4:] - clean
        assert 0.5 * SIGMA < change.std() < 1.5 * SIGMA and s["images"].min() >= 0 and s["images"].max() <= 1


def test_before_its_start_epoch_the_method_trains_exactly_as_naive_training():
    items = _items(12, seed=4)
    plain = _trainer([], nn.CrossEntropyLoss(), items)
    torch.manual_seed(7)
    plain.run()
    plain_state, plain_rng = plain.network.state_dict(), torch.get_rng_state()
    loss = StabilityLoss()
    handler = StabilityHandler(loss, "gaussian", SIGMA, start_epoch=1, seed=0)
    idle = _trainer([handler], loss, items)
    torch.manual_seed(7)
    idle.run()
    assert all(torch.equal(plain_state[k], v) for k, v in idle.network.state_dict().items())
    assert torch.equal(torch.get_rng_state(), plain_rng)
    assert torch.equal(handler.generator.get_state(), torch.Generator().manual_seed(0).get_state())  # no draw yet
    # and from the start epoch on it does change training (so the equality above is not vacuous)
    loss = StabilityLoss()
    active = _trainer([StabilityHandler(loss, "gaussian", SIGMA, start_epoch=0, seed=0)], loss, items)
    torch.manual_seed(7)
    active.run()
    assert not all(torch.equal(plain_state[k], v) for k, v in active.network.state_dict().items())


def test_resuming_restores_the_copies_generator():
    from robustmri.engine.training_state import is_resumable

    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for perturbation in ("noise", "flip"):
        handler = StabilityHandler(StabilityLoss(), "gaussian", SIGMA, perturbation=perturbation, seed=2)
        assert is_resumable(handler)
        handler.copies(images)
        state = handler.training_state()
        expected = [handler.copies(images) for _ in range(3)]
        resumed = StabilityHandler(StabilityLoss(), "gaussian", SIGMA, perturbation=perturbation, seed=2)
        resumed.load_training_state(state)
        got = [resumed.copies(images) for _ in range(3)]
        assert all(torch.equal(a, b) for a, b in zip(expected, got))
        fresh = StabilityHandler(StabilityLoss(), "gaussian", SIGMA, perturbation=perturbation, seed=2)
        assert not torch.equal(fresh.copies(images), expected[0])  # the state matters


def _benchmark_workflow(method: str, profile: str, noise: str = "gaussian"):
    from conftest import BUNDLE
    from robustmri.bench.profiles import METHODS, PROFILES
    from robustmri.engine.workflow import load_workflow

    config, overrides = METHODS[method]
    return load_workflow(BUNDLE, [os.path.join(BUNDLE, config)],
                         {**PROFILES[profile]["config"], **overrides, "noise": noise, "dataset_dir": ""})


def test_stability_and_its_control_have_the_same_budget():
    """Same epochs, weight and start epoch in every benchmark profile; the same stacked batch (one forward pass of
    2 n images per iteration) from the handlers the configs build; only the copy differs."""
    from robustmri.bench.profiles import METHODS, PROFILES

    assert METHODS["stability_control"][1] == {**METHODS["stability"][1], "stability_perturbation": "flip"}
    for profile in PROFILES:
        method, control = (_benchmark_workflow(m, profile) for m in ("stability", "stability_control"))
        for key in ("epochs", "batch_size", "stability_weight", "stability_start_epoch", "stability_sigma"):
            assert method.parser.get_parsed_content(key) == control.parser.get_parsed_content(key), (profile, key)
        assert method.parser.get_parsed_content("stability_perturbation") == "noise"
        assert control.parser.get_parsed_content("stability_perturbation") == "flip"
    handlers = [w.parser.get_parsed_content("stability") for w in
                (_benchmark_workflow("stability", "cpu"), _benchmark_workflow("stability_control", "cpu"))]
    assert [h.loss.weight for h in handlers] == [1.0, 1.0] and [h.start_epoch for h in handlers] == [15, 15]

    class Engine:  # what the handler reads of the trainer
        state = None

    sizes = []
    for handler in handlers:
        engine = Engine()
        engine.state = type("State", (), {"epoch": 16, "batch": {"image": torch.rand(32, 1, 64, 64),
                                                                 "label": torch.zeros(32, dtype=torch.long)}})()
        handler(engine)
        sizes.append((engine.state.batch["image"].shape[0], handler.loss.pairs))
    assert sizes == [(64, 32), (64, 32)]


@pytest.mark.parametrize("profile", list(PROFILES))
def test_the_benchmark_starts_stability_at_its_profiles_influence_epoch(profile):
    """The pinned start epoch is the profile's shared naive prefix, so branching from that prefix is exact."""
    from robustmri.bench.profiles import branchable, prefix_overrides

    workflow = _benchmark_workflow("stability", profile)
    assert workflow.parser.get_parsed_content("stability_start_epoch") == PROFILES[profile]["config"]["influence_epoch"]
    assert branchable("stability") and branchable("stability_control")
    assert prefix_overrides("stability_control") == {}


@pytest.mark.slow
@pytest.mark.parametrize("perturbation", ["noise", "flip"])
def test_the_bundle_trains_two_iterations_of_stability_and_of_its_control(tmp_path, perturbation):
    """configs/stability.json from the command line's point of view: one plain iteration, then one stacked."""
    import logging

    from helpers import TINY, output_dirs, run_in_process

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    keep = Keep(level=logging.INFO)
    logger = logging.getLogger("robustmri.methods.stability")
    logger.addHandler(keep)
    logger.setLevel(logging.INFO)
    try:
        run_in_process("training", "configs/stability.json", *TINY, *output_dirs(tmp_path), "--epochs", "2",
                       "--train#trainer#epoch_length", "1", "--stability_start_epoch", "1",
                       "--stability_perturbation", perturbation)
    finally:
        logger.removeHandler(keep)
    copy = "gaussian noise, sigma 0.1255" if perturbation == "noise" else "a random left-right or upside-down flip"
    assert any(m.startswith("stability training: CE + 1 x KL(p(x) || p(x'))") and copy in m and
               "after 1 plain epochs" in m for m in records), records
    assert "stability: consistency term on from epoch 2" in records
    assert (tmp_path / "models" / "model.pt").is_file()
    state = torch.load(tmp_path / "models" / "training_state.pt", weights_only=True)
    assert state["iteration"] == 2 and state["epoch"] == 2
    assert [k for k in state["handlers"] if k.startswith("StabilityHandler")] == ["StabilityHandler#0"]


def test_the_config_refuses_stability_training_on_clean_images_and_builds_its_control():
    from conftest import BUNDLE
    from robustmri.engine.workflow import load_workflow

    workflow = load_workflow(BUNDLE, ["stability.json"], {"noise": "none", "dataset_dir": ""})
    with pytest.raises(Exception) as caught:
        workflow.parser.get_parsed_content("stability")
    cause = caught.value
    while cause.__cause__ is not None:
        cause = cause.__cause__
    assert "got noise 'none'" in str(cause)
    control = load_workflow(BUNDLE, ["stability.json"], {"noise": "none", "stability_perturbation": "flip",
                                                         "dataset_dir": ""})
    assert control.parser.get_parsed_content("stability").perturbation == "flip"


def _workflow(folder, data=None, resume=False, kill_at=None):
    from conftest import BUNDLE
    from helpers import kill_at_iteration
    from robustmri.engine.workflow import inject_protocol, load_workflow

    overrides = {"spatial_size": 32, "network_padding": 2, "synthetic_patients": 30, "batch_size": 8, "dataset_dir": "",
                 "seed": 4, "epochs": 3, "stability_start_epoch": 1, "resume": resume,
                 "ckpt_dir": str(folder / "models"), "output_dir": str(folder / "eval")}
    workflow = load_workflow(BUNDLE, ["stability.json"], overrides, drop_handlers=("ProgressBar",))
    if data is not None:
        inject_protocol(workflow, data)
    if kill_at is not None:
        kill_at_iteration(workflow, kill_at)
    return workflow


@pytest.mark.slow
@pytest.mark.forks_training
def test_a_stability_run_killed_mid_epoch_and_resumed_ends_like_an_uninterrupted_one(tmp_path):
    """Killed in the middle of epoch 3 (the second with copies), resumed: the same weights, history and next
    noise draws as a run never interrupted, because the copies' generator is saved with the run."""
    import json
    import signal

    from helpers import killed_in_a_child
    from robustmri.data.protocol import build_protocol
    from robustmri.engine.workflow import execute, protocol_arguments

    data = build_protocol(**protocol_arguments(_workflow(tmp_path / "probe")))
    execute(_workflow(tmp_path / "whole", data))
    state = torch.load(tmp_path / "whole" / "models" / "training_state.pt", weights_only=True)
    per_epoch = state["iteration"] // 3
    assert per_epoch >= 2

    code = killed_in_a_child(lambda: execute(_workflow(tmp_path / "cut", data, kill_at=2 * per_epoch + per_epoch // 2)))
    assert code == -signal.SIGKILL
    saved = torch.load(tmp_path / "cut" / "models" / "training_state.pt", weights_only=True)
    assert saved["epoch"] == 2 and "generator" in saved["handlers"]["StabilityHandler#0"]
    assert not (tmp_path / "cut" / "models" / "model.pt").exists()

    execute(_workflow(tmp_path / "cut", data, resume=True))
    for name in ("history.json",):
        assert (json.loads((tmp_path / "cut" / "eval" / name).read_text())
                == json.loads((tmp_path / "whole" / "eval" / name).read_text()))
    for name in ("model.pt", "model_best_val.pt"):
        whole = torch.load(tmp_path / "whole" / "models" / name, weights_only=True)
        resumed = torch.load(tmp_path / "cut" / "models" / name, weights_only=True)
        assert all(torch.equal(resumed[key], value) for key, value in whole.items()), name
