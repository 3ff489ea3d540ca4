"""Adversarial-training baseline (AT): FGSM with a random start ("fast is better than free",
Wong, Rice, Kolter 2020).

Every training batch x is replaced by x + delta, where
delta ~ U(-eps, eps), delta <- clamp(delta + a * sign(grad_delta L(x + delta)), -eps, eps),
and x + delta is kept inside the image range [0, 1] after both steps. Defaults
eps = 8/255 and a = 1.25 eps = 10/255 (Wong et al.'s recommended ratio and CIFAR-10 setting).

Design: the maths is the pure function :func:`fgsm_random_start`; the bundle attaches
:class:`ATHandler`, which swaps ``engine.state.batch["image"]`` for the
adversarial images when each iteration starts, before MONAI's ``SupervisedTrainer``
prepares the batch. The trainer itself (forward, loss, optimiser step, metrics, AMP,
handlers) stays the stock one from ``train.json``, so ``at.json`` changes nothing else
and the training loss and accuracy it logs are those on the adversarial images. A custom
``iteration_update`` would have to copy the trainer's iteration and follow its changes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from ignite.engine import Engine, Events
from torch import nn

from robustmri.methods import Method

METHOD = Method(name="at", title="AT: FGSM adversarial training with a random start (baseline)", order=1,
                families=("noisy images",), summary=None,
                reference="Wong, Rice, Kolter, ICLR 2020 (the paper's AT baseline)")

logger = logging.getLogger(__name__)

DEFAULT_EPSILON = 8.0 / 255.0
DEFAULT_STEP_RATIO = 1.25


def fgsm_random_start(model: nn.Module, loss_fn: Callable, images: torch.Tensor, labels: torch.Tensor,
                      epsilon: float = DEFAULT_EPSILON, step: float | None = None,
                      generator: torch.Generator | None = None, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """Adversarial images x + delta, ||delta||_inf <= epsilon, inside [low, high]; detached.

    The gradient is taken with the model in whatever mode it is in (the trainer's is train
    mode, as in Wong et al., so BatchNorm uses and updates batch statistics). Only the
    gradient with respect to delta is computed: no ``.grad`` is left on the parameters.
    ``generator`` (on the CPU) makes the random start reproducible.
    """
    step = DEFAULT_STEP_RATIO * epsilon if step is None else step
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if not step >= 0:
        raise ValueError(f"step must be >= 0, got {step}")
    images = images.detach()
    start = (torch.rand(images.shape, generator=generator, dtype=images.dtype) * 2 - 1) * epsilon
    delta = _keep_in_range(start.to(images.device), images, low, high).requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(model(images + delta), labels)
        (gradient,) = torch.autograd.grad(loss.mean(), delta)
    delta = (delta.detach() + step * gradient.sign()).clamp(-epsilon, epsilon)
    # the final clamp only absorbs float rounding of x + (high - x)
    return (images + _keep_in_range(delta, images, low, high)).clamp(low, high)


def _keep_in_range(delta: torch.Tensor, images: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """The delta that keeps images + delta inside [low, high]; never enlarges |delta|."""
    return torch.maximum(torch.minimum(delta, high - images), low - images)


class ATHandler:
    """Trains on FGSM adversarial images: list it among the trainer's handlers.

    At ``ITERATION_STARTED`` it puts the network in train mode (the trainer would next),
    attacks the batch with the trainer's own loss function and replaces ``batch["image"]``.
    """

    def __init__(self, epsilon: float = DEFAULT_EPSILON, step: float | None = None, seed: int = 0,
                 image_key: str = "image", label_key: str = "label"):
        self.epsilon = float(epsilon)
        self.step = DEFAULT_STEP_RATIO * self.epsilon if step is None else float(step)
        if not (self.epsilon >= 0 and self.step >= 0):
            raise ValueError(f"epsilon and step must be >= 0, got {epsilon} and {step}")
        self.generator = torch.Generator().manual_seed(int(seed))
        self.image_key, self.label_key = image_key, label_key

    def training_state(self) -> dict:
        """The random start's generator, for resuming a run (:mod:`robustmri.engine.training_state`)."""
        return {"generator": self.generator.get_state()}

    def load_training_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def attach(self, engine: Engine) -> None:
        # MONAI attaches handlers before the trainer sets its network: check them when called.
        engine.add_event_handler(Events.ITERATION_STARTED, self)
        logger.info("AT: FGSM with random start, epsilon %.4g, step %.4g", self.epsilon, self.step)

    def __call__(self, engine: Engine) -> None:
        batch = engine.state.batch
        if not isinstance(batch, dict) or self.image_key not in batch or self.label_key not in batch:
            raise KeyError(f"AT expects dict batches with '{self.image_key}' and '{self.label_key}'")
        network, loss_function = getattr(engine, "network", None), getattr(engine, "loss_function", None)
        if network is None or loss_function is None:
            raise TypeError("ATHandler needs a MONAI SupervisedTrainer (with network and loss_function)")
        device = next(network.parameters()).device
        network.train()
        images = torch.as_tensor(batch[self.image_key]).to(device)
        labels = torch.as_tensor(batch[self.label_key]).to(device)
        batch[self.image_key] = fgsm_random_start(network, loss_function, images, labels, self.epsilon,
                                                  self.step, self.generator)
