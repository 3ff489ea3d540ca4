"""Learning-rate schedules of the training recipes, stepped once per iteration.

``cosine``: linear warm-up from ``1 / warmup_steps`` of the base rate to the base rate over
``warmup_epochs``, then cosine decay to ``final_fraction`` of it at the last iteration (the
product's recipe). ``constant``: the base rate throughout (the paper's recipe). The bundle
steps the schedule with MONAI's ``LrScheduleHandler(epoch_level=False)``.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("cosine", "constant")


def lr_factor(step: int, total_steps: int, warmup_steps: int = 0, schedule: str = "cosine",
              final_fraction: float = 0.0) -> float:
    """The multiplier of the base learning rate for optimiser step ``step`` (0-based)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "constant":
        return 1.0
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int, schedule: str = "cosine",
                   warmup_epochs: float = 1.0, final_fraction: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration ``LambdaLR`` for ``epochs`` epochs of ``steps_per_epoch`` steps."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {schedule!r}")
    if int(epochs) < 1 or int(steps_per_epoch) < 1:
        raise ValueError(f"epochs and steps_per_epoch must be >= 1, got {epochs} and {steps_per_epoch}")
    if float(warmup_epochs) < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    if not 0.0 <= float(final_fraction) <= 1.0:
        raise ValueError(f"final_fraction must lie in [0, 1], got {final_fraction}")
    total = int(epochs) * int(steps_per_epoch)
    # a warm-up as long as the run would leave no decay: at most half of the steps (short test runs)
    warmup = min(int(round(float(warmup_epochs) * int(steps_per_epoch))), total // 2)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, schedule, float(final_fraction)))
