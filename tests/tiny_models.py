"""Tiny networks with closed-form saliency, shared by the method tests."""

from __future__ import annotations

import torch
from torch import nn


class TinyCAMNet(nn.Module):
    """conv → ReLU → (layer 'features') → global average pool → linear: the CAM architecture,
    where ∂y_c/∂A_k(i, j) = W[c, k] / (h·w)."""

    def __init__(self, channels: int = 6, num_classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


class CountingCNN(nn.Module):
    """conv-BN-ReLU → max-pool → conv-ReLU → mean → linear; counts forward passes (images)."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
            nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(8, num_classes)
        self.images_seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images_seen += x.shape[0]
        return self.head(self.features(x).mean(dim=(2, 3)))
