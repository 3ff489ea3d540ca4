"""Test-time noise matching: naive training, then each test image made as noisy as the training images.

A model trained on images that all carry noise of one law and level (``noise``, ``noise_sigma``) has
learnt to classify such images, and loses accuracy on cleaner ones (a naive model trained on noisy
images scores higher on noisy than on clean test images). At test time each image's own noise is
estimated on its background (:func:`robustmri.data.noise_level.estimate_sigma`: half-normal maximum
likelihood for clipped Gaussian noise, Rayleigh for Rician), noise of the training law is added so
that the total matches the training level (``sigma_add^2 = sigma_train^2 - sigma_hat^2``,
:func:`robustmri.data.noise_level.add_complementary_noise`), and the softmax is averaged over ``K``
such draws. An image already as noisy as the training images is left as it is (every draw equal).

Training is naive training exactly (``train.json``); only the test evaluation changes, through the
bundle's ``test_inferer`` (``evaluate.json`` evaluates the test split with it; validation during
training, and so the best-validation checkpoint, stay naive's). :class:`NoiseMatchingInferer` is a
MONAI ``Inferer``: it returns the log of the mean softmax, so that the evaluator's softmax gives back
the mean probabilities exactly.

Options (``naive_tta_*``): ``views`` (K, fixed at 8 before any run), ``batch_norm`` (``running``: the
training statistics; ``test_batch``: BatchNorm normalises with the statistics of the test batch of
views, the running statistics left untouched), ``perturbation`` (``noise``; ``flip``, the control: the
same K-view averaging with random left-right flips, the training augmentation, and no noise).
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch
from monai.inferers import Inferer
from torch import nn

from robustmri.data.noise_level import BACKGROUND_FRAME, ESTIMABLE, add_complementary_noise, image_sigma
from robustmri.methods import Method

logger = logging.getLogger(__name__)

METHOD = Method(name="naive_tta", title="naive training, then test-time noise matching (K noisy views averaged)",
                order=11, families=("noisy images",), summary=None,
                reference="test-time augmentation (e.g. Wang et al., Neurocomputing 2019) with the training noise law")

#: K, the views averaged per test image: fixed before any run (not tuned).
DEFAULT_VIEWS = 8
PERTURBATIONS = ("noise", "flip")
BATCH_NORMS = ("running", "test_batch")


class NoiseMatchingInferer(Inferer):
    """Mean softmax over ``views`` perturbed copies of each input, returned as its log (see the module).

    ``noise``/``sigma``: the training images' noise law and level; ``seed`` seeds the draws (one stream
    per inferer, consumed in the order images come); ``background_width``: the frame where each image's
    noise is estimated (:data:`robustmri.data.noise_level.BACKGROUND_FRAME`).
    """

    def __init__(self, noise: str, sigma: float, views: int = DEFAULT_VIEWS, perturbation: str = "noise",
                 batch_norm: str = "running", seed: int = 0, background_width: float = BACKGROUND_FRAME):
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"naive_tta_perturbation must be one of {PERTURBATIONS}, got {perturbation!r}")
        if batch_norm not in BATCH_NORMS:
            raise ValueError(f"naive_tta_batch_norm must be one of {BATCH_NORMS}, got {batch_norm!r}")
        if perturbation == "noise" and noise not in ESTIMABLE:
            raise ValueError(f"test-time noise matching needs the training noise law, one of {ESTIMABLE}; the "
                             f"model was trained with noise {noise!r} (use naive_tta_perturbation 'flip' instead)")
        if int(views) < 1:
            raise ValueError(f"naive_tta_views must be at least 1, got {views}")
        if not float(sigma) >= 0:
            raise ValueError(f"the training noise sigma must be >= 0, got {sigma}")
        self.noise, self.sigma, self.views = noise, float(sigma), int(views)
        self.perturbation, self.batch_norm = perturbation, batch_norm
        self.background_width = float(background_width)
        self.rng = np.random.default_rng([int(seed), 3_571])
        self.last_sigma_hat: np.ndarray | None = None  # the estimates of the last batch, for reports

    def views_of(self, images: torch.Tensor) -> torch.Tensor:
        """The ``views`` copies of a batch [B, 1, H, W] in [0, 1]: [views, B, 1, H, W] (on the input's device)."""
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"expected a batch [B, 1, H, W] of one-channel images, got shape {tuple(images.shape)}")
        pixels = images.detach().float().cpu().numpy()
        if self.perturbation == "flip":
            flips = self.rng.random((self.views, len(pixels))) < 0.5
            stacked = np.stack([np.where(flips[v][:, None, None, None], pixels[..., ::-1], pixels)
                                for v in range(self.views)])
        else:
            sigma_hat = np.array([image_sigma(image[0], self.noise, self.background_width)
                                  for image in pixels])
            self.last_sigma_hat = sigma_hat
            stacked = np.stack([np.stack([add_complementary_noise(image, self.noise, float(s), self.sigma, self.rng)
                                          for image, s in zip(pixels, sigma_hat)]) for _ in range(self.views)])
        return torch.as_tensor(np.ascontiguousarray(stacked), dtype=images.dtype, device=images.device)

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args, **kwargs) -> torch.Tensor:
        views = self.views_of(inputs)
        flat = views.reshape(-1, *inputs.shape[1:])
        with _batch_statistics(network) if self.batch_norm == "test_batch" else contextlib.nullcontext():
            logits = network(flat, *args, **kwargs).float()
        probabilities = torch.softmax(logits, dim=1).reshape(self.views, inputs.shape[0], -1).mean(dim=0)
        return torch.log(probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny))


@contextlib.contextmanager
def _batch_statistics(network: nn.Module):
    """BatchNorm layers normalise with the statistics of the batch they see; their running statistics (and
    the network's modes) are as before afterwards."""
    layers = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.running_mean.clone() if m.running_mean is not None else None,
              m.running_var.clone() if m.running_var is not None else None,
              m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in layers]
    try:
        for layer in layers:
            layer.train()
        yield
    finally:
        for layer, (training, mean, var, count) in zip(layers, saved):
            layer.train(training)
            for name, value in (("running_mean", mean), ("running_var", var), ("num_batches_tracked", count)):
                if value is not None:
                    getattr(layer, name).copy_(value)
