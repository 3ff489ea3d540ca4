"""PINT's EMA-teacher uncertainty scheme (Shi & Wu, MICCAI 2021), adapted to classification.

A teacher network is the exponential moving average of the student (the trainer's
network): after the n-th optimiser step, theta_t <- d_n theta_t + (1 - d_n) theta_s with
d_n = min(d, 1 - 1/(n + 1)) (Mean Teacher's ramp), BatchNorm statistics averaged alike. It
receives no gradients. For each training batch the teacher predicts under T random input
perturbations (Gaussian noise of standard deviation ``noise_std``); the entropy H of the
mean prediction, in [0, log C], measures how unsure it is, and c = 1 - H / log C is its
certainty.

The ``uncertain_fraction`` most uncertain samples of each batch are trained on the teacher's
pseudo-label (argmax of the mean prediction) weighted by c, keeping a share ``label_weight``
of their given-label loss; the others on their given labels:

    loss_i = CE(p_i, y_i)                                               if confident
    loss_i = label_weight * CE(p_i, y_i) + (1 - label_weight) * c_i * CE(p_i, yhat_i)   otherwise

so ``label_weight = 1`` or ``uncertain_fraction = 0`` is plain cross-entropy. The split is
by rank, not by an absolute entropy threshold: under symmetric label noise at rate r even a
perfectly calibrated teacher predicts (1 - r, r/(C-1), ...), whose entropy exceeds half of
log C for r above 0.16 at C = 3, so a fixed threshold calls every sample uncertain and training
becomes self-training without labels, which collapsed to one class on the figshare slices.
For the first ``warmup_epochs`` the teacher is still poor and every sample counts as
confident.

Under ``torchrun`` (:mod:`robustmri.engine.distributed`) the student is the trainer's DDP
network, the same on every rank after each step; every rank keeps the teacher as the average of
the student itself (:func:`~robustmri.influence.adapter.unwrap`, not its DDP wrapper), so the
teacher's weights are the same on every rank. BatchNorm statistics are updated by each
rank from its own batches: the teacher takes rank 0's (weights and statistics) at every epoch
end, as the student does (:class:`~robustmri.engine.distributed.BroadcastState`). Each rank
judges its own batch (the uncertain share is a rank within each rank's batch, as within each
batch in one process); the ranks' perturbation generators start from the same seed. The
epoch's statistics are pooled over the ranks; rank 0 alone writes ``pint_summary.json``.

Resuming (:mod:`robustmri.engine.training_state`): the handler's state holds the teacher, the
number of EMA updates (the ramp's position), the perturbation generator and the history.
"""

from __future__ import annotations

import copy
import logging
import math
import os

import numpy as np
import torch
from ignite.engine import Engine, Events
from torch import nn

from robustmri.engine.distributed import broadcast_module, gather_lists, is_main_process
from robustmri.engine.predictions import entropy
from robustmri.influence.adapter import unwrap
from robustmri.methods import Method
from robustmri.networks import eval_mode
from robustmri.outputs import write_json

METHOD = Method(name="pint", title="PINT: EMA-teacher uncertainty, pseudo-labels for the uncertain samples", order=8,
                families=("noisy labels",), summary="pint_summary.json",
                reference="Shi and Wu, MICCAI 2021 (adapted to classification)")

logger = logging.getLogger(__name__)


def make_teacher(student: nn.Module) -> nn.Module:
    """A detached copy of the student that never receives gradients."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def ramped_decay(decay: float, step: int) -> float:
    """min(decay, 1 - 1 / (step + 1)) for the step-th update (from 0), as in Mean Teacher (Tarvainen & Valpola 2017).

    With a constant decay the random initial weights keep a share decay^n of the teacher
    (a quarter after 140 steps at 0.99), which leaves it unsure of everything when warm-up
    ends; with the ramp the teacher is the plain mean of the student's first steps, and the
    initial weights drop out at the first update."""
    return min(float(decay), 1.0 - 1.0 / (int(step) + 1))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """theta_t <- decay * theta_t + (1 - decay) * theta_s, for parameters and floating-point buffers.

    BatchNorm running statistics are averaged like the weights so that the teacher, run in
    eval mode, normalises with statistics that belong to its own (averaged) weights; integer
    buffers (batch counters) are copied."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(decay).add_(s.detach(), alpha=1.0 - decay)
    for t, s in zip(teacher.buffers(), student.buffers()):
        if t.is_floating_point():
            t.mul_(decay).add_(s.detach(), alpha=1.0 - decay)
        else:
            t.copy_(s)


@torch.no_grad()
def perturbed_uncertainty(teacher: nn.Module, images: torch.Tensor, repeats: int = 4, noise_std: float = 0.05,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean softmax over ``repeats`` noisy copies of each image and the entropy of that mean (teacher in eval mode)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    total = 0.0
    with eval_mode(teacher):
        for _ in range(repeats):
            noise = torch.randn(images.shape, generator=generator, dtype=images.dtype).to(images.device) * noise_std
            total = total + torch.softmax(teacher(images + noise), dim=1)
    mean = total / repeats
    return mean, entropy(mean)


def most_uncertain(uncertainty: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean mask of the round(fraction * n) samples of highest uncertainty (ties broken by position)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"uncertain_fraction must lie in [0, 1], got {fraction}")
    mask = torch.zeros(uncertainty.shape[0], dtype=torch.bool, device=uncertainty.device)
    k = int(round(fraction * uncertainty.shape[0]))
    if k:
        mask[torch.topk(uncertainty, k, sorted=False).indices] = True
    return mask


def teacher_guided_loss(logits: torch.Tensor, labels: torch.Tensor, pseudo_labels: torch.Tensor | None,
                        uncertainty: torch.Tensor | None, uncertain_fraction: float,
                        label_weight: float) -> torch.Tensor:
    """Mean over the batch of the per-sample loss in the module docstring; plain CE without teacher outputs."""
    labels = labels.long().reshape(-1)
    label_loss = nn.functional.cross_entropy(logits, labels, reduction="none")
    if pseudo_labels is None or uncertainty is None:
        return label_loss.mean()
    uncertain = most_uncertain(uncertainty, uncertain_fraction)
    certainty = (1.0 - uncertainty / math.log(logits.shape[1])).clamp(0.0, 1.0)
    pseudo_loss = nn.functional.cross_entropy(logits, pseudo_labels.long(), reduction="none")
    mixed = label_weight * label_loss + (1.0 - label_weight) * certainty * pseudo_loss
    return torch.where(uncertain, mixed, label_loss).mean()


class TeacherGuidedCrossEntropy(nn.Module):
    """The trainer's loss: uses the teacher outputs that :class:`PINTHandler` set for the current batch."""

    def __init__(self, uncertain_fraction: float = 0.2, label_weight: float = 0.0):
        super().__init__()
        if not 0.0 <= uncertain_fraction <= 1.0 or not 0.0 <= label_weight <= 1.0:
            raise ValueError("uncertain_fraction and label_weight must lie in [0, 1], "
                             f"got {uncertain_fraction} and {label_weight}")
        self.uncertain_fraction, self.label_weight = float(uncertain_fraction), float(label_weight)
        self.pseudo_labels: torch.Tensor | None = None
        self.uncertainty: torch.Tensor | None = None

    def set_teacher_outputs(self, pseudo_labels: torch.Tensor | None, uncertainty: torch.Tensor | None) -> None:
        self.pseudo_labels, self.uncertainty = pseudo_labels, uncertainty

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return teacher_guided_loss(logits, labels, self.pseudo_labels, self.uncertainty, self.uncertain_fraction,
                                   self.label_weight)


class PINTHandler:
    """Keeps the EMA teacher, sets the loss's per-batch teacher outputs, writes ``pint_summary.json``.

    A :class:`~robustmri.engine.training_state.Resumable` handler: its state is put back when the run
    starts, after the teacher is built."""

    def __init__(self, loss: TeacherGuidedCrossEntropy, output_dir: str, decay: float = 0.99, repeats: int = 4,
                 noise_std: float = 0.05, warmup_epochs: int = 1, seed: int = 0,
                 train_data: list[dict] | None = None):
        if not isinstance(loss, TeacherGuidedCrossEntropy):
            raise TypeError("pint needs the trainer's loss to be robustmri.methods.pint.TeacherGuidedCrossEntropy")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
        self.loss, self.output_dir = loss, output_dir
        self.decay, self.repeats, self.noise_std = float(decay), int(repeats), float(noise_std)
        self.warmup_epochs = int(warmup_epochs)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.true_by_id = ({int(it["id"]): int(it["true_label"]) for it in train_data if "true_label" in it}
                           if train_data else {})
        self.teacher: nn.Module | None = None
        self.updates, self._num_classes = 0, 0
        self.history: list[dict] = []
        self._stats: dict[str, list] = {}
        self._pending: dict | None = None  # a resumed run's state, put back once the teacher exists

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_STARTED, self._before_step)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._after_step)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._record)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _start(self, engine: Engine) -> None:
        self.teacher = make_teacher(unwrap(engine.network))  # the network, not its DDP wrapper
        self.updates = 0
        if self._pending is not None:
            self._restore(self._pending)
            self._pending = None

    # -- resuming (robustmri.engine.training_state.Resumable) --
    def training_state(self) -> dict:
        """The teacher, the number of EMA updates, the perturbation generator and the history."""
        return {"teacher": self.teacher.state_dict(), "updates": int(self.updates),
                "generator": self.generator.get_state(), "history": copy.deepcopy(self.history)}

    def load_training_state(self, state: dict) -> None:
        """Put ``state`` back now if the run has started, else when it starts (the trainer restores first)."""
        if self.teacher is None:
            self._pending = state
        else:
            self._restore(state)

    def _restore(self, state: dict) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.updates = int(state["updates"])
        self.generator.set_state(state["generator"])
        self.history = copy.deepcopy(list(state["history"]))

    def _reset(self, engine: Engine) -> None:
        self._stats = {"uncertain": [], "certainty": [], "agree": [], "wrong": [], "pseudo_correct": [], "pseudo": []}

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
        uncertain = most_uncertain(uncertainty, self.loss.uncertain_fraction).cpu()
        self._stats["uncertain"] += uncertain.tolist()
        self._stats["certainty"] += (1 - uncertainty / math.log(mean.shape[1])).cpu().tolist()
        self._stats["agree"] += (pseudo.cpu() == labels).tolist()
        self._stats["pseudo"] += pseudo.cpu().tolist()
        self._num_classes = mean.shape[1]
        if self.true_by_id and "id" in batch:
            truth = torch.tensor([self.true_by_id[int(i)] for i in torch.as_tensor(batch["id"]).reshape(-1)])
            self._stats["wrong"] += (truth != labels).tolist()
            self._stats["pseudo_correct"] += (pseudo.cpu() == truth).tolist()

    def _after_step(self, engine: Engine) -> None:
        ema_update(self.teacher, unwrap(engine.network), ramped_decay(self.decay, self.updates))
        self.updates += 1

    def _record(self, engine: Engine) -> None:
        broadcast_module(self.teacher)  # under torchrun: rank 0's teacher (its BatchNorm statistics) on every rank
        parts = gather_lists([self._stats])  # under torchrun: every rank's batches
        s = {key: [value for part in parts for value in part[key]] for key in self._stats}
        entry = {"epoch": engine.state.epoch, "warmup": engine.state.epoch <= self.warmup_epochs}
        if s["uncertain"]:
            uncertain = np.array(s["uncertain"])
            entry.update({"uncertain_share": float(uncertain.mean()), "mean_certainty": float(np.mean(s["certainty"])),
                          "pseudo_agrees_with_label": float(np.mean(s["agree"])),
                          # a teacher that has collapsed to one class shows here first
                          "pseudo_label_class_shares": [round(float(v), 4) for v in np.bincount(
                              s["pseudo"], minlength=self._num_classes) / len(s["pseudo"])]})
            if s["wrong"]:  # evaluation only: how the split relates to the recorded wrong labels
                wrong, correct = np.array(s["wrong"]), np.array(s["pseudo_correct"])
                entry["uncertain_share_of_wrong_labels"] = float(uncertain[wrong].mean()) if wrong.any() else None
                entry["uncertain_share_of_correct_labels"] = float(uncertain[~wrong].mean()) if (~wrong).any() else None
                entry["pseudo_label_accuracy_on_uncertain"] = (float(correct[uncertain].mean()) if uncertain.any()
                                                               else None)
        self.history.append(entry)

    def _write(self, engine: Engine) -> None:
        if not is_main_process():  # under torchrun every rank holds the same history; rank 0 writes it
            return
        write_json(os.path.join(self.output_dir, METHOD.summary), {
            "method": "PINT-style EMA teacher", "decay": self.decay, "repeats": self.repeats,
            "noise_std": self.noise_std, "uncertain_fraction": self.loss.uncertain_fraction,
            "label_weight": self.loss.label_weight, "warmup_epochs": self.warmup_epochs, "history": self.history})
