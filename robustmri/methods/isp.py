"""ISP, Influence-based Sample Perturbation (Algorithm 2 of Van, Carey and Wu, arXiv 2403.10698).

After epoch T_pre each selected training image takes one step along the direction that the
influence function predicts lowers the clean validation loss (sign convention of
:mod:`robustmri.influence`), and the perturbed image replaces the original for the remaining
epochs. :func:`select_for_perturbation` and :func:`perturb` are the maths;
:class:`ISPHandler` the bundle's handler (``isp.json``).
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from torch import nn

from robustmri.data.batching import item_batches
from robustmri.influence import input_gradients
from robustmri.methods import Method
from robustmri.methods.influence_step import InfluenceStep, plot_influence_examples

METHOD = Method(name="isp", title="ISP: influence-based sample perturbation", order=4,
                families=("noisy images",), summary="influence_summary.json",
                reference="Van, Carey, Wu, arXiv 2403.10698, Algorithm 2")

SELECTIONS = ("harmful", "influential")
DIRECTIONS = ("gradient", "sign")
QUANTISATIONS = ("float", "uint8_truncate")


def select_for_perturbation(scores: torch.Tensor, ratio: float = 1.0, selection: str = "harmful") -> torch.Tensor:
    """Indices of the ``ratio`` share of samples to perturb, most harmful (lowest score) or
    most influential (largest |score|) first; ratio 1.0 takes every sample, as the reference."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must lie in (0, 1], got {ratio}")
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    key = scores if selection == "harmful" else -scores.abs()
    count = max(1, round(ratio * len(scores)))
    return torch.argsort(key)[:count]


def perturb(images: torch.Tensor, gradients: torch.Tensor, step: float = 0.1, direction: str = "gradient",
            epsilon: float | None = None, quantisation: str = "float") -> torch.Tensor:
    """x + step * d, d = grad_x(g . s) or its sign, within an optional L-inf budget, clipped to [0, 1].

    ``quantisation="uint8_truncate"`` casts to 8 bits by truncation as the reference code
    does (a small negative step always loses one grey level).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if quantisation not in QUANTISATIONS:
        raise ValueError(f"quantisation must be one of {QUANTISATIONS}, got {quantisation!r}")
    delta = step * (gradients.sign() if direction == "sign" else gradients)
    if epsilon is not None:
        delta = delta.clamp(-epsilon, epsilon)
    perturbed = (images + delta).clamp(0.0, 1.0)
    if quantisation == "uint8_truncate":
        perturbed = torch.floor(perturbed * 255.0) / 255.0
    return perturbed


class ISPHandler(InfluenceStep):
    """Influence-based Sample Perturbation: one persisted step per selected training image."""

    method = "ISP"

    def __init__(self, *args, step: float = 0.1, direction: str = "gradient", epsilon: float | None = None,
                 quantisation: str = "float", ratio: float = 1.0, selection: str = "harmful", **kwargs):
        super().__init__(*args, **kwargs)
        self.options = {"step": float(step), "direction": direction, "epsilon": epsilon, "quantisation": quantisation}
        self.ratio, self.selection = float(ratio), selection
        perturb(torch.zeros(1), torch.zeros(1), **self.options)  # validate the options now
        select_for_perturbation(torch.zeros(2), self.ratio, selection)
        self.changed = 0

    def apply(self, network: nn.Module, device: torch.device, positions: list[int]) -> dict[str, np.ndarray]:
        s = self.result.s.to(device)
        chosen = select_for_perturbation(self.result.scores, self.ratio, self.selection).tolist()
        linf = np.zeros(len(positions))
        l2 = np.zeros(len(positions))
        order = np.argsort(self.result.scores.numpy())
        examples = set(order[:3].tolist() + order[-3:].tolist())  # most harmful and most helpful
        before, deltas = {}, {}
        start = time.perf_counter()
        for start_row in range(0, len(chosen), self.batch_size):
            rows = chosen[start_row:start_row + self.batch_size]
            batch = next(item_batches(self.train_data, len(rows), [positions[r] for r in rows]))
            images = batch["image"].to(device)
            gradients = input_gradients(network, images, batch["label"].to(device), s)
            perturbed = perturb(images, gradients, **self.options)
            change = (perturbed - images).detach()
            for k, row in enumerate(rows):
                self.train_data[positions[row]]["image"] = perturbed[k].detach().cpu().numpy().astype(np.float32)
                linf[row] = change[k].abs().max().item()
                l2[row] = change[k].norm().item()
                if row in examples:
                    before[row] = images[k, 0].cpu().numpy()
                    deltas[row] = change[k, 0].cpu().numpy()
        self.timings["input_gradients_s"] = time.perf_counter() - start
        self.changed = len(chosen)
        rows = sorted(before, key=lambda r: self.result.scores[r].item())
        plot_influence_examples([before[r] for r in rows], [deltas[r] for r in rows],
                                self.result.scores.numpy()[rows], self.class_names, self.result.labels.numpy()[rows],
                                os.path.join(self.output_dir, "influence_examples.png"))
        return {"perturbation_linf": linf, "perturbation_l2": l2}

    def describe(self) -> str:
        return f"; {self.changed} images perturbed ({self.options['direction']}, step {self.options['step']:g})"
