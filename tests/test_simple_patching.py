"""CAAP's input-level baselines Simple Insertion and Simple Deletion (caap.md App. B.2): on a
linear model both maps have a closed form in the per-patch contributions ``W_y ⊙ (x − x_0)``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.methods import create_method
from tests.test_caap import inputs, small_vit

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE, PATCH, CLASSES = 12, 4, 3  # a 3×3 patch grid


def _linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, CLASSES)).eval()


def _patch_contributions(model: nn.Module, images, blank, classes) -> torch.Tensor:
    """``c_q = Σ_{pixels of patch q} W_y (x − x_0)``, ``[B, K, 3, 3]``."""
    weight = model[1].weight.view(CLASSES, 3, SIZE, SIZE)[classes]  # [B, K, 3, H, W]
    per_pixel = (weight * (images - blank).unsqueeze(1)).sum(dim=2)  # [B, K, H, W]
    return F.avg_pool2d(per_pixel, PATCH) * PATCH**2


@pytest.mark.parametrize("selection", ["none", "box1"])
def test_linear_model_closed_form(selection: str) -> None:
    model = _linear_model()
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, SIZE, SIZE, generator=generator)
    classes = torch.tensor([[0, 2], [1, 0]])
    blank = torch.tensor([0.3, -0.2, 0.5])  # a colour in normalised space
    options = {"selection": selection, "blank": blank, "patch_size": PATCH, "batch_size": 5}
    insertion = create_method("simple_insertion", model, **options).compute(images, classes)
    deletion = create_method("simple_deletion", model, **options).compute(images, classes)
    contributions = _patch_contributions(model, images, blank.view(1, 3, 1, 1), classes)
    if selection == "box1":  # S(p): the 3×3 patch region around p, clipped at the border
        contributions = F.conv2d(
            contributions.flatten(0, 1).unsqueeze(1), torch.ones(1, 1, 3, 3), padding=1
        ).view_as(contributions)
    # deletion: f(x) − f(x with S(p) blank) = Σ_{q ∈ S(p)} c_q
    torch.testing.assert_close(deletion, contributions, atol=1e-5, rtol=1e-5)
    # insertion: f(x_0 with S(p) from x) = f(x_0) + Σ_{q ∈ S(p)} c_q
    with torch.no_grad():
        blank_logits = model(blank.view(1, 3, 1, 1).expand(2, 3, SIZE, SIZE)).gather(1, classes)
    expected = blank_logits[:, :, None, None] + contributions
    torch.testing.assert_close(insertion, expected, atol=1e-5, rtol=1e-5)
    maps = create_method("simple_deletion", model, **options)(images, classes)
    assert maps.shape == (2, 2, SIZE, SIZE)  # upsampled to the image


def test_vit_patch_grid_classes_from_shared_forwards_and_errors() -> None:
    model = small_vit()
    images, classes = inputs(model)
    for name in ("simple_insertion", "simple_deletion"):
        method = create_method(name, model, batch_size=7)
        both = method.compute(images, classes)
        assert both.shape == (2, 2, 4, 4)  # the ViT's 4×4 patch grid
        for k in range(2):
            torch.testing.assert_close(
                both[:, k : k + 1], method.compute(images, classes[:, k : k + 1])
            )
        assert float(both.amax(dim=(2, 3)).sub(both.amin(dim=(2, 3))).min()) > 0
    white = create_method("simple_insertion", model).compute(images, classes)
    noisy = create_method("simple_insertion", model, blank="noisy", noise_seed=2)
    assert (noisy.compute(images, classes) - white).abs().max() > 1e-4
    with pytest.raises(ConfigurationError, match="patch_size"):
        create_method("simple_deletion", _linear_model(), blank="zeros")
    with pytest.raises(ConfigurationError, match="do not split"):
        create_method("simple_deletion", _linear_model(), blank="zeros", patch_size=5).compute(
            torch.zeros(1, 3, SIZE, SIZE), torch.zeros(1, 1, dtype=torch.long)
        )
    with pytest.raises(ConfigurationError, match="selection"):
        create_method("simple_insertion", model, selection="box3")


def test_the_evaluation_gives_the_baselines_the_datas_normalisation() -> None:
    """The white blank is pixel value 1 in the data's normalisation, as for CAAP."""
    from callbacks.evaluation import SaliencyEvaluationCallback

    sample = {"image": torch.zeros(3, 32, 32), "label": 0, "index": 0}
    evaluation = SaliencyEvaluationCallback(
        methods=["simple_insertion", "simple_deletion"], metrics=["deletion_auc"],
        targets=["top1"],
    )  # fmt: skip
    data = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    evaluation.prepare(small_vit(), sample, normalisation=data)
    for combination in evaluation.combinations:
        assert combination.method.normalisation == data
        assert combination.method.blank == "white"
