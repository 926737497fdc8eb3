"""A small CNN for scikit-learn's 8x8 digits: the plain ``nn.Module`` path (``model.kind: module``).

Use it with ``model.factory: "fedtune.models.cnn:digits_cnn"``.
"""

from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """conv(1->c) -> conv(c->2c) -> 2x2 max-pool -> linear(hidden) -> linear(classes).

    Accepts ``(B, 1, 8, 8)``, ``(B, 8, 8)`` or flat ``(B, 64)`` input: the digits data set stores images
    flattened, and reshaping here saves every data source from caring.
    """

    def __init__(self, channels: int = 16, hidden: int = 64, num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * channels * 4 * 4, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.reshape(-1, 1, 8, 8)))


def digits_cnn(channels: int = 16, hidden: int = 64, num_classes: int = 10, dropout: float = 0.0) -> DigitsCNN:
    """Factory for ``model.factory`` (keyword arguments come from ``model.factory_kwargs``)."""
    return DigitsCNN(channels=channels, hidden=hidden, num_classes=num_classes, dropout=dropout)
