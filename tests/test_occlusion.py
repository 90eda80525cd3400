"""Occlusion: parity with Captum's Occlusion, the closed form of a linear model, K classes and
batches from the same forwards, errors."""

from __future__ import annotations

import pytest
import torch
from captum.attr import Occlusion as CaptumOcclusion
from torch import nn

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.methods import create_method
from tests.tiny_models import CountingCNN

pytestmark = pytest.mark.usefixtures("one_thread")


def _model() -> CountingCNN:
    torch.manual_seed(0)
    return CountingCNN().eval()


@pytest.mark.parametrize(
    ("window", "stride", "baseline"),
    [
        (5, 3, 0.0),  # the last window of each row/column is cut off by the border (16 = 12 + 4)
        ((4, 6), (2, 5), 0.5),  # non-square; horizontal windows overlap by one column
        (16, 1, "tensor"),  # one window covering the image; a per-image tensor baseline
    ],
)
def test_parity_with_captum(window, stride, baseline):
    """Captum ``Occlusion`` over all colour channels gives our map in every channel."""
    model = _model()
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    if baseline == "tensor":
        baseline = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    classes = torch.tensor([[0, 3], [2, 2], [4, 1]])
    method = create_method(
        "occlusion", model, window=window, stride=stride, baseline=baseline, batch_size=7
    )
    maps = method(images, classes)
    window_hw = (window, window) if isinstance(window, int) else window
    stride_hw = (stride, stride) if isinstance(stride, int) else stride
    captum = CaptumOcclusion(model)
    for k in range(2):
        reference = captum.attribute(
            images, sliding_window_shapes=(3, *window_hw), strides=(3, *stride_hw),
            baselines=baseline, target=classes[:, k],
        )  # fmt: skip
        assert reference.abs().max() > 1e-3
        for channel in range(3):
            torch.testing.assert_close(maps[:, k], reference[:, channel], rtol=1e-5, atol=1e-6)


def test_linear_model_closed_form():
    """For ``f(x) = Σ w·x + b`` the drop of window w is ``Σ_{q∈w} Σ_c w_cq (x_cq − x'_cq)``, so the
    map is the mean of the covering windows' contributions; with window = stride = 1 it is the
    pixel's own contribution ``Σ_c w_c (x_c − x'_c)``."""
    torch.manual_seed(0)
    size = 7
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * size * size, 4)).eval()
    images = torch.randn(2, 3, size, size, dtype=torch.float64)
    model.double()
    classes = torch.tensor([[1, 3], [0, 2]])
    weights = model[1].weight.detach().view(4, 3, size, size)
    contribution = torch.einsum("kchw,bchw->bkhw", weights, images - 0.25)[
        torch.arange(2)[:, None], classes
    ]  # [B, K, H, W]
    pixelwise = create_method("occlusion", model, window=1, stride=1, baseline=0.25)
    torch.testing.assert_close(pixelwise(images, classes), contribution.float())
    window, stride = 3, 2  # windows start at 0, 2, 4 and cover 0–2, 2–4, 4–6
    expected = torch.zeros_like(contribution)
    count = torch.zeros(size, size, dtype=torch.float64)
    for top in range(0, size - window + 1, stride):
        for left in range(0, size - window + 1, stride):
            region = (slice(top, top + window), slice(left, left + window))
            drop = contribution[:, :, region[0], region[1]].sum(dim=(2, 3))
            expected[:, :, region[0], region[1]] += drop[:, :, None, None]
            count[region] += 1
    method = create_method("occlusion", model, window=window, stride=stride, baseline=0.25)
    torch.testing.assert_close(method(images, classes), (expected / count).float())


def test_all_classes_come_from_one_set_of_forwards_and_batches_do_not_matter():
    model = _model()
    images = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    classes = torch.tensor([[0, 1, 2], [3, 4, 0], [1, 1, 2], [4, 3, 2]])
    method = create_method("occlusion", model, window=4, stride=4, batch_size=5)
    model.train()
    maps = method(images, classes)
    assert model.training  # the mode is restored
    assert model.images_seen == 4 + 4 * 9  # the images once, then 9 windows × 4 images
    assert maps.shape == (4, 3, 12, 12) and maps.dtype == torch.float32
    one_class = create_method("occlusion", model, window=4, stride=4, batch_size=64)
    for b in range(4):
        for k in range(3):
            single = one_class(images[b : b + 1], classes[b : b + 1, k])
            torch.testing.assert_close(single[0, 0], maps[b, k], rtol=1e-5, atol=1e-6)


def test_errors():
    model = _model()
    images = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ConfigurationError, match=r"window 9 exceeds the image height 8"):
        create_method("occlusion", model, window=9)(images, torch.tensor([0]))
    with pytest.raises(ConfigurationError, match=r"stride 5 exceeds the window 4 along the width"):
        create_method("occlusion", model, window=4, stride=(2, 5))
    with pytest.raises(ConfigurationError, match=r"window must be a positive integer or a pair"):
        create_method("occlusion", model, window=0)
    with pytest.raises(ConfigurationError, match=r"does not broadcast to the images' shape"):
        create_method("occlusion", model, window=4, stride=4, baseline=torch.zeros(2, 8, 8))(
            images, torch.tensor([0])
        )
    with pytest.raises(ConfigurationError, match=r"batch_size .* positive integer, got 0"):
        create_method("occlusion", model, batch_size=0)
    with pytest.raises(ConfigurationError, match=r"class indices must lie in \[0, 4\]"):
        create_method("occlusion", model, window=4, stride=4)(images, torch.tensor([7]))
