"""Reference maps as methods (oracle_part, oracle_object, random, edge) in closed form, the
batch-field contract of methods, and VAR over a reference map."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats
from skimage.filters import sobel

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.index_random import index_uniform, random_other_classes
from contrastive_saliency.methods import create_method
from tests.tiny_models import TinyCAMNet

B, H, W = 3, 20, 24


def _images(seed: int = 0) -> torch.Tensor:
    return torch.rand(B, 3, H, W, generator=torch.Generator().manual_seed(seed))


def test_oracle_maps_are_the_masks_for_every_class():
    images = _images()
    part = torch.zeros(B, H, W, dtype=torch.bool)
    part[:, 4:7, 5:9] = True
    part[1] = False  # an empty mark gives an all-zero map
    objects = torch.zeros(B, 2, H, W, dtype=torch.bool)  # per-object masks: their union
    objects[:, 0, 2:10, 2:10] = True
    objects[:, 1, 12:18, 15:20] = True
    classes = torch.tensor([[0, 1], [2, 3], [1, 0]])
    maps = create_method("oracle_part", TinyCAMNet())(images, classes, part_mask=part)
    assert maps.shape == (B, 2, H, W) and maps.dtype == torch.float32
    assert torch.equal(maps, part[:, None].float().expand(-1, 2, -1, -1))
    maps = create_method("oracle_object", None)(images, classes, mask=objects)
    assert torch.equal(maps[:, 1], objects.any(dim=1).float())


def test_random_map_is_a_function_of_the_sample_index_only():
    method = create_method("random", None)
    index = torch.tensor([3, 7, 1])
    first = method(_images(0), torch.tensor([0, 1, 2]), index=index)
    # other images, other classes, another batch composition and order: the same noise
    again = method(_images(1)[:2], torch.tensor([[5, 4], [2, 2]]), index=torch.tensor([1, 3]))
    assert torch.equal(again[0, 0], first[2, 0]) and torch.equal(again[1, 1], first[0, 0])
    assert torch.equal(again[0, 0], again[0, 1])  # class-agnostic
    assert not torch.equal(first[0, 0], first[1, 0])
    other_seed = create_method("random", None, seed=1)(
        _images(0), torch.zeros(B, dtype=torch.long), index=index
    )
    assert not torch.equal(other_seed, first)

    many = index_uniform(torch.arange(400), (32, 32))  # 409 600 values
    assert float(many.min()) >= 0.0 and float(many.max()) < 1.0
    assert scipy_stats.kstest(many[:, ::7, ::5].flatten().numpy(), "uniform").pvalue > 1e-3
    neighbours = torch.corrcoef(torch.stack([many[:-1].flatten(), many[1:].flatten()]))[0, 1]
    assert abs(float(neighbours)) < 0.01  # consecutive indices are uncorrelated
    pixels = torch.corrcoef(torch.stack([many[:, :, :-1].flatten(), many[:, :, 1:].flatten()]))
    assert abs(float(pixels[0, 1])) < 0.01  # so are neighbouring pixels


def test_random_other_class_is_uniform_over_the_other_classes_and_seeded_by_index():
    indices = torch.arange(6000)
    excluded = indices % 5
    drawn = random_other_classes(indices, excluded, 5)
    assert not bool((drawn == excluded).any())
    counts = torch.bincount(drawn[excluded == 2], minlength=5).numpy()
    assert counts[2] == 0
    assert scipy_stats.chisquare(counts[[0, 1, 3, 4]]).pvalue > 1e-3
    shuffled = torch.randperm(6000, generator=torch.Generator().manual_seed(0))[:50]
    assert torch.equal(random_other_classes(shuffled, excluded[shuffled], 5), drawn[shuffled])


def test_edge_is_the_sobel_magnitude_of_skimage_combined_over_channels():
    images = _images()
    images[0, :, :, 12:] += 0.5  # a strong vertical edge
    maps = create_method("edge", None)(images, torch.tensor([[0, 3]] * B))
    expected = np.stack(
        [
            np.sqrt(sum(sobel(images[b, c].double().numpy()) ** 2 for c in range(3)))
            for b in range(B)
        ]
    )
    np.testing.assert_allclose(maps[:, 0].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(maps[:, 0], maps[:, 1])
    # on the normalised image with the datamodule's std: exactly the pixel image's edges
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    normalised = (images - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    unnormalised = create_method("edge", None, std=std.tolist())(
        normalised, torch.zeros(B, dtype=torch.long)
    )
    np.testing.assert_allclose(unnormalised[:, 0].numpy(), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigurationError, match="std must be positive"):
        create_method("edge", None, std=[0.2, 0.0, 0.3])


def test_batch_fields_are_checked_by_name():
    images, classes = _images(), torch.zeros(B, dtype=torch.long)
    with pytest.raises(ConfigurationError, match=r"'oracle_part' reads the batch field\(s\) "):
        create_method("oracle_part", None)(images, classes)
    with pytest.raises(ConfigurationError, match="'grad_cam' reads no batch field; got mask"):
        create_method("grad_cam", TinyCAMNet(), layer="features")(
            images, classes, mask=torch.ones(B, H, W)
        )
    with pytest.raises(ConfigurationError, match="one row per image"):
        create_method("random", None)(images, classes, index=torch.arange(B + 1))


def test_var_refuses_a_reference_map_as_base():
    """Every class of C' would get the same map (q = 1/K' everywhere), so VAR over a reference
    map is 0 at every pixel: it is refused as a class-agnostic base."""
    for name in ("oracle_part", "oracle_object", "random", "edge"):
        with pytest.raises(ConfigurationError, match=rf"var base '{name}' is class-agnostic"):
            create_method("var", TinyCAMNet(), base=name)
