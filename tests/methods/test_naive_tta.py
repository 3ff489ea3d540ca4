import json

import numpy as np
import pytest
import torch
from torch import nn

from robustmri.bench.profiles import METHODS
from robustmri.data.noise import add_gaussian_noise, add_rician_noise
from robustmri.data.noise_level import border_pixels, estimate_sigma
from robustmri.methods.naive_tta import DEFAULT_VIEWS, NoiseMatchingInferer

from helpers import BUNDLE

SIGMA = 32.0 / 255.0


def _phantom(size: int = 48) -> np.ndarray:
    """A bright disc on a zero background (the border frame is all background)."""
    y, x = np.mgrid[:size, :size]
    return (((y - size / 2) ** 2 + (x - size / 2) ** 2) < (size / 3) ** 2).astype(np.float32) * 0.6


def _batch(images) -> torch.Tensor:
    return torch.as_tensor(np.stack(images)[:, None], dtype=torch.float32)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x):
        return self.features(x)


@pytest.mark.parametrize("noise", ["gaussian", "rician"])
def test_a_clean_image_is_brought_to_the_training_noise_level(noise):
    inferer = NoiseMatchingInferer(noise, SIGMA, views=6, seed=1)
    views = inferer.views_of(_batch([_phantom()] * 2))
    assert views.shape == (6, 2, 1, 48, 48)
    assert inferer.last_sigma_hat.tolist() == [0.0, 0.0]
    estimates = [estimate_sigma(border_pixels(v[0].numpy()), noise) for v in views.reshape(-1, 1, 48, 48)]
    assert np.mean(estimates) == pytest.approx(SIGMA, rel=0.05)
    assert not torch.equal(views[0], views[1])  # K different draws
    assert 0.0 <= float(views.min()) and float(views.max()) <= 1.0


@pytest.mark.parametrize("noise, add", [("gaussian", add_gaussian_noise), ("rician", add_rician_noise)])
def test_an_image_as_noisy_as_training_gets_no_more_noise(noise, add):
    noisy = add(_phantom(), 0.25, np.random.default_rng(3))
    inferer = NoiseMatchingInferer(noise, SIGMA, views=3, seed=1)
    views = inferer.views_of(_batch([noisy]))
    assert inferer.last_sigma_hat[0] > SIGMA
    assert all(np.array_equal(v[0, 0].numpy(), noisy) for v in views)


def test_half_as_noisy_gets_the_complementary_noise():
    # sigma_hat = sigma / 2: sigma_add^2 = sigma^2 - sigma^2 / 4, and the total is back at sigma
    half = add_gaussian_noise(_phantom(64), SIGMA / 2, np.random.default_rng(4))
    inferer = NoiseMatchingInferer("gaussian", SIGMA, views=8, seed=2)
    views = inferer.views_of(_batch([half]))
    assert inferer.last_sigma_hat[0] == pytest.approx(SIGMA / 2, rel=0.1)
    totals = [estimate_sigma(border_pixels(v[0, 0].numpy()), "gaussian") for v in views]
    assert np.mean(totals) == pytest.approx(SIGMA, rel=0.06)


def test_the_output_is_the_log_of_the_mean_softmax_over_the_views():
    network = _Tiny().eval()
    images = _batch([_phantom(), _phantom()[::-1].copy()])
    got = NoiseMatchingInferer("gaussian", SIGMA, views=5, seed=7)(images, network)
    # by hand: the same draws (same seed), each view through the network, softmax, mean
    views = NoiseMatchingInferer("gaussian", SIGMA, views=5, seed=7).views_of(images)
    with torch.no_grad():
        expected = torch.stack([torch.softmax(network(v), dim=1) for v in views]).mean(dim=0)
    assert torch.allclose(torch.softmax(got, dim=1), expected, atol=1e-6)
    assert torch.allclose(got.exp().sum(dim=1), torch.ones(2), atol=1e-6)


def test_the_flip_control_only_mirrors_left_right():
    image = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    views = NoiseMatchingInferer("gaussian", SIGMA, views=16, perturbation="flip", seed=0).views_of(_batch([image]))
    mirrored = [np.array_equal(v[0, 0].numpy(), image[:, ::-1]) for v in views]
    assert all(m or np.array_equal(v[0, 0].numpy(), image) for m, v in zip(mirrored, views))
    assert 0 < sum(mirrored) < 16
    # the control needs no noise law: a model trained on clean images can be averaged over flips
    NoiseMatchingInferer("none", 0.0, perturbation="flip")


def test_test_batch_statistics_leave_the_running_statistics_and_modes_untouched():
    network = _Tiny().eval()
    layer = network.features[1]
    layer.running_mean.fill_(0.3)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    images = _batch([_phantom(), _phantom() * 0.5])
    running = NoiseMatchingInferer("gaussian", SIGMA, views=2, seed=0)(images, network)
    batch = NoiseMatchingInferer("gaussian", SIGMA, views=2, seed=0, batch_norm="test_batch")(images, network)
    assert not torch.allclose(running, batch)  # the batch's own statistics were used
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())
    assert not network.training and not layer.training


def test_bad_options_are_one_line_errors():
    with pytest.raises(ValueError, match="needs the training noise law"):
        NoiseMatchingInferer("none", 0.0)
    with pytest.raises(ValueError, match="naive_tta_perturbation must be one of"):
        NoiseMatchingInferer("gaussian", SIGMA, perturbation="blur")
    with pytest.raises(ValueError, match="naive_tta_batch_norm must be one of"):
        NoiseMatchingInferer("gaussian", SIGMA, batch_norm="train")
    with pytest.raises(ValueError, match="at least 1"):
        NoiseMatchingInferer("gaussian", SIGMA, views=0)
    with pytest.raises(ValueError, match="one-channel"):
        NoiseMatchingInferer("gaussian", SIGMA).views_of(torch.zeros(2, 3, 8, 8))


def test_the_control_has_the_method_s_budget_and_training():
    config, method = METHODS["naive_tta"]
    control_config, control = METHODS["naive_tta_control"]
    assert config == control_config == "configs/naive_tta.json"
    assert method == {} and control == {"naive_tta_perturbation": "flip"}  # only the perturbation differs
    parts = json.loads((BUNDLE / "configs" / "parts" / "naive_tta.json").read_text())
    assert parts["naive_tta_views"] == DEFAULT_VIEWS
    # training is naive training: the part sets nothing but the test inferer and its options
    assert sorted(parts) == ["naive_tta_batch_norm", "naive_tta_perturbation", "naive_tta_views", "test_inferer"]


def test_the_bundle_evaluates_the_test_split_with_the_test_inferer():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / "naive_tta.json"), str(BUNDLE / "configs" / "evaluate.json")])
    assert parser["validate#evaluator#inferer"] == "@test_inferer"
    assert parser["test_inferer"]["_target_"].endswith("NoiseMatchingInferer")
    plain = ConfigParser()
    plain.read_config([str(BUNDLE / "configs" / "train.json"), str(BUNDLE / "configs" / "evaluate.json")])
    assert plain["test_inferer"]["_target_"] == "SimpleInferer"
    # during training, validation (and so the best checkpoint) stays naive's
    assert parser["validate#inferer"]["_target_"] == "SimpleInferer"


@pytest.mark.slow
def test_naive_tta_trains_as_naive_and_evaluates_the_test_split_through_its_views(tmp_path):
    from helpers import TINY, run_in_process

    dirs = ["--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval")]
    run_in_process("training", "configs/naive_tta.json", "--epochs", "1", *TINY, *dirs)
    assert (tmp_path / "models" / "model.pt").is_file()
    # clean test images (p = 0): each is brought to the training noise level in 8 noisy views; a test image as
    # noisy as training (p = 1) would get no noise, and its views would all equal it
    clean = ["--test_noise_fraction", "0"]
    run_in_process("evaluating", ["configs/naive_tta.json", "configs/evaluate.json"], *TINY, *dirs, *clean)
    views = json.loads((tmp_path / "eval" / "test" / "best" / "metrics.json").read_text())
    # the same checkpoint without the views: the plain evaluation differs
    plain_dirs = [*dirs[:2], "--output_dir", str(tmp_path / "plain")]
    run_in_process("evaluating", ["configs/naive_tta.json", "configs/evaluate.json"], *TINY, *plain_dirs, *clean,
                   "--test_inferer", "$monai.inferers.SimpleInferer()")
    plain = json.loads((tmp_path / "plain" / "test" / "best" / "metrics.json").read_text())
    assert views["n"] == plain["n"] > 0
    assert views["roc_auc_macro"] != plain["roc_auc_macro"]
