"""CASE (Alg. 1) against a direct NumPy computation; contrast sensitivity; invariances."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.methods import create_method
from contrastive_saliency.targets import ConfusionContrast, ExplicitReferences, LogitNeighbours

NUM_CLASSES = 5


class TwoStageNet(nn.Module):
    """conv → ReLU (layer 'features') → conv → ReLU → GAP → linear: spatially varying
    gradients, so the 'full' and 'weights' projections differ."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.rest = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, NUM_CLASSES)

    def after_layer(self, features):
        return self.head(self.rest(features).mean(dim=(2, 3)))

    def forward(self, x):
        return self.after_layer(self.features(x))


COUNTS = np.array(
    [
        [40, 6, 1, 3, 0],
        [5, 30, 2, 0, 9],
        [0, 1, 20, 8, 4],
        [2, 7, 3, 25, 1],
        [9, 0, 4, 2, 33],
    ]
)


@pytest.fixture
def net():
    torch.manual_seed(0)
    return TwoStageNet()


def _numpy_case(net, images, targets, contrasts, projection, eps):
    """Alg. 1 for each image and target, gradients from plain autograd, algebra in NumPy."""
    features = net.features(images).detach().requires_grad_(True)
    logits = net.after_layer(features)
    grads = np.stack(
        [
            torch.autograd.grad(logits[:, c].sum(), features, retain_graph=True)[0].numpy()
            for c in range(NUM_CLASSES)
        ],
        axis=1,
    )  # [B, N, C, h, w]
    activations = features.detach().numpy()
    maps = np.zeros((images.shape[0], targets.shape[1], *activations.shape[2:]))
    for b in range(images.shape[0]):
        for k in range(targets.shape[1]):
            gamma_u = grads[b, targets[b, k]]
            gamma_bar = np.mean([grads[b, v] for v in contrasts[b, k]], axis=0)  # lines 5–10
            if projection == "weights":
                gamma_u, gamma_bar = gamma_u.mean(axis=(1, 2)), gamma_bar.mean(axis=(1, 2))
            coefficient = np.sum(gamma_u * gamma_bar) / (np.sum(gamma_bar**2) + eps)  # line 11
            orthogonal = gamma_u - coefficient * gamma_bar
            weights = orthogonal if projection == "weights" else orthogonal.mean(axis=(1, 2))
            maps[b, k] = np.maximum(np.tensordot(weights, activations[b], axes=1), 0)  # line 12
    return maps


@pytest.mark.parametrize("projection", ["full", "weights"])
@pytest.mark.parametrize("k", [1, 3])
def test_case_matches_numpy_algorithm_1(net, projection, k):
    images = torch.randn(3, 3, 7, 7)
    targets = torch.tensor([[0, 1], [4, 2], [3, 3]])
    selector = ConfusionContrast(COUNTS, k=k)
    method = create_method("case", net, layer="features", contrast=selector, projection=projection)
    maps = method(images, targets)
    contrasts = selector(None, targets.flatten()).view(3, 2, k).numpy()
    expected = _numpy_case(net, images, targets.numpy(), contrasts, projection, method.eps)
    assert maps.shape == (3, 2, 7, 7) and expected.max() > 0
    np.testing.assert_allclose(maps.numpy(), expected, atol=1e-6, rtol=1e-4)


def test_full_and_weights_projections_differ_and_default_is_the_paper(net):
    images, targets = torch.randn(2, 3, 7, 7), torch.tensor([0, 4])
    contrast = ConfusionContrast(COUNTS, k=3)
    full = create_method("case", net, layer="features", contrast=contrast)
    assert full.projection == "full"
    weights = create_method("case", net, layer="features", contrast=contrast, projection="weights")
    assert (full(images, targets) - weights(images, targets)).abs().max() > 1e-4


def test_top1_map_changes_with_the_contrast_class(net):
    images = torch.randn(2, 3, 7, 7)
    top1 = net(images).argmax(dim=1)
    maps = []
    for other in (1, 2):  # confusion matrices whose top contrast for every class differs
        counts = np.eye(NUM_CLASSES) * 10
        for c in range(NUM_CLASSES):
            counts[c, (c + other) % NUM_CLASSES] = 5
        maps.append(create_method("case", net, "features", contrast=ConfusionContrast(counts, 1)))
    first, second = (method(images, top1) for method in maps)
    assert (first - second).abs().amax(dim=(1, 2, 3)).min() > 1e-4
    # And CASE differs from Grad-CAM (the projection removes something).
    grad_cam = create_method("grad_cam", net, layer="features")(images, top1)
    assert (first - grad_cam).abs().max() > 1e-4


def test_one_forward_and_one_gradient_request_for_targets_and_contrasts(net, monkeypatch):
    import contrastive_saliency.methods._contrastive as contrastive

    requests = []
    original = contrastive.class_gradients

    def spy(model, images, layer, classes):
        captured = original(model, images, layer, classes)
        requests.append(captured.classes)  # the request as resolved after the forward
        return captured

    monkeypatch.setattr(contrastive, "class_gradients", spy)
    forwards = []
    net.register_forward_pre_hook(lambda module, args: forwards.append(1))
    method = create_method("case", net, "features", contrast=ConfusionContrast(COUNTS, k=2))
    method(torch.randn(2, 3, 7, 7), torch.tensor([[0, 1], [2, 3]]))
    assert len(forwards) == 1 and len(requests) == 1
    assert requests[0].tolist() == [[0, 1, 1, 3, 4, 0], [2, 3, 3, 4, 1, 2]]
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("projection", ["full", "weights"])
def test_batch_rows_and_class_columns_are_independent(net, projection):
    images = torch.randn(3, 3, 7, 7)
    classes = torch.tensor([[0, 2, 4], [1, 1, 3], [4, 0, 2]])
    method = create_method(
        "case", net, "features", contrast=ConfusionContrast(COUNTS, 2), projection=projection
    )
    together = method(images, classes)
    for b in range(3):
        torch.testing.assert_close(method(images[b : b + 1], classes[b : b + 1])[0], together[b])
    for k in range(3):
        torch.testing.assert_close(method(images, classes[:, k]), together[:, k : k + 1])


def test_logit_based_contrast_and_errors(net):
    maps = create_method("case", net, "features", contrast=LogitNeighbours(2))(
        torch.randn(2, 3, 7, 7), torch.tensor([0, 1])
    )
    assert maps.shape == (2, 1, 7, 7) and torch.isfinite(maps).all()
    with pytest.raises(ConfigurationError, match=r"contrast=ConfusionContrast"):
        create_method("case", net, "features")
    with pytest.raises(ConfigurationError, match=r"'full' \(paper\) or 'weights'"):
        create_method("case", net, "features", contrast=LogitNeighbours(1), projection="both")
    with pytest.raises(ConfigurationError, match=r"built for 4 classes but the model outputs 5"):
        create_method("case", net, "features", contrast=ConfusionContrast(np.eye(4), 1))(
            torch.randn(1, 3, 7, 7), torch.tensor([0])
        )


@pytest.mark.parametrize("projection", ["full", "weights"])
def test_fewer_contrasts_average_the_valid_ones_and_none_is_grad_cam(net, projection):
    """``fallback="none"``: γ̄ (Eq. 4) is the mean over the contrasts the matrix gave; a target
    the model never confused gets γ̄ = 0, i.e. Grad-CAM."""
    counts = np.diag([40, 30, 20, 25, 33])
    counts[0, 3], counts[0, 1], counts[2, 4] = 5, 2, 7  # class 0: two confusions, 2: one
    images, targets = torch.randn(3, 3, 7, 7), torch.tensor([[0, 2], [1, 0], [2, 1]])
    padded = ConfusionContrast(counts, k=3, fallback="none")
    assert padded(None, targets.reshape(-1)).tolist() == [
        [3, 1, -1], [4, -1, -1], [-1, -1, -1], [3, 1, -1], [4, -1, -1], [-1, -1, -1],
    ]  # fmt: skip
    maps = create_method("case", net, "features", contrast=padded, projection=projection)(
        images, targets
    )
    valid = {0: [3, 1], 2: [4]}  # each target's confusions, the only contrasts used
    expected = torch.stack(
        [
            torch.cat(
                [
                    create_method(
                        "case", net, "features", projection=projection,
                        contrast=ExplicitReferences([valid[int(target)]]),
                    )(images[b : b + 1], target.view(1))[0]
                    if int(target) in valid
                    else torch.zeros(1, 7, 7)
                    for target in targets[b]
                ]
            )
            for b in range(3)
        ]
    )  # fmt: skip
    grad_cam = create_method("grad_cam", net, layer="features")(images, targets)
    never_confused = targets == 1
    torch.testing.assert_close(maps[~never_confused], expected[~never_confused])
    torch.testing.assert_close(maps[never_confused], grad_cam[never_confused])
    assert (maps[~never_confused] - grad_cam[~never_confused]).abs().max() > 1e-4


def test_finer_cam_refuses_empty_reference_slots(net):
    padded = ConfusionContrast(np.diag([4, 3, 2, 5, 3]), k=2, fallback="none")
    with pytest.raises(ConfigurationError, match=r"empty.*fallback: top_predictions"):
        create_method("finer_cam", net, "features", references=padded)(
            torch.randn(1, 3, 7, 7), torch.tensor([0])
        )
