"""A small ViT for the embedded 64² benchmark, registered in timm as ``vit_convstem_shapes``.

timm's :class:`~timm.models.vision_transformer.VisionTransformer` (class token, pre-norm blocks,
a linear head on the class token) whose patch embedding is a convolutional stem instead of one
strided ``patch × patch`` convolution ("Early convolutions help transformers see better", Xiao
et al. 2021): ``log2(patch_size)`` 3×3 stride-2 conv + BatchNorm + ReLU stages, then a 1×1
projection to the embedding width. The token layout is timm's own (``patch_embed.grid_size``,
``num_prefix_tokens``, class token first), so every ViT method of this project, CAAP and the
linear probe's ``cls`` / ``mean_patch`` pooling see an ordinary timm ViT. A linear patch
embedding trained from scratch on 5000 64² images barely learns the benchmark (val top-1 0.18
after 8 epochs); the stem gives the tokens local features from the start.
"""

from __future__ import annotations

import math
from typing import Any

from timm.layers import PatchEmbed
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from contrastive_saliency.errors import ConfigurationError

MODEL_NAME = "vit_convstem_shapes"


class ConvStemPatchEmbed(PatchEmbed):
    """timm's ``PatchEmbed`` (same attributes, input checks and output layout) whose ``proj`` is
    a stack of 3×3 stride-2 convolutions with total stride ``patch_size`` and a 1×1 projection.

    Stage widths double from ``embed_dim / 2**stages`` (at least 16) up to ``embed_dim / 2``.
    """

    def __init__(
        self, img_size: Any = 224, patch_size: Any = 16, in_chans: int = 3, embed_dim: int = 768,
        **kwargs: Any,
    ) -> None:  # fmt: skip
        super().__init__(img_size, patch_size, in_chans, embed_dim, **kwargs)
        height, width = self.patch_size
        stages = round(math.log2(height))
        if height != width or 2**stages != height or stages < 1:
            raise ConfigurationError(
                f"{MODEL_NAME} needs a square power-of-two patch_size >= 2 (its stem halves the "
                f"resolution per stage), got {self.patch_size}; e.g. patch_size: 8"
            )
        layers: list[nn.Module] = []
        previous = in_chans
        for stage in range(stages):
            width = max(16, embed_dim // 2 ** (stages - stage))
            layers += [
                nn.Conv2d(previous, width, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            previous = width
        layers.append(nn.Conv2d(previous, embed_dim, 1))
        self.proj = nn.Sequential(*layers)


@register_model
def vit_convstem_shapes(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """64² input, 8×8 patches from the conv stem (an 8×8 token grid), width 192, 3 heads, 6
    blocks (vit_tiny's width); every argument can be overridden (``backbone_kwargs``)."""
    if pretrained:
        raise ConfigurationError(
            f"{MODEL_NAME} has no pretrained weights: train it (configs/model/"
            f"vit_tiny_shapes.yaml) and pass weights_path"
        )
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)  # timm.create_model's registry arguments
    arguments = {
        "img_size": 64, "patch_size": 8, "embed_dim": 192, "depth": 6, "num_heads": 3,
        "embed_layer": ConvStemPatchEmbed,
    }  # fmt: skip
    arguments.update(kwargs)
    return VisionTransformer(**arguments)
