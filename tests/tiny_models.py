"""Tiny networks with closed-form saliency, shared by the method tests."""

from __future__ import annotations

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
