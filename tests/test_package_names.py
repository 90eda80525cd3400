"""The core's import name is our own: PAIR's ``saliency`` library (the reference of the PIC
metric) installs beside it, and ``import saliency`` means PAIR's package (issue 18 item 4)."""

from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def test_import_saliency_is_pairs_package_not_ours():
    import saliency

    import contrastive_saliency

    assert not (REPO / "saliency").exists(), "the core package must not be called saliency"
    assert Path(saliency.__file__).resolve().parent.parent.name == "site-packages"
    assert hasattr(saliency, "core"), "PAIR's saliency exposes saliency.core"
    assert Path(contrastive_saliency.__file__).resolve().parent == REPO / "contrastive_saliency"


def test_pair_vanilla_gradient_equals_our_saliency_method():
    """Both packages in one process on one model: PAIR's GradientSaliency (gradient of the
    class score w.r.t. the input, unsigned) and our ``saliency`` method before its channel
    reduction agree; the maps are compared after the same |·| max over channels."""
    import numpy as np
    import saliency.core as pair

    from contrastive_saliency.methods import create_method

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 8 * 8, 5),
    ).eval()
    image = torch.randn(1, 3, 8, 8)
    target = 3

    def call_model(x, call_model_args=None, expected_keys=None):
        batch = (
            torch.tensor(np.asarray(x), dtype=torch.float32)
            .permute(0, 3, 1, 2)
            .requires_grad_(True)
        )
        score = model(batch)[:, target].sum()
        (gradient,) = torch.autograd.grad(score, batch)
        return {pair.INPUT_OUTPUT_GRADIENTS: gradient.permute(0, 2, 3, 1).numpy()}

    theirs = pair.GradientSaliency().GetMask(image[0].permute(1, 2, 0).numpy(), call_model)
    ours = create_method("saliency", model).attributions(image, torch.tensor([[target]]))
    np.testing.assert_allclose(ours[0, 0].permute(1, 2, 0).numpy(), theirs, rtol=1e-5, atol=1e-6)
