"""Out-of-distribution abstention in the exported model: the abstention state's score
(:mod:`robustmri.abstention.scores`; the product's is the Mahalanobis score of
:mod:`robustmri.abstention.mahalanobis`) computed inside the ONNX graph.

Convention, stated once in :mod:`robustmri.abstention`: **the OOD score is higher for inputs further
from the training data**. A slice whose score is above the model's threshold is *not assessable*:
the model cannot vouch for it and it gets no vote. :class:`ScoredClassifier` returns
``(probabilities, score)`` and is what :func:`robustmri.deploy.onnx.export.export_onnx` exports.
Which score: the abstention state's (:func:`graph_score` builds it from the state's name and arrays).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from robustmri.abstention.mahalanobis import MahalanobisDetector
from robustmri.abstention.scores import SCORES, CdfGate, CdfMean, gate_cut, score_by_name
from robustmri.influence.adapter import FinalLayer

#: Abstention rule: a series with more than this share of not-assessable slices gets no tumour class.
SERIES_MAX_NOT_ASSESSABLE = 0.5


def describe_abstention_rule(max_share: float = SERIES_MAX_NOT_ASSESSABLE) -> str:
    """The abstention rule in words, for the metadata, reports and the SR."""
    return (f"a series with more than {max_share:.0%} of its slices not assessable gets no tumour class "
            "(abstains); otherwise only the assessable slices vote")



class MahalanobisGraph(nn.Module):
    """:class:`~robustmri.abstention.mahalanobis.MahalanobisDetector` as float32 buffers (``projection`` = the
    precision's Cholesky factor, ``centres`` = the class means projected by it): ``|| f W - mu_c W ||^2``, never
    negative, minimum over the classes."""

    def __init__(self, detector: MahalanobisDetector):
        super().__init__()
        self.register_buffer("projection", torch.as_tensor(detector.precision_factor, dtype=torch.float32))
        self.register_buffer("centres", torch.as_tensor(detector.means @ detector.precision_factor,
                                                        dtype=torch.float32))

    def forward(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        projected = features.to(self.projection.dtype) @ self.projection
        return (projected[:, None, :] - self.centres[None]).square().sum(-1).amin(1)


class MaxSoftmaxGraph(nn.Module):
    """``1 - max_c softmax(logits)_c`` (:class:`robustmri.abstention.scores.MaxSoftmax`)."""

    def forward(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return 1.0 - torch.softmax(logits, dim=1).amax(1)


class EnergyGraph(nn.Module):
    """``-logsumexp_c(logits_c)`` (:class:`robustmri.abstention.scores.Energy`)."""

    def forward(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return -torch.logsumexp(logits, dim=1)


class CdfMeanGraph(nn.Module):
    """The mean of the components' empirical CDFs (:class:`robustmri.abstention.scores.CdfMean`): each CDF is the
    share of its reference scores (a float32 buffer) at or below the slice's score. With ``gate_level``, the
    gated ranking of :class:`robustmri.abstention.scores.CdfGate` instead: ``1 + F_gate`` where the gate score is
    above its cut (:func:`~robustmri.abstention.scores.gate_cut` at ``gate_level``), else ``F_rank`` (components
    ``(gate, rank)``)."""

    def __init__(self, components: list[nn.Module], references: list, gate_level: float | None = None):
        super().__init__()
        self.components = nn.ModuleList(components)
        for index, reference in enumerate(references):
            self.register_buffer(f"reference_{index}", torch.as_tensor(reference, dtype=torch.float32).reshape(-1))
        # the gated ranking compares the raw gate score with its cut (robustmri.abstention.scores.gate_cut)
        self.gated = gate_level is not None
        if self.gated:
            self.register_buffer("gate_cut", torch.tensor(gate_cut(references[0], gate_level), dtype=torch.float32))

    def forward(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        cdfs, values = [], []
        for index, component in enumerate(self.components):
            reference = getattr(self, f"reference_{index}")
            value = component(features, logits)
            values.append(value)
            cdfs.append((reference[None, :] <= value[:, None]).to(value.dtype).mean(1))
        if self.gated:
            return torch.where(values[0] > self.gate_cut, 1.0 + cdfs[0], cdfs[1])
        return torch.stack(cdfs).mean(0)


def _component_graph(name: str, arrays: dict) -> nn.Module:
    if name == "mahalanobis":
        return MahalanobisGraph(MahalanobisDetector(means=np.asarray(arrays["means"], np.float64),
                                                    precision_factor=np.asarray(arrays["precision_factor"], np.float64),
                                                    ridge=0.0, n_train=0))
    if name == "max_softmax":
        return MaxSoftmaxGraph()
    if name == "energy":
        return EnergyGraph()
    raise ValueError(f"abstention score {name!r} has no ONNX graph; valid names: {', '.join(SCORES)}")


def graph_score(name: str, arrays: dict) -> nn.Module:
    """The abstention score called ``name`` with its fitted ``arrays`` (an abstention state's) as graph operations:
    ``(features [N, d], logits [N, C]) -> score [N]``, float32, the same sign (higher = less assessable)."""
    strategy = score_by_name(name)
    if isinstance(strategy, CdfMean):
        components, references = [], []
        for component in strategy.components:
            prefix = f"{component.name}."
            own = {key[len(prefix):]: value for key, value in arrays.items() if key.startswith(prefix)}
            references.append(own.pop("cdf_reference"))
            components.append(_component_graph(component.name, own))
        return CdfMeanGraph(components, references, strategy.level if isinstance(strategy, CdfGate) else None)
    return _component_graph(name, arrays)


class ScoredClassifier(nn.Module):
    """A classifier returning ``(probabilities [N, C], ood_score [N])``: the exported graph.

    The features come from :class:`~robustmri.influence.FinalLayer` (a forward hook on the final linear layer
    during the ordinary forward pass), the logits from the same pass; ``score`` is a
    :class:`~robustmri.abstention.mahalanobis.MahalanobisDetector` or any :func:`graph_score`.
    """

    def __init__(self, network: nn.Module, score: MahalanobisDetector | nn.Module):
        super().__init__()
        self.network = network
        self.final_layer = FinalLayer(network)
        self.score = MahalanobisGraph(score) if isinstance(score, MahalanobisDetector) else score

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, logits = self.final_layer(image)
        return torch.softmax(logits, dim=1), self.score(features, logits)
