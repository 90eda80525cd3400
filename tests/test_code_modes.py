"""Modes named after the authors' code reproduce that code, on random-init timm / torchvision
models: Finer-CAM ``weighting="softmax"`` (gradients through the softmax weights, as the
authors' ``FinerWeightedTarget`` + ``loss.backward()``) and VAR ``mode="code"`` (the class
maps of Captum's un-ReLU'd ``LayerGradCam``, which VAR's code wraps).

The references below are written here from the published code's formulas (read, not copied):
a forward hook keeps the layer's output and its gradient, one ``backward`` of the summed
target scores, Grad-CAM weights = spatial mean of the gradient, ``ReLU(Σ_k w_k A_k)``, then
pytorch-grad-cam's ``scale_cam_image`` min-max ``(x − min) / (1e-7 + max(x − min))``.
VAR's code itself is not in the searchable corpus; its test follows the formulas PROTOCOLS.md
and issue 16 state (``softmax(10·|H|)`` over the class set, kept where ``q_c − 1/K′ > τ``,
over Captum's ``LayerGradCam`` maps without ReLU).
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from captum.attr import LayerGradCam

from contrastive_saliency.methods import create_method
from contrastive_saliency.targets import ClassSet, LogitNeighbours

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_CLASSES = 6
SCALE = 300.0


def _resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=NUM_CLASSES).eval()


def _vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=NUM_CLASSES, img_size=64, depth=2
    ).eval()


def _min_max(maps: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's ``scale_cam_image`` without the resize, per map."""
    shifted = maps - maps.amin(dim=(-2, -1), keepdim=True)
    return shifted / (1e-7 + shifted.amax(dim=(-2, -1), keepdim=True))


def _authors_finer_cam(model, layer, images, tokens, detach_weights=False):
    """Finer-CAM's ``FinerCAM.forward`` with ``targets=None``: main class = the argmax, references
    = ranks 1..3 of ``|y − y_main|``; ``S = Σ_t p_t (y_main − α y_t) / (Σ_t p_t + 1e-9)`` with
    ``p = softmax(y)``, α = 1; ``loss = Σ_b S_b``; ``loss.backward()``; Grad-CAM on the layer."""
    stored = {}

    def hook(module, args, output):
        stored["activation"] = output
        output.register_hook(lambda grad: stored.__setitem__("gradient", grad))

    handle = model.get_submodule(layer).register_forward_hook(hook)
    try:
        outputs = model(images)
    finally:
        handle.remove()
    scores = []
    for row in outputs:
        values = row.detach()
        order = (values - values[values.argmax()]).abs().argsort()
        main, references = int(order[0]), order[1:4].tolist()
        probabilities = torch.softmax(row, dim=-1)
        if detach_weights:
            probabilities = probabilities.detach()
        weights = [probabilities[index] for index in references]
        numerator = sum(
            w * (row[main] - 1.0 * row[index]) for w, index in zip(weights, references, strict=True)
        )
        scores.append(numerator / (sum(weights) + 1e-9))
    model.zero_grad()
    sum(scores).backward()
    activation, gradient = stored["activation"].detach(), stored["gradient"]
    if tokens:  # the authors' reshape_transform: drop the class token, tokens → [B, C, h, w]
        side = int((activation.shape[1] - 1) ** 0.5)
        activation, gradient = (
            t[:, 1:, :].reshape(t.shape[0], side, side, t.shape[2]).permute(0, 3, 1, 2)
            for t in (activation, gradient)
        )
    weights = gradient.mean(dim=(2, 3))
    cam = (weights[:, :, None, None] * activation).sum(dim=1).relu()
    return _min_max(cam), outputs.detach().argmax(dim=1)


@pytest.mark.parametrize(
    ("build", "layer", "tokens"),
    [(_resnet18, "layer3", False), (_vit, "blocks.1.norm1", True)],
    ids=["timm-resnet18", "timm-vit"],
)
def test_finer_cam_softmax_weighting_is_the_authors_code(build, layer, tokens):
    model = build()
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    expected, top1 = _authors_finer_cam(model, layer, images, tokens)
    detached, _ = _authors_finer_cam(model, layer, images, tokens, detach_weights=True)
    maps = {}
    for weighting in ("softmax", "softmax_constant"):
        method = create_method(
            "finer_cam", model, layer, weighting=weighting,
            references=LogitNeighbours(3, mode="nearest"),
        )  # fmt: skip
        maps[weighting] = _min_max(method.compute(images, top1[:, None])[:, 0])
    torch.testing.assert_close(maps["softmax"], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(maps["softmax_constant"], detached, atol=1e-5, rtol=0)
    # The two weightings are different maps, so the check above can fail.
    assert (maps["softmax"] - maps["softmax_constant"]).abs().max() > 1e-2


def _var_code_reference(model, images, sets, layer="layer3"):
    """VAR's code over Captum's LayerGradCam (no ReLU): ``H ⊙ q ⊙ 1[q_c − 1/K′ > 0.1]`` with
    ``q = softmax(10·|H|)`` over the class set, maps upsampled bilinearly to the input."""
    grad_cam = LayerGradCam(model, model.get_submodule(layer))
    class_maps = torch.stack(
        [
            torch.cat([grad_cam.attribute(image[None], target=int(c)) for c in row], dim=1)[0]
            for image, row in zip(images, sets, strict=True)
        ]
    )  # [B, K', h, w]; Captum's default relu_attributions=False
    assert (class_maps < 0).any()
    class_maps = F.interpolate(class_maps, size=images.shape[-2:], mode="bilinear")
    q = torch.softmax(10.0 * class_maps.abs(), dim=1)
    keep = q[:, 0] - 1.0 / sets.shape[1] > 0.1
    return class_maps[:, 0] * q[:, 0] * keep


@pytest.mark.parametrize(
    "build",
    [
        _resnet18,
        lambda: torchvision.models.resnet18(num_classes=NUM_CLASSES).eval(),
    ],
    ids=["timm-resnet18", "torchvision-resnet18"],
)
def test_var_code_mode_wraps_the_unrelud_layer_grad_cam(build):
    torch.manual_seed(0)
    model = build().double()  # float64: the sharp softmax would amplify float32 rounding
    with torch.no_grad():  # class maps large enough for the code's fixed sharpening 10
        model.fc.weight.mul_(SCALE)
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, 64, 64, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        logits = model(images)
    order = logits.argsort(dim=1, descending=True, stable=True)
    # Fixed class sets (VAR App. A.1), target first: the 2nd prediction with the 1st, 3rd and
    # 4th; and the least probable class (a strongly negative Grad-CAM here) with the top two.
    for sets in (order[:, [1, 0, 2, 3]], order[:, [-1, 0, 1]]):
        expected = _var_code_reference(model, images, sets)
        maps = {
            relu: create_method(
                "var", model, layer="layer3", base="grad_cam", mode="code",
                class_set=ClassSet.fixed(sets), base_relu=relu,
            )(images, sets[:, 0])[:, 0].double()
            for relu in (None, True)
        }  # fmt: skip
        peak = max(expected.abs().amax(), maps[True].abs().amax())
        assert expected.abs().amax() > 0
        torch.testing.assert_close(maps[None] / peak, expected / peak, atol=1e-5, rtol=0)
    # The least probable class's signed map dominates by |H|; ReLU'd (base_relu=True) it is
    # zero there, so the ReLU'd base gives another map.
    assert (maps[True] - maps[None]).abs().max() > 0.1 * peak
