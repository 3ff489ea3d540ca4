"""PINT's EMA-teacher uncertainty scheme (Shi & Wu, MICCAI 2021), adapted to classification.

A teacher network is the exponential moving average of the student (the trainer's
network): after every optimiser step, theta_t <- d theta_t + (1 - d) theta_s (BatchNorm
statistics copied). It receives no gradients. For each training batch the teacher predicts
under T random input perturbations (Gaussian noise of standard deviation ``noise_std``);
the entropy H of the mean prediction, in [0, log C], measures how unsure it is, and
c = 1 - H / log C is its certainty.

Samples with H <= ``threshold * log C`` are trained on their given labels; the others on
the teacher's pseudo-label (argmax of the mean prediction) weighted by c, keeping a share
``label_weight`` of their given-label loss:

    loss_i = CE(p_i, y_i)                                               if confident
    loss_i = label_weight * CE(p_i, y_i) + (1 - label_weight) * c_i * CE(p_i, yhat_i)   otherwise

so ``label_weight = 1`` is plain cross-entropy. For the first ``warmup_epochs`` the teacher
is still poor and every sample counts as confident.
"""

from __future__ import annotations

import copy
import logging
import math

import numpy as np
import torch
from ignite.engine import Engine, Events
from torch import nn

from .sample_predictions import entropy, write_json

logger = logging.getLogger(__name__)


def make_teacher(student: nn.Module) -> nn.Module:
    """A detached copy of the student that never receives gradients."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """theta_t <- decay * theta_t + (1 - decay) * theta_s; buffers (BatchNorm statistics) copied."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(decay).add_(s.detach(), alpha=1.0 - decay)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)


@torch.no_grad()
def perturbed_uncertainty(teacher: nn.Module, images: torch.Tensor, repeats: int = 4, noise_std: float = 0.05,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean softmax over ``repeats`` noisy copies of each image and the entropy of that mean (teacher in eval mode)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    was_training = teacher.training
    teacher.eval()
    try:
        total = 0.0
        for _ in range(repeats):
            noise = torch.randn(images.shape, generator=generator, dtype=images.dtype).to(images.device) * noise_std
            total = total + torch.softmax(teacher(images + noise), dim=1)
    finally:
        teacher.train(was_training)
    mean = total / repeats
    return mean, entropy(mean)


def teacher_guided_loss(logits: torch.Tensor, labels: torch.Tensor, pseudo_labels: torch.Tensor | None,
                        uncertainty: torch.Tensor | None, threshold: float, label_weight: float) -> torch.Tensor:
    """Mean over the batch of the per-sample loss in the module docstring; plain CE without teacher outputs."""
    labels = labels.long().reshape(-1)
    label_loss = nn.functional.cross_entropy(logits, labels, reduction="none")
    if pseudo_labels is None or uncertainty is None:
        return label_loss.mean()
    log_c = math.log(logits.shape[1])
    uncertain = uncertainty > threshold * log_c
    certainty = (1.0 - uncertainty / log_c).clamp(0.0, 1.0)
    pseudo_loss = nn.functional.cross_entropy(logits, pseudo_labels.long(), reduction="none")
    mixed = label_weight * label_loss + (1.0 - label_weight) * certainty * pseudo_loss
    return torch.where(uncertain, mixed, label_loss).mean()


class TeacherGuidedCrossEntropy(nn.Module):
    """The trainer's loss: uses the teacher outputs that :class:`EMATeacherHandler` set for the current batch."""

    def __init__(self, threshold: float = 0.5, label_weight: float = 0.0):
        super().__init__()
        if not 0.0 <= threshold <= 1.0 or not 0.0 <= label_weight <= 1.0:
            raise ValueError(f"threshold and label_weight must lie in [0, 1], got {threshold} and {label_weight}")
        self.threshold, self.label_weight = float(threshold), float(label_weight)
        self.pseudo_labels: torch.Tensor | None = None
        self.uncertainty: torch.Tensor | None = None

    def set_teacher_outputs(self, pseudo_labels: torch.Tensor | None, uncertainty: torch.Tensor | None) -> None:
        self.pseudo_labels, self.uncertainty = pseudo_labels, uncertainty

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return teacher_guided_loss(logits, labels, self.pseudo_labels, self.uncertainty, self.threshold,
                                   self.label_weight)


class EMATeacherHandler:
    """Keeps the EMA teacher, sets the loss's per-batch teacher outputs, writes ``pint_summary.json``."""

    def __init__(self, loss: TeacherGuidedCrossEntropy, output_dir: str, decay: float = 0.99, repeats: int = 4,
                 noise_std: float = 0.05, warmup_epochs: int = 1, seed: int = 0,
                 train_data: list[dict] | None = None):
        if not isinstance(loss, TeacherGuidedCrossEntropy):
            raise TypeError("pint needs the trainer's loss to be robustmri.ema_teacher.TeacherGuidedCrossEntropy")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
        self.loss, self.output_dir = loss, output_dir
        self.decay, self.repeats, self.noise_std = float(decay), int(repeats), float(noise_std)
        self.warmup_epochs = int(warmup_epochs)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.true_by_id = ({int(it["id"]): int(it["true_label"]) for it in train_data if "true_label" in it}
                           if train_data else {})
        self.teacher: nn.Module | None = None
        self.history: list[dict] = []
        self._stats: dict[str, list] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_STARTED, self._before_step)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._after_step)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._record)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _start(self, engine: Engine) -> None:
        self.teacher = make_teacher(engine.network)

    def _reset(self, engine: Engine) -> None:
        self._stats = {"uncertain": [], "certainty": [], "agree": [], "wrong": [], "pseudo_correct": []}

    def _before_step(self, engine: Engine) -> None:
        if engine.state.epoch <= self.warmup_epochs:
            self.loss.set_teacher_outputs(None, None)
            return
        batch = engine.state.batch
        device = next(engine.network.parameters()).device
        images = torch.as_tensor(batch["image"]).to(device)
        labels = torch.as_tensor(batch["label"]).reshape(-1).long()
        mean, uncertainty = perturbed_uncertainty(self.teacher, images, self.repeats, self.noise_std, self.generator)
        pseudo = mean.argmax(1)
        self.loss.set_teacher_outputs(pseudo, uncertainty)
        uncertain = (uncertainty > self.loss.threshold * math.log(mean.shape[1])).cpu()
        self._stats["uncertain"] += uncertain.tolist()
        self._stats["certainty"] += (1 - uncertainty / math.log(mean.shape[1])).cpu().tolist()
        self._stats["agree"] += (pseudo.cpu() == labels).tolist()
        if self.true_by_id and "id" in batch:
            truth = torch.tensor([self.true_by_id[int(i)] for i in torch.as_tensor(batch["id"]).reshape(-1)])
            self._stats["wrong"] += (truth != labels).tolist()
            self._stats["pseudo_correct"] += (pseudo.cpu() == truth).tolist()

    def _after_step(self, engine: Engine) -> None:
        ema_update(self.teacher, engine.network, self.decay)

    def _record(self, engine: Engine) -> None:
        s = self._stats
        entry = {"epoch": engine.state.epoch, "warmup": engine.state.epoch <= self.warmup_epochs}
        if s["uncertain"]:
            uncertain = np.array(s["uncertain"])
            entry.update({"uncertain_share": float(uncertain.mean()), "mean_certainty": float(np.mean(s["certainty"])),
                          "pseudo_agrees_with_label": float(np.mean(s["agree"]))})
            if s["wrong"]:  # evaluation only: how the split relates to the recorded wrong labels
                wrong, correct = np.array(s["wrong"]), np.array(s["pseudo_correct"])
                entry["uncertain_share_of_wrong_labels"] = float(uncertain[wrong].mean()) if wrong.any() else None
                entry["uncertain_share_of_correct_labels"] = float(uncertain[~wrong].mean()) if (~wrong).any() else None
                entry["pseudo_label_accuracy_on_uncertain"] = float(correct[uncertain].mean()) if uncertain.any() else None
        self.history.append(entry)

    def _write(self, engine: Engine) -> None:
        write_json(self.output_dir, "pint_summary.json", {
            "method": "PINT-style EMA teacher", "decay": self.decay, "repeats": self.repeats,
            "noise_std": self.noise_std, "threshold": self.loss.threshold, "label_weight": self.loss.label_weight,
            "warmup_epochs": self.warmup_epochs, "history": self.history})
