"""CUDA gives the CPU's answers: every registered method and the model-querying metrics.

Marked ``gpu``: skipped without CUDA (conftest), so CI never runs them; run with
``uv run pytest -m gpu`` on a machine with a GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from saliency.methods import create_method, list_methods
from saliency.metrics import functional as M
from saliency.targets import ConfusionContrast, LogitNeighbours

NUM_CLASSES = 6


class SmallReLUNet(nn.Module):
    """Conv net with nn.ReLU modules (guided backprop) and a named CAM layer."""

    default_saliency_layer = "features.3"

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 12, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(12, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def method_kwargs(name: str) -> dict:
    """Arguments each method needs beyond defaults; random draws kept on the CPU generator."""
    matrix = torch.rand(NUM_CLASSES, NUM_CLASSES, generator=torch.Generator().manual_seed(1))
    return {
        "case": {"contrast": ConfusionContrast(matrix, k=2)},
        "finer_cam": {"references": LogitNeighbours(2)},
        "integrated_gradients": {"steps": 8},
        "smoothgrad": {"n_samples": 4},
        "rise": {"n_masks": 64, "grid_size": 4, "batch_size": 50},
        "score_cam": {"batch_size": 7},
        "ablation_cam": {"batch_size": 7},
        "finer_score_cam": {"batch_size": 7},
        "cluscam": {"num_clusters": 4, "batch_size": 7},
    }.get(name, {})


VIT_ONLY = ("caap", "attention_rollout")  # timm VisionTransformer models only


def device_maps(device: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = SmallReLUNet().to(device)
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2)).to(device)
    classes = torch.tensor([[0, 3], [1, 2], [5, 4]], device=device)
    masks = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(3)) > 0.5
    # the batch fields reference maps read (the random map: the same noise on every device)
    fields = {"part_mask": masks, "mask": ~masks, "index": torch.tensor([7, 0, 123456789012])}
    maps = {}
    for name in list_methods():
        if name in VIT_ONLY:
            continue
        method = create_method(name, model, **method_kwargs(name))
        wanted = {k: fields[k].to(device) for k in getattr(method, "batch_fields", ())}
        maps[name] = method(images, classes, **wanted).cpu()
    return maps


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4) -> bool:
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-12)
    return bool((a - b).abs().max().item() <= rtol * scale)


@pytest.mark.gpu
def test_every_method_on_cuda_equals_cpu():
    cpu, cuda = device_maps("cpu"), device_maps("cuda")
    mismatched = []
    for name, expected in cpu.items():
        if name == "smoothgrad":
            continue  # its noise comes from a device generator: compared with sigma 0 below
        if not _close(cuda[name], expected):
            mismatched.append(name)
    assert not mismatched, f"CUDA maps differ from CPU maps for {mismatched}"


@pytest.mark.gpu
def test_vit_methods_on_cuda_equal_cpu():
    import timm

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=NUM_CLASSES, img_size=32,
        patch_size=8, depth=3,
    ).eval()  # fmt: skip
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    classes = torch.tensor([[0, 3], [1, 2]])
    for name in VIT_ONLY:
        maps = {}
        for device in ("cpu", "cuda"):
            net = copy.deepcopy(model).to(device)
            maps[device] = create_method(name, net)(images.to(device), classes.to(device)).cpu()
        assert _close(maps["cuda"], maps["cpu"]), name


@pytest.mark.gpu
def test_smoothgrad_without_noise_on_cuda_equals_cpu():
    torch.manual_seed(0)
    model = SmallReLUNet()
    images = torch.randn(2, 3, 16, 16)
    classes = torch.tensor([1, 4])
    maps = {}
    for device in ("cpu", "cuda"):
        net = copy.deepcopy(model).to(device)
        method = create_method("smoothgrad", net, n_samples=3, sigma=0.0)
        maps[device] = method(images.to(device), classes.to(device)).cpu()
    assert _close(maps["cuda"], maps["cpu"])


@pytest.mark.gpu
def test_model_metrics_on_cuda_equal_cpu():
    torch.manual_seed(0)
    model = SmallReLUNet()
    images = torch.randn(4, 3, 16, 16)
    # Three tie levels: the index-keyed tie-breaking must be the same on both devices.
    maps = (torch.rand(4, 16, 16) * 3).floor()
    classes = torch.tensor([0, 1, 2, 3])
    references = torch.tensor([1, 2, 3, 4])
    indices = torch.tensor([3, 70, 2**33 + 1, 0])

    def compute(device: str) -> dict[str, torch.Tensor]:
        net = copy.deepcopy(model).to(device)
        x, e, c, r, i = (t.to(device) for t in (images, maps, classes, references, indices))
        return {
            "deletion": M.deletion_auc(net, x, e, c, pixels_per_step=16, batch_size=7, indices=i),
            "insertion": M.insertion_curve(
                net, x, e, c, pixels_per_step=16, blur_kernel=5, indices=i
            ),
            "confidence_drop": M.confidence_drop(net, x, e, c, indices=i),
            "relative_drop": M.relative_drop(net, x, e, c, r, indices=i),
            **M.drop_increase_gain(net, x, e, c),
            "agreement": M.feature_agreement(e, e.flip(-1)),
            "sparse_agreement": M.feature_agreement(e - 1.5, e.flip(-1) - 1.5),
            "top_k_intersection": M.top_k_intersection(e, e > 1.5, 13),
            "mask": M.mask_top_pixels(x, e, 0.2, indices=i),
        }

    cpu, cuda = compute("cpu"), compute("cuda")
    for key in cpu:
        torch.testing.assert_close(cuda[key].cpu(), cpu[key], rtol=1e-4, atol=1e-5, msg=key)
