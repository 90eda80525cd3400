"""The default classifier of the embedded benchmark: a small VGG-style CNN with a GAP head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _conv_block(in_channels: int, out_channels: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Conv stages → GAP → linear. The first stage has one conv (full resolution is expensive),
    later stages two; a 2× max-pool opens every stage but the first and the last, whose convs
    are dilated by 2 instead (the receptive field grows as if it were pooled, the resolution
    does not). With the default four stages a 64×64 input gives a 16×16 map at ``features.3``,
    the default saliency layer, fine enough to resolve the benchmark's mark (a pooled last
    stage gave 8×8, where no map could). Global average pooling followed by one linear layer
    makes Grad-CAM equal to CAM up to scale, which the tests use as a closed form.
    """

    def __init__(
        self, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64, 96), in_channels: int = 3
    ) -> None:
        super().__init__()
        stages: list[nn.Module] = []
        previous = in_channels
        last = len(widths) - 1
        for i, width in enumerate(widths):
            blocks: list[nn.Module] = [_conv_block(previous, width)]
            if 0 < i < last:
                blocks = [nn.MaxPool2d(2), *blocks, _conv_block(width, width)]
            elif i == last > 0:
                # nn.Identity where the pool was keeps the layer paths of a pooled stage
                # (features.3.1, features.3.2.0, ...) that configs and studies name.
                dilated = [_conv_block(previous, width, 2), _conv_block(width, width, 2)]
                blocks = [nn.Identity(), *dilated]
            stages.append(nn.Sequential(*blocks))
            previous = width
        self.features = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(previous, num_classes)
        self.num_classes = num_classes
        self.default_saliency_layer = f"features.{len(widths) - 1}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))
