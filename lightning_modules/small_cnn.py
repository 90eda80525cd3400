"""The default classifier of the embedded benchmark: a small VGG-style CNN with a GAP head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Conv stages with a 2× max-pool before every stage but the first → GAP → linear.

    The first stage has one conv (full resolution is expensive), later stages two. With the
    default four stages a 64×64 input gives an 8×8 map at ``features.3``, the default saliency
    layer. Global average pooling followed by one linear layer makes Grad-CAM equal to CAM up
    to scale, which the tests use as a closed form.
    """

    def __init__(
        self, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64, 96), in_channels: int = 3
    ) -> None:
        super().__init__()
        stages: list[nn.Module] = []
        previous = in_channels
        for i, width in enumerate(widths):
            blocks: list[nn.Module] = [_conv_block(previous, width)]
            if i > 0:
                blocks = [nn.MaxPool2d(2), *blocks, _conv_block(width, width)]
            stages.append(nn.Sequential(*blocks))
            previous = width
        self.features = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(previous, num_classes)
        self.num_classes = num_classes
        self.default_saliency_layer = f"features.{len(widths) - 1}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))
