"""Which checkpoint to keep, decided on validation data only.

The best-validation checkpoint is chosen on the same few validation slices that would judge it, so its
validation accuracy flatters it. To compare selection rules without the test split, a run keeps the
network's weights after every epoch (:class:`EpochSnapshots`) and the validation patients are split in two
halves by patient group (:func:`patient_halves`): a rule picks an epoch from one half's numbers and is scored
on the other half, then the halves swap (:func:`cross_selection`). Run on tuning seeds (never the seeds of
the final table), this says whether picking an epoch on validation beats simply keeping the last one.

Rules (:data:`RULES`), each a function of per-epoch validation accuracy and loss on the selecting half:

- ``last``: the last epoch (no selection);
- ``best_accuracy``: the first epoch with the highest accuracy (MONAI's ``CheckpointSaver`` rule: a later
  epoch replaces the kept one only when strictly better);
- ``lowest_loss``: the epoch with the lowest mean cross-entropy;
- ``best_accuracy_late``: ``best_accuracy`` among the second half of the epochs;
- ``ema`` (when the run kept one): the exponential moving average of the weights at the end, no selection.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from torch import nn

from robustmri.engine.ema import WeightAverage
from robustmri.engine.predictions import predict_items


class EpochSnapshots:
    """Trainer handler: a CPU copy of ``network``'s state after every epoch, saved to ``path`` when training ends.

    With ``ema_decay`` it also keeps the product recipe's moving average of the weights
    (:class:`robustmri.engine.ema.WeightAverage`, BatchNorm statistics included, updated after every
    iteration) and a copy of it after every epoch. ``path`` holds ``{"epochs": [1, 2, ...], "states":
    [state_dict, ...], "ema_states": [the average after each epoch], "ema_decay": ...}`` (``weights_only=True``)."""

    def __init__(self, network: nn.Module, path: str, ema_decay: float | None = None):
        self.network, self.path = network, path
        self.average = WeightAverage(network, ema_decay)
        self.ema_decay = self.average.decay
        self.epochs: list[int] = []
        self.states: list[dict[str, torch.Tensor]] = []
        self.ema_states: list[dict[str, torch.Tensor]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._take)
        engine.add_event_handler(Events.COMPLETED, self._save)
        self.average.attach(engine)

    @staticmethod
    def _copy(module: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}

    def _take(self, engine: Engine) -> None:
        self.epochs.append(int(engine.state.epoch))
        self.states.append(self._copy(self.network))
        if self.average.enabled:
            self.ema_states.append(self._copy(self.average.model))

    def _save(self, engine: Engine) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        torch.save({"epochs": self.epochs, "states": self.states, "ema_states": self.ema_states,
                    "ema_decay": self.ema_decay}, self.path)


def per_epoch_outcomes(network: nn.Module, snapshots: dict, items: list[dict],
                       key: str = "states") -> tuple[np.ndarray, np.ndarray]:
    """``correct`` [E, N] (bool) and ``loss`` [E, N] (cross-entropy) on ``items`` of every state in
    ``snapshots[key]`` (``"states"``: the weights after each epoch; ``"ema_states"``: their average)."""
    device = next(network.parameters()).device
    correct, loss = [], []
    for state in snapshots[key]:
        network.load_state_dict(state)
        logits, labels, _ = predict_items(network, items, device=device)
        correct.append((logits.argmax(1) == labels).numpy())
        loss.append(F.cross_entropy(logits, labels, reduction="none").numpy())
    return np.stack(correct), np.stack(loss)


def patient_halves(groups, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two boolean masks over the slices: each patient group wholly in one half, halves of equal group count
    (one more in the first when odd), groups assigned at random with ``seed``."""
    groups = np.asarray(groups).ravel()
    unique = np.unique(groups)
    if unique.size < 2:
        raise ValueError(f"need at least 2 patient groups to split validation in halves, got {unique.size}")
    order = np.random.default_rng(seed).permutation(unique.size)
    first = set(unique[order[: (unique.size + 1) // 2]].tolist())
    mask = np.array([g in first for g in groups.tolist()])
    return mask, ~mask


def mean_step(accuracy) -> float | None:
    """The mean absolute epoch-to-epoch change of a validation-accuracy curve over its second half
    (``robustmri.bench.report.validation_swing``'s ``mean_step``)."""
    from robustmri.bench.report import validation_swing
    return validation_swing([{"val_accuracy": float(a)} for a in accuracy])["mean_step"]


def _first_max(values: np.ndarray) -> int:
    return int(np.flatnonzero(values == values.max())[0])


RULES: dict[str, Callable[[np.ndarray, np.ndarray], int]] = {
    "last": lambda accuracy, loss: len(accuracy) - 1,
    "best_accuracy": lambda accuracy, loss: _first_max(accuracy),
    "lowest_loss": lambda accuracy, loss: int(np.argmin(loss)),
    "best_accuracy_late": lambda accuracy, loss: len(accuracy) // 2 + _first_max(accuracy[len(accuracy) // 2:]),
}


def cross_selection(correct: np.ndarray, loss: np.ndarray, groups, seed: int = 0,
                    rules: dict[str, Callable] | None = None, fixed: dict | None = None) -> dict[str, dict]:
    """Per rule: the epochs (0-based) it picks on each half and ``score``, the mean held-out accuracy
    (pick on half A, score on half B; pick on B, score on A), plus ``held_out`` (the two scores).
    ``fixed``: candidates that pick nothing (e.g. ``{"ema": correct_per_slice}``), scored on the same halves."""
    correct = np.asarray(correct, dtype=float)
    loss = np.asarray(loss, dtype=float)
    if correct.ndim != 2 or correct.shape != loss.shape:
        raise ValueError(f"correct and loss must both be [epochs, slices], got {correct.shape} and {loss.shape}")
    halves = patient_halves(groups, seed)
    result = {}
    for name, outcome in (fixed or {}).items():
        outcome = np.asarray(outcome, dtype=float)
        scores = [float(outcome[halves[1]].mean()), float(outcome[halves[0]].mean())]
        result[name] = {"epochs": None, "held_out": scores, "score": float(np.mean(scores))}
    for name, rule in (rules or RULES).items():
        picks, scores = [], []
        for select, score in (halves, halves[::-1]):
            epoch = rule(correct[:, select].mean(axis=1), loss[:, select].mean(axis=1))
            picks.append(epoch)
            scores.append(float(correct[epoch, score].mean()))
        result[name] = {"epochs": picks, "held_out": scores, "score": float(np.mean(scores))}
    return result


def decide(records: list[dict], baseline: str = "last") -> tuple[str, dict[str, dict]]:
    """The rule to use and, per rule, its paired difference against ``baseline`` over the records
    (one per method, noise and tuning seed). A rule replaces the baseline only when its paired 95 %
    interval lies above zero; among such rules the highest mean wins."""
    from robustmri.bench.stats import paired_difference

    def scores(rule):
        return {(r["method"], r["noise"], r["seed"]): r["rules"][rule]["score"] for r in records if rule in r["rules"]}

    names = list(dict.fromkeys(name for r in records for name in r["rules"]))
    comparison = {name: paired_difference(scores(name), scores(baseline)) for name in names}
    better = [name for name, c in comparison.items() if name != baseline and c["ci"] is not None and c["ci"][0] > 0]
    chosen = max(better, key=lambda name: comparison[name]["mean"]) if better else baseline
    return chosen, comparison


def selection_table(records: list[dict], baseline: str = "last") -> str:
    """Markdown: per rule, the held-out validation accuracy (mean ± std over runs), the paired difference
    against ``baseline`` with its 95 % interval and the count of runs where the rule did better, the epochs
    it picked; then the decision."""
    if not records:
        return "No selection runs yet.\n"
    chosen, comparison = decide(records, baseline)
    lines = ["| rule | held-out val. accuracy (%) | vs " + baseline + " (points, 95 % CI) | better in | epochs picked |",
             "| --- | --- | --- | --- | --- |"]
    for name, c in comparison.items():
        values = np.array([r["rules"][name]["score"] for r in records if name in r["rules"]]) * 100
        picked = sorted(e + 1 for r in records if name in r["rules"] for e in (r["rules"][name]["epochs"] or []))
        if name == baseline:
            diff, count = "–", "–"
        elif c["ci"] is None:
            diff, count = f"{100 * c['mean']:+.1f}" if c["mean"] is not None else "–", f"{c['positive']}/{c['n']}"
        else:
            diff = f"{100 * c['mean']:+.1f} [{100 * c['ci'][0]:+.1f}, {100 * c['ci'][1]:+.1f}]"
            count = f"{c['positive']}/{c['n']}"
        std = f" ± {values.std(ddof=1):.1f}" if values.size > 1 else ""
        epochs = f"{picked[0]}–{picked[-1]} (median {int(np.median(picked))})" if picked else "– (no selection)"
        lines.append(f"| `{name}` | {values.mean():.1f}{std} | {diff} | {count} | {epochs} |")
    steps = {name: [mean_step(r[key]) for r in records if r.get(key)]
             for name, key in (("raw weights", "val_accuracy"), ("EMA weights", "ema_val_accuracy"))}
    stability = "; ".join(f"{name} {100 * np.mean(v):.1f} points (runs: {', '.join(f'{100 * x:.1f}' for x in v)})"
                          for name, v in steps.items() if v)
    if stability:
        lines += ["", "Mean absolute epoch-to-epoch change of validation accuracy (all validation slices) over the "
                  f"second half of training: {stability}."]
    units = sorted({(r["method"], r["noise"]) for r in records})
    seeds = sorted({r["seed"] for r in records})
    lines += ["", f"{len(records)} runs ({', '.join(f'{m}/{n}' for m, n in units)}; tuning seeds {seeds}); "
              "each rule picks an epoch on one half of the validation patients and is scored on the other half, "
              "both ways. Decision: "
              + (f"`{chosen}` (its interval against `{baseline}` lies above zero)." if chosen != baseline else
                 f"`{baseline}`: no rule beat it with an interval above zero.")]
    return "\n".join(lines) + "\n"
