"""Stability training (Zheng, Song, Leung, Goodfellow, "Improving the Robustness of Deep Neural Networks
via Stability Training", CVPR 2016).

Each training iteration pairs every image x with a perturbed copy x' and trains on

    L = CE(f(x), y) + lambda * KL(p(x) || p(x')),   p = softmax(f(.)),
    KL(p || q) = sum_k p_k (log p_k - log q_k), averaged over the images of the batch.

The cross-entropy is taken on the original images only; the copies enter through the
consistency term alone. Direction: the clean prediction p(x) is the reference distribution
and p(x') is compared to it, as in Zheng et al.'s classification form. Their formula, as we
read it, is the cross-entropy -sum_k p_k(x) log p_k(x'), which is this KL plus the entropy of
p(x): the two have the same value up to that entropy and the same gradient through x', and
differ only in the gradient through p(x); the KL is used here because it is zero when the two
predictions agree. Gradients flow through both copies: the copies share the network's weights
and Zheng et al. train that shared-weight pair through both outputs. Detaching p(x) would make the
clean prediction a fixed teacher for the copy (a different method), and the cross-entropy term
already anchors p(x) to the label.

- The copy (``perturbation="noise"``): x' = clip(x + fresh noise of the run's training noise model,
  0, 1) at ``sigma`` (``stability_sigma``, default the training ``noise_sigma``): Gaussian
  x + sigma n, or Rician |x + sigma n1 + i sigma n2|, the equations of :mod:`robustmri.data.noise`
  in torch. The draws come from a ``torch.Generator`` seeded by ``seed`` (saved and restored on
  resume), so every iteration's noise is new while a run stays reproducible. The images already carry
  the protocol's one fixed noise draw; x' adds a second, fresh one on top.
- The control (``perturbation="flip"``): x' is x mirrored left-right or upside down (chosen per image
  at random from the same generator), with no noise: the same consistency term, weight, forward
  passes and epochs, without the noise.

``lambda`` (``stability_weight``) is fixed before any run at 1.0, equal weight of the two terms; it
was not tuned. ``start_epoch`` (``stability_start_epoch``, default 0) is the number of epochs trained
plainly first: until then the handler leaves every batch alone and the loss is the plain
cross-entropy, so a run started at epoch k trains exactly as naive training up to k and can branch
from a naive prefix (Zheng et al. also fine-tuned already trained networks).

Design: MONAI's stock ``SupervisedTrainer`` stays (as for :mod:`robustmri.methods.at`). At
``ITERATION_STARTED`` :class:`StabilityHandler` replaces the batch by [x; x'] with labels [y; y]
(every other per-sample entry duplicated too, and ``stability_copy`` marking the halves: 0 original,
1 copy) and tells the trainer's loss, :class:`StabilityLoss`, that this batch is n pairs; the loss
takes the stacked logits, computes the cross-entropy on the first half and lambda times the KL between
the halves (:func:`stability_loss`, the maths alone). Side effects of the one stacked forward pass:
BatchNorm's batch statistics (and its running statistics) are computed over both copies; the
training accuracy the trainer logs is over both halves and its logged loss is the whole objective.
Each iteration costs two forward and backward passes' worth of images (a batch twice as large, with
twice the activation memory); nothing else is added.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from ignite.engine import Engine, Events
from torch import nn
from torch.nn import functional as F

from robustmri.methods import Method

METHOD = Method(name="stability", title="stability training: cross-entropy plus KL between clean and noisy copies",
                order=10, families=("noisy images",), summary=None,
                reference="Zheng, Song, Leung, Goodfellow, CVPR 2016")

logger = logging.getLogger(__name__)

#: lambda, fixed before any run: the two terms weigh equally (not tuned).
DEFAULT_WEIGHT = 1.0
#: What the copy is: fresh training noise (the method) or a flip without noise (its control).
PERTURBATIONS = ("noise", "flip")
#: Training noise models a fresh draw can be taken from (the protocol's "rician_reference" is one fixed field).
FRESH_NOISES = ("gaussian", "rician")
#: Batch entry marking which half of the stacked batch an image belongs to: 0 original, 1 perturbed copy.
COPY_KEY = "stability_copy"


def check_noise(noise: str, sigma: float) -> None:
    """Refuse, in one line, a noise model no fresh draw can be taken from, or a non-positive sigma."""
    if noise not in FRESH_NOISES:
        raise ValueError(f"stability training draws fresh noise of the training noise model, one of {FRESH_NOISES}; "
                         f"got noise {noise!r} (use stability_perturbation flip, the control, for other runs)")
    if not sigma > 0:
        raise ValueError(f"stability_sigma must be > 0, got {sigma}")


def noisy_copy(images: torch.Tensor, noise: str, sigma: float,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh noisy copy of ``images`` (in [0, 1]), clipped to [0, 1]: Gaussian x + sigma n or Rician
    |x + sigma n1 + i sigma n2| (:mod:`robustmri.data.noise`'s models). Draws are made on the CPU from
    ``generator`` (so they do not depend on the device) and moved to the images' device."""
    check_noise(noise, sigma)
    images = images.detach()

    def draw() -> torch.Tensor:
        return torch.randn(images.shape, generator=generator, dtype=images.dtype).to(images.device) * sigma

    if noise == "gaussian":
        noisy = images + draw()
    else:
        real = images + draw()
        noisy = torch.hypot(real, draw())
    return noisy.clamp(0.0, 1.0)


def flipped_copy(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image ([N, C, H, W]) mirrored left-right or upside down, the axis chosen per image at random."""
    images = images.detach()
    upside_down = torch.rand(images.shape[0], generator=generator) < 0.5
    mask = upside_down.to(images.device).view(-1, *([1] * (images.ndim - 1)))
    return torch.where(mask, images.flip(-2), images.flip(-1))


def stability_loss(logits_clean: torch.Tensor, logits_perturbed: torch.Tensor, labels: torch.Tensor,
                   weight: float = DEFAULT_WEIGHT, cross_entropy: Callable = F.cross_entropy) -> torch.Tensor:
    """CE(logits_clean, labels) + weight * mean over images of KL(softmax(logits_clean) || softmax(logits_perturbed)).

    Computed in at least float32 from log-softmaxes (stable for confident predictions); gradients flow
    through both logits.
    """
    if logits_clean.shape != logits_perturbed.shape:
        raise ValueError(f"clean and perturbed logits differ in shape: {tuple(logits_clean.shape)} and "
                         f"{tuple(logits_perturbed.shape)}")
    dtype = torch.promote_types(logits_clean.dtype, torch.float32)  # half precision up, float64 kept
    clean, perturbed = logits_clean.to(dtype), logits_perturbed.to(dtype)
    log_p, log_q = F.log_softmax(clean, dim=1), F.log_softmax(perturbed, dim=1)
    divergence = (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()
    return cross_entropy(clean, labels.reshape(-1).long()) + float(weight) * divergence


class StabilityLoss(nn.Module):
    """The trainer's loss: plain cross-entropy, or :func:`stability_loss` on a batch that
    :class:`StabilityHandler` has stacked as n originals then their n copies (:meth:`set_pairs`)."""

    def __init__(self, weight: float = DEFAULT_WEIGHT):
        super().__init__()
        if not float(weight) >= 0:
            raise ValueError(f"stability_weight must be >= 0, got {weight}")
        self.weight = float(weight)
        self.cross_entropy = nn.CrossEntropyLoss()
        self.pairs: int | None = None

    def set_pairs(self, pairs: int | None) -> None:
        """The current batch is ``pairs`` originals followed by their copies; None: a plain batch."""
        self.pairs = None if pairs is None else int(pairs)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.pairs is None:
            return self.cross_entropy(logits, labels.reshape(-1).long())
        n = self.pairs
        if logits.shape[0] != 2 * n:
            raise ValueError(f"the stability loss expects {n} originals and {n} copies, got a batch of "
                             f"{logits.shape[0]}")
        return stability_loss(logits[:n], logits[n:], labels.reshape(-1)[:n], self.weight, self.cross_entropy)


def _stacked(value, copies, n: int):
    """A per-sample batch entry followed by itself (or by ``copies``), or the entry unchanged if not per sample."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == n:
        return torch.cat([value, value if copies is None else copies.to(value.dtype)])
    if isinstance(value, (list, tuple)) and len(value) == n:
        return type(value)(list(value) + list(value))
    return value


class StabilityHandler:
    """Stacks each training batch with its perturbed copies from epoch ``start_epoch + 1`` on: list it among
    the trainer's handlers, with the trainer's loss a :class:`StabilityLoss` (``loss``).

    ``noise`` and ``sigma`` are the training noise model and the copy's noise level (used when
    ``perturbation`` is ``"noise"``; another noise model, e.g. ``"none"``, is refused then);
    ``perturbation="flip"`` is the control.
    """

    def __init__(self, loss: StabilityLoss, noise: str = "gaussian", sigma: float = 32.0 / 255.0,
                 perturbation: str = "noise", start_epoch: int = 0, seed: int = 0,
                 image_key: str = "image", label_key: str = "label"):
        if not isinstance(loss, StabilityLoss):
            raise TypeError("stability training needs the trainer's loss to be "
                            "robustmri.methods.stability.StabilityLoss")
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"stability_perturbation must be one of {PERTURBATIONS}, got {perturbation!r}")
        if int(start_epoch) < 0:
            raise ValueError(f"stability_start_epoch must be >= 0, got {start_epoch}")
        self.loss, self.noise, self.sigma = loss, str(noise), float(sigma)
        self.perturbation, self.start_epoch = perturbation, int(start_epoch)
        if perturbation == "noise":
            check_noise(self.noise, self.sigma)  # refused now, not when the start epoch comes
        self.generator = torch.Generator().manual_seed(int(seed))
        self.image_key, self.label_key = image_key, label_key
        self._announced = False

    def training_state(self) -> dict:
        """The copies' generator, for resuming a run (:mod:`robustmri.engine.training_state`)."""
        return {"generator": self.generator.get_state()}

    def load_training_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def describe(self) -> str:
        copy = (f"{self.noise} noise, sigma {self.sigma:.4g}" if self.perturbation == "noise"
                else "a random left-right or upside-down flip, no noise (control)")
        return (f"stability training: CE + {self.loss.weight:g} x KL(p(x) || p(x')), x' = {copy}, "
                f"after {self.start_epoch} plain epochs")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self)
        logger.info(self.describe())

    def copies(self, images: torch.Tensor) -> torch.Tensor:
        """The perturbed copies x' of a batch of images."""
        if self.perturbation == "flip":
            return flipped_copy(images, self.generator)
        return noisy_copy(images, self.noise, self.sigma, self.generator)

    def __call__(self, engine: Engine) -> None:
        if engine.state.epoch <= self.start_epoch:
            self.loss.set_pairs(None)  # plain training: the batch is left alone and the loss is the cross-entropy
            return
        batch = engine.state.batch
        if not isinstance(batch, dict) or self.image_key not in batch or self.label_key not in batch:
            raise KeyError(f"stability training expects dict batches with '{self.image_key}' and '{self.label_key}'")
        images = torch.as_tensor(batch[self.image_key])
        n = images.shape[0]
        copies = self.copies(images)
        stacked = {key: _stacked(value, copies if key == self.image_key else None, n) for key, value in batch.items()}
        stacked[COPY_KEY] = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])
        batch.update(stacked)
        self.loss.set_pairs(n)
        if not self._announced:
            logger.info("stability: consistency term on from epoch %d", engine.state.epoch)
            self._announced = True
