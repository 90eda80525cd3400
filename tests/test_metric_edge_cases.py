"""Degenerate inputs give defined values, never NaN or a crash (metrics issue, edge cases):
constant maps, all-zero maps, empty masks, boxes outside the image, p = 1 confidence, ties."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from contrastive_saliency.metrics import functional as M

B, H, W, N = 3, 16, 16, 4


class SaturatedModel(nn.Module):
    """Logits ``[60, 0, 0, 0]`` plus a tiny image-dependent term: float32 softmax of class 0
    is exactly 1.0 whatever the input."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(images.shape[0], N)
        logits[:, 0] = 60.0
        return logits + 1e-3 * images.mean(dim=(1, 2, 3))[:, None]


class MeanColourModel(nn.Module):
    """A smooth, non-saturated model: logits are linear in the channel means."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, N)
        with torch.no_grad():
            self.linear.weight.copy_(torch.arange(3 * N, dtype=torch.float32).view(N, 3) / 10)
            self.linear.bias.zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear(images.mean(dim=(2, 3)))


EDGE_MAPS = {
    "constant": torch.full((B, H, W), 0.7),
    "zeros": torch.zeros(B, H, W),
    "negative": -torch.ones(B, H, W),
    "two_level_ties": torch.cat([torch.ones(B, H, W // 2), torch.zeros(B, H, W // 2)], dim=2),
}


def _images() -> torch.Tensor:
    return torch.randn(B, 3, H, W, generator=torch.Generator().manual_seed(0))


def _finite(values: torch.Tensor) -> bool:
    return bool(torch.isfinite(values).all())


@pytest.mark.parametrize("name", sorted(EDGE_MAPS))
def test_map_only_metrics_are_defined_on_degenerate_maps(name: str):
    maps = EDGE_MAPS[name]
    full = torch.ones(B, H, W, dtype=torch.bool)
    empty = torch.zeros(B, H, W, dtype=torch.bool)
    part = torch.zeros(B, H, W, dtype=torch.bool)
    part[:, 4:12, 4:12] = True
    for masks in (full, empty, part):
        for values in (
            M.pointing_game(maps, masks),
            M.pointing_game(maps, masks, ties="any"),
            M.energy_pointing_game(maps, masks),
            M.top_k_intersection(maps, masks, 10),
            *M.aupr(maps, masks),
            *M.region_scores(maps, masks).values(),
        ):
            assert values.shape == (B,) and _finite(values), name
        assert (M.energy_pointing_game(maps, empty) == 0).all()
        assert (M.top_k_intersection(maps, empty, 10) == 0).all()
    cells = torch.tensor([0, 1, 3])
    assert _finite(M.grid_pointing_game(maps, cells))
    assert all(_finite(v) for v in M.grid_region_scores(maps, cells).values())
    boxes = torch.tensor([[2, 2, 9, 9], [-5, -5, -1, -1], [20, 20, 40, 40]])  # in, before, after
    error = M.localisation_error(maps, boxes)
    assert _finite(error) and (error[1:] == 1.0).all()  # boxes outside the image: IoU 0
    agreement = M.feature_agreement(maps, maps.flip(-1))
    assert _finite(agreement) and ((agreement >= 0) & (agreement <= 1)).all()
    # Ties count by their expected overlap: a degenerate map agrees with itself only as much
    # as two independent random tie-breaks of it do (k/N for a map without positive pixels).
    itself = M.feature_agreement(maps, maps.clone())
    k = round(0.05 * H * W)
    expected = {"constant": k / (H * W), "zeros": k / (H * W), "negative": k / (H * W)}
    expected["two_level_ties"] = k / (H * W // 2)  # k of the 128 positive pixels, twice
    torch.testing.assert_close(itself, torch.full((B,), expected[name]))


def test_uniform_positive_maps_have_the_chance_values():
    maps = EDGE_MAPS["constant"]
    cells = torch.tensor([0, 1, 2])
    torch.testing.assert_close(M.grid_pointing_game(maps, cells), torch.full((B,), 0.25))
    part = torch.zeros(B, H, W, dtype=torch.bool)
    part[:, :8] = True
    torch.testing.assert_close(M.energy_pointing_game(maps, part), torch.full((B,), 0.5))
    assert (M.grid_pointing_game(EDGE_MAPS["zeros"], cells) == 0).all()


@pytest.mark.parametrize("name", sorted(EDGE_MAPS))
@pytest.mark.parametrize("model_name", ["saturated", "smooth"])
def test_model_metrics_are_defined_on_degenerate_maps_and_p_equal_one(name, model_name):
    model = SaturatedModel() if model_name == "saturated" else MeanColourModel()
    images, maps = _images(), EDGE_MAPS[name]
    classes = torch.zeros(B, dtype=torch.long)
    references = torch.ones(B, dtype=torch.long)
    indices = torch.arange(B)
    outputs = {
        "confidence_drop": M.confidence_drop(model, images, maps, classes, indices=indices),
        "relative_drop": M.relative_drop(model, images, maps, classes, references, indices=indices),
        "deletion": M.deletion_auc(
            model, images, maps, classes, pixels_per_step=32, indices=indices
        ),
        "insertion": M.curve_auc(
            M.insertion_curve(
                model, images, maps, classes, pixels_per_step=32, blur_kernel=5, indices=indices
            ),
            H * W,
            32,
        ),
        **M.drop_increase_gain(model, images, maps, classes),
    }
    for key, values in outputs.items():
        assert values.shape == (B,) and _finite(values), (key, values)
    if model_name == "saturated":
        assert (M.softmax_scores(model, images)[:, 0] == 1.0).all()  # the p = 1 case is real
        assert (outputs["average_gain"] == 0).all()  # (O − Y) / (1 − Y) with Y = 1 → 0
        assert (outputs["average_drop"] == 0).all()
        assert (outputs["confidence_drop"] == 0).all()
        torch.testing.assert_close(outputs["deletion"], torch.ones(B))
