"""Out-of-distribution abstention in the exported model: the Mahalanobis score of
:mod:`robustmri.abstention.mahalanobis` computed inside the ONNX graph.

Convention, stated once in :mod:`robustmri.abstention`: **the OOD score is higher for inputs further
from the training data**. A slice whose score is above the model's threshold is *not assessable*:
the model cannot vouch for it and it gets no vote. :class:`ScoredClassifier` returns
``(probabilities, score)`` and is what :func:`robustmri.deploy.onnx.export.export_onnx` exports.
A softmax-based score was measured beside it (``scripts/bench_ood.py``) and is not combined.
"""

from __future__ import annotations

import torch
from torch import nn

from robustmri.abstention.mahalanobis import MahalanobisDetector
from robustmri.influence.adapter import FinalLayer

#: Abstention rule: a series with more than this share of not-assessable slices gets no tumour class.
SERIES_MAX_NOT_ASSESSABLE = 0.5


def describe_abstention_rule(max_share: float = SERIES_MAX_NOT_ASSESSABLE) -> str:
    """The abstention rule in words, for the metadata, reports and the SR."""
    return (f"a series with more than {max_share:.0%} of its slices not assessable gets no tumour class "
            "(abstains); otherwise only the assessable slices vote")



class ScoredClassifier(nn.Module):
    """A classifier returning ``(probabilities [N, C], ood_score [N])``: the exported graph.

    The features come from :class:`~robustmri.influence.FinalLayer` (a forward hook on the final
    linear layer during the ordinary forward pass); the detector is held as float32 buffers
    (``projection`` = the precision's Cholesky factor, ``centres`` = the class means projected by it).
    """

    def __init__(self, network: nn.Module, detector: MahalanobisDetector):
        super().__init__()
        self.network = network
        self.final_layer = FinalLayer(network)
        self.register_buffer("projection", torch.as_tensor(detector.precision_factor, dtype=torch.float32))
        self.register_buffer("centres", torch.as_tensor(detector.means @ detector.precision_factor,
                                                        dtype=torch.float32))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, logits = self.final_layer(image)
        projected = features.to(self.projection.dtype) @ self.projection
        score = (projected[:, None, :] - self.centres[None]).square().sum(-1).amin(1)
        return torch.softmax(logits, dim=1), score
