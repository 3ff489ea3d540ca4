"""The paper's small CNN.

Influence is computed on the final linear layer only, so the network offers
``features(x)`` (penultimate activations) and ``classifier`` (that ``nn.Linear``).
"""

from __future__ import annotations

import torch
from torch import nn


class PaperCNN(nn.Module):
    """Five [conv, BatchNorm, ReLU, MaxPool] stages (32, 32, 64, 64, 64 channels) and one linear layer.

    The authors used unpadded 5 x 5 kernels at 256 x 256 (a 4 x 4 x 64 = 1024 feature
    map); ``padding=2`` keeps the map size for smaller inputs (128 x 128 gives 1024 too).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 3, spatial_size: int = 256,
                 channels=(32, 32, 64, 64, 64), kernel_size: int = 5, padding: int = 0):
        super().__init__()
        layers, previous = [], in_channels
        for width in channels:
            layers += [nn.Conv2d(previous, width, kernel_size, padding=padding), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            previous = width
        self.encoder = nn.Sequential(*layers)
        self.feature_dim = self._feature_dim(in_channels, int(spatial_size), kernel_size, padding, len(channels))
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def _feature_dim(self, in_channels: int, size: int, kernel_size: int, padding: int, depth: int) -> int:
        side = size
        for _ in range(depth):
            side = (side + 2 * padding - kernel_size + 1) // 2
            if side < 1:
                hint = "a larger size" if padding >= kernel_size // 2 else f"padding={kernel_size // 2} or a larger size"
                raise ValueError(f"spatial_size {size} is too small for {depth} stages of {kernel_size}x{kernel_size} "
                                 f"convolutions with padding {padding} and 2x2 pooling; use {hint}")
        return self.encoder[-4].out_channels * side * side

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [N, feature_dim], the input of ``classifier``."""
        return torch.flatten(self.encoder(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
