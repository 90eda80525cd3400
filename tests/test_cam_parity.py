"""CAM baselines against pytorch-grad-cam on random-init torchvision models, plus edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam import (
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    XGradCAM,
)
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection
from torchvision.models import densenet121, resnet18

from contrastive_saliency.methods import create_method
from contrastive_saliency.methods.gradient_cams import first_component_projection

REFERENCES = {
    "grad_cam": GradCAM,
    "grad_cam_pp": GradCAMPlusPlus,
    "xgrad_cam": XGradCAM,
    "layer_cam": LayerCAM,
    "hires_cam": HiResCAM,
}


@pytest.fixture(scope="module", params=["resnet18", "densenet121"])
def setup(request):
    torch.manual_seed(0)
    if request.param == "resnet18":
        model, layer = resnet18(num_classes=10), "layer4"
    else:
        model, layer = densenet121(num_classes=10), "features.denseblock4"
    model.eval()
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        logits = model(images)
    classes = logits.topk(2, dim=1).indices  # [2, 2]: top-1 and top-2 of each image
    return model, layer, images, classes


def _pytorch_grad_cam_post_processing(low: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """What pytorch-grad-cam does after ``get_cam_image``: ReLU, min-max + cv2 resize, and the
    min-max of its multi-layer aggregation."""
    return scale_cam_image(scale_cam_image(np.maximum(low, 0), size))


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_gradient_cams_match_pytorch_grad_cam(setup, name):
    model, layer, images, classes = setup
    ours = create_method(name, model, layer=layer).compute(images, classes)  # one call, K=2
    size = (images.shape[-1], images.shape[-2])
    with REFERENCES[name](model=model, target_layers=[model.get_submodule(layer)]) as reference:
        for k in range(classes.shape[1]):
            targets = [ClassifierOutputTarget(int(c)) for c in classes[:, k]]
            expected = reference(input_tensor=images, targets=targets)
            got = _pytorch_grad_cam_post_processing(ours[:, k].numpy(), size)
            assert got.max() > 0.5, "a degenerate all-zero comparison proves nothing"
            np.testing.assert_allclose(got, expected, atol=1e-4)
    model.zero_grad(set_to_none=True)  # pytorch-grad-cam leaves parameter gradients behind


def test_eigen_cam_matches_pytorch_grad_cam_up_to_the_documented_sign(setup):
    model, layer, images, classes = setup
    ours = create_method("eigen_cam", model, layer=layer).compute(images, classes)
    captured = {}
    handle = model.get_submodule(layer).register_forward_hook(
        lambda m, i, o: captured.setdefault("a", o.detach())
    )
    with torch.no_grad():
        model(images)
    handle.remove()
    activations = captured["a"]
    signed = first_component_projection(activations)
    reference = get_2d_projection(activations.numpy())  # LAPACK's arbitrary sign
    flips = np.sign((signed.numpy() * reference).sum(axis=(1, 2)))
    assert set(flips) <= {-1.0, 1.0}
    scale = np.abs(reference).max()
    np.testing.assert_allclose(
        signed.numpy() * flips[:, None, None] / scale, reference / scale, atol=1e-4
    )
    # The documented convention: non-negative correlation with the centred channel sum.
    total = activations.sum(dim=1)
    total = total - total.mean(dim=(1, 2), keepdim=True)
    assert ((signed * total).sum(dim=(1, 2)) >= 0).all()
    # Same map for every class, equal to ReLU of the signed projection.
    assert torch.equal(ours[:, 0], ours[:, 1])
    torch.testing.assert_close(ours[:, 0], signed.relu())
    # End to end: pytorch-grad-cam's output equals ours once flipped to its sign.
    size = (images.shape[-1], images.shape[-2])
    with EigenCAM(model=model, target_layers=[model.get_submodule(layer)]) as reference:
        expected = reference(input_tensor=images, targets=None)
    got = _pytorch_grad_cam_post_processing(signed.numpy() * flips[:, None, None], size)
    np.testing.assert_allclose(got, expected, atol=1e-4)


ALL = ["grad_cam", "grad_cam_pp", "xgrad_cam", "layer_cam", "hires_cam", "eigen_cam"]


class ConstantMap(torch.nn.Module):
    """Outputs a constant ``value`` feature map ``[B, 4, h, w]`` (still differentiable)."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x) * 0 + self.value


class ConstantLayerNet(torch.nn.Module):
    """Layer ``features`` outputs a constant map; then ReLU, GAP and linear."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.features = ConstantMap(value)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.features(x).relu().mean(dim=(2, 3)))


@pytest.mark.parametrize("name", ALL)
def test_zero_activations_give_zero_maps_and_constant_ones_are_finite(name):
    torch.manual_seed(0)
    images, classes = torch.randn(2, 3, 8, 8), torch.tensor([[0, 1], [2, 0]])
    zero = create_method(name, ConstantLayerNet(0.0), layer="features")(images, classes)
    assert torch.equal(zero, torch.zeros_like(zero))
    constant = create_method(name, ConstantLayerNet(1.5), layer="features")(images, classes)
    assert torch.isfinite(constant).all()
    if name == "eigen_cam":
        assert torch.equal(constant, torch.zeros_like(constant))


@pytest.mark.parametrize("name", ALL)
def test_batch_rows_and_class_columns_are_independent(name):
    torch.manual_seed(1)
    model = resnet18(num_classes=6).eval()
    images, classes = torch.randn(3, 3, 64, 64), torch.tensor([[0, 5, 2], [1, 1, 3], [4, 0, 2]])
    method = create_method(name, model, layer="layer4")
    together = method(images, classes)
    for b in range(3):
        single = method(images[b : b + 1], classes[b : b + 1])
        torch.testing.assert_close(single[0], together[b], atol=1e-5, rtol=1e-4)
    for k in range(3):
        torch.testing.assert_close(method(images, classes[:, k]), together[:, k : k + 1])
