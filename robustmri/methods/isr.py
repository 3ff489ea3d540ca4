"""ISR, Influence-based Sample Reweighing (Algorithm 1 of Van, Carey and Wu, arXiv 2403.10698).

After epoch T_pre every training sample gets a fixed loss weight: its influence score
(sign convention of :mod:`robustmri.influence`, positive = helpful) MinMax-scaled into
[1, alpha]. :func:`isr_weights` is the maths (and :func:`permuted_weights` its no-signal
control); :class:`ISRHandler` the bundle's handler (``isr.json``), which needs the trainer's
loss to be a :class:`robustmri.engine.losses.SampleWeightedCrossEntropy`.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from robustmri.engine.losses import SampleWeightedCrossEntropy
from robustmri.engine.distributed import is_main_process
from robustmri.methods import Method
from robustmri.engine.influence_step import InfluenceStep, plot_influence_examples
from robustmri.options import as_flag

METHOD = Method(name="isr", title="ISR: influence-based sample reweighing", order=3,
                families=("noisy images", "noisy labels"), summary="influence_summary.json",
                reference="Van, Carey, Wu, arXiv 2403.10698, Algorithm 1", builds_on=("influence",))

EMPHASES = ("harmful", "helpful")


def isr_weights(scores: torch.Tensor, alpha: float = 2.0, emphasis: str = "helpful") -> torch.Tensor:
    """MinMax-scale scores into [1, alpha].

    ``emphasis="harmful"`` gives alpha to the most harmful sample (the paper's text);
    ``"helpful"`` gives it to the most helpful one (the authors' released code).
    """
    if emphasis not in EMPHASES:
        raise ValueError(f"emphasis must be one of {EMPHASES}, got {emphasis!r}")
    if alpha < 1:
        raise ValueError(f"alpha must be at least 1, got {alpha}")
    oriented = scores if emphasis == "helpful" else -scores
    low, high = oriented.min(), oriented.max()
    if high <= low:
        return torch.ones_like(scores)
    return 1.0 + (alpha - 1.0) * (oriented - low) / (high - low)


def permuted_weights(weights: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The same weights randomly permuted across the samples (seeded): the control without influence signal."""
    generator = torch.Generator().manual_seed(int(seed))
    return weights[torch.randperm(len(weights), generator=generator)]


class ISRHandler(InfluenceStep):
    """Influence-based Sample Reweighing: fixed per-sample weights in [1, alpha] after epoch T_pre.

    ``control=True`` gives the samples the same weights randomly permuted (seeded by ``seed``).
    """

    method = "ISR"

    def __init__(self, loss: SampleWeightedCrossEntropy, *args, alpha: float = 2.0, emphasis: str = "helpful",
                 control: bool = False, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(loss, SampleWeightedCrossEntropy):
            raise TypeError("ISR needs the trainer's loss to be robustmri.engine.losses.SampleWeightedCrossEntropy")
        control = as_flag(control, "control")  # the command line passes --isr_control true as a string
        self.loss, self.alpha, self.emphasis = loss, float(alpha), emphasis
        self.control, self.seed = control, int(seed)
        isr_weights(torch.zeros(2), self.alpha, emphasis)  # validate the options now, not after T_pre epochs

    def apply(self, network: nn.Module, device: torch.device, positions: list[int]) -> dict[str, np.ndarray]:
        weights = isr_weights(self.result.scores, self.alpha, self.emphasis)
        if self.control:
            weights = permuted_weights(weights, self.seed)
        self.loss.set_weights(self.result.ids, weights)
        images = [np.asarray(self.train_data[p]["image"])[0] for p in positions]
        if is_main_process():
            plot_influence_examples(images, None, self.result.scores.numpy(), self.class_names,
                                    self.result.labels.numpy(), os.path.join(self.output_dir, "influence_examples.png"))
        return {"weight": weights.numpy()}

    def extra_summary(self) -> dict:
        """The options used, as isr.json ids."""
        return {"isr_alpha": self.alpha, "isr_emphasis": self.emphasis, "isr_control": self.control,
                "seed": self.seed}

    def describe(self) -> str:
        control = ", randomly permuted (control)" if self.control else ""
        return f"; weights in [1, {self.alpha:g}], emphasis {self.emphasis}{control}"
