"""The Mahalanobis abstention score on the network's penultimate features (the product's default).

Sign convention (:mod:`robustmri.abstention`): higher = more out of distribution.

The detector (Lee, Lee, Lee, Shin, "A Simple Unified Framework for Detecting Out-of-Distribution
Samples and Adversarial Attacks", NeurIPS 2018, with features of the final layer only and no input
pre-processing) is a set of class-conditional Gaussians with one shared (tied) covariance fitted
on the features ``f`` that enter the network's final ``nn.Linear`` (found by
:class:`robustmri.influence.FinalLayer`, so any MONAI classifier works) for the *training* split:

- ``mu_c`` = mean feature of the training slices of class ``c``;
- ``Sigma`` = the pooled within-class covariance, ``1/N sum_i (f_i - mu_{y_i})(f_i - mu_{y_i})^T``;
- ridge: ``Sigma + lambda I`` with ``lambda = RIDGE * trace(Sigma) / d`` (:data:`RIDGE` = 1e-3 of the mean
  variance), so that a singular covariance (more features than slices, dead ReLU units) is invertible;
- score(x) = ``min_c (f(x) - mu_c)^T (Sigma + lambda I)^-1 (f(x) - mu_c)``, the squared Mahalanobis
  distance to the nearest class mean (Lee et al.'s confidence score with its sign flipped).

Means, covariance, ridge and precision are computed in float64; the precision is stored as its
Cholesky factor ``W`` (``P = W W^T``), so an exported graph computes ``|| f W - mu_c W ||^2`` with plain
tensor operations that can never be negative (:class:`robustmri.deploy.onnx.ood.ScoredClassifier`).

The threshold (:func:`calibrate_threshold`) is the score quantile that accepts a stated share of
the in-distribution *validation* slices (:data:`TARGET_ACCEPTANCE`, 95 %); the test split is never used.
"""


from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from robustmri.influence.adapter import FinalLayer

#: The detector's name and description, as written into the model's metadata.
DETECTOR_NAME = "mahalanobis_tied_penultimate"
#: Relative ridge on the tied covariance: lambda = RIDGE * trace(Sigma) / d.
RIDGE = 1e-3
#: Default share of in-distribution validation slices the threshold accepts.
TARGET_ACCEPTANCE = 0.95


def describe_detector(ridge: float = RIDGE) -> str:
    """One sentence for the model's metadata: what the score is and its sign."""
    return (f"squared Mahalanobis distance of the penultimate features (input of the final linear layer) to the "
            f"nearest class mean; class-conditional Gaussians with one shared covariance fitted in float64 on the "
            f"training split, ridge {ridge:g} x trace/d on the diagonal (Lee et al., NeurIPS 2018); "
            "higher = more out of distribution; a slice scoring above ood_threshold is not assessable")


@dataclass
class MahalanobisDetector:
    """Class means [C, d] and the Cholesky factor of the ridge-regularised tied precision [d, d], float64."""

    means: np.ndarray
    precision_factor: np.ndarray
    ridge: float
    n_train: int

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, num_classes: int,
            ridge: float = RIDGE) -> MahalanobisDetector:
        """Fit on training features [N, d] and labels [N] (every class must be present)."""
        features = np.asarray(features, dtype=np.float64)
        labels = np.asarray(labels).astype(np.int64).reshape(-1)
        if features.ndim != 2 or len(features) != len(labels) or len(features) == 0:
            raise ValueError(f"expected features [N, d] and labels [N], got {features.shape} and {labels.shape}")
        if not np.isfinite(features).all():
            raise ValueError("training features hold NaN or Inf: the network is not usable for the detector")
        counts = np.bincount(labels, minlength=num_classes)
        if len(counts) != num_classes or (counts == 0).any():
            raise ValueError(f"every class needs training slices for the detector, got counts {counts.tolist()}")
        means = np.stack([features[labels == c].mean(axis=0) for c in range(num_classes)])
        centred = features - means[labels]
        covariance = centred.T @ centred / len(features)
        d = covariance.shape[0]
        scale = float(np.trace(covariance)) / d
        if not scale > 0:
            raise ValueError("the training features do not vary: no covariance to fit the detector on")
        regularised = covariance + ridge * scale * np.eye(d)
        precision = np.linalg.inv(regularised)
        precision = 0.5 * (precision + precision.T)
        factor = np.linalg.cholesky(precision)  # precision = factor @ factor.T
        return cls(means=means, precision_factor=factor, ridge=float(ridge), n_train=int(len(features)))

    def score(self, features: np.ndarray) -> np.ndarray:
        """The OOD score [N] of features [N, d] in float64 (higher = more out of distribution)."""
        projected = np.asarray(features, dtype=np.float64) @ self.precision_factor
        centres = self.means @ self.precision_factor
        return np.square(projected[:, None, :] - centres[None]).sum(-1).min(1)


@torch.no_grad()
def network_outputs(network: nn.Module, images: np.ndarray, batch_size: int = 64,
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(features [N, d], logits [N, C])``, float64, of ``images`` [N, 1, H, W] in one pass through ``FinalLayer``.

    Runs on the network's own device, in eval mode; the scores of :mod:`robustmri.abstention.scores` read
    one or both."""
    adapter = FinalLayer(network)
    adapter.network.eval()
    device = next(adapter.network.parameters()).device
    images = np.asarray(images, dtype=np.float32)
    starts = range(0, len(images), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="detector features", unit="batch")
    features, logits = [], []
    for start in starts:
        batch_features, batch_logits = adapter(torch.from_numpy(images[start:start + batch_size]).to(device))
        features.append(batch_features.double().cpu().numpy())
        logits.append(batch_logits.double().cpu().numpy())
    return np.concatenate(features), np.concatenate(logits)


def extract_features(network: nn.Module, images: np.ndarray, batch_size: int = 64,
                     progress: bool = False) -> np.ndarray:
    """Penultimate features [N, d] (float64) of ``images`` [N, 1, H, W] through ``FinalLayer``."""
    return network_outputs(network, images, batch_size, progress)[0]


def fit_detector(network: nn.Module, images: np.ndarray, labels: np.ndarray, num_classes: int,
                 ridge: float = RIDGE, progress: bool = False) -> MahalanobisDetector:
    """Fit :class:`MahalanobisDetector` on the network's features of the training images [N, 1, H, W]."""
    return MahalanobisDetector.fit(extract_features(network, images, progress=progress), labels, num_classes, ridge)


def calibrate_threshold(scores: np.ndarray, target_acceptance: float = TARGET_ACCEPTANCE) -> tuple[float, float]:
    """``(threshold, acceptance)`` from in-distribution validation scores.

    The threshold is the k-th smallest score with ``k = ceil(target_acceptance * N)``; a slice is
    accepted (assessable) when its score is <= the threshold, so the share of these validation
    slices accepted is ``k / N``, between the target and the target + 1/N (more only with ties).
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not 0.0 < target_acceptance <= 1.0:
        raise ValueError(f"target_acceptance must be in (0, 1], got {target_acceptance}")
    if len(scores) == 0 or not np.isfinite(scores).all():
        raise ValueError(f"validation scores must be a non-empty finite array, got {len(scores)} value(s)")
    k = max(1, math.ceil(target_acceptance * len(scores) - 1e-9))
    threshold = float(np.sort(scores)[k - 1])
    return threshold, float(np.mean(scores <= threshold))
