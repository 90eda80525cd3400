"""Metric classes over the sanity-check and representation functionals: per-sample values
equal the functionals', repeated indices count once, per-class means are right."""

from __future__ import annotations

import torch

from contrastive_saliency.metrics import ChannelActivity, MapSimilarity
from contrastive_saliency.metrics import functional as F


def test_map_similarity_matches_functionals_and_deduplicates():
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(6, 24, 24, generator=generator)
    b = a + 0.3 * torch.rand(6, 24, 24, generator=generator)
    index = torch.arange(6)
    metric = MapSimilarity()
    metric.update(a[:4], b[:4], index[:4])
    metric.update(a[3:], b[3:], index[3:])  # sample 3 twice, as DistributedSampler pads
    indices, table = metric.per_sample_table()
    assert indices.tolist() == list(range(6))
    expected = {
        "spearman": F.spearman_similarity(a, b),
        "spearman_abs": F.spearman_similarity(a, b, absolute=True),
        "ssim": F.ssim_similarity(a, b),
        "hog": F.hog_similarity(a, b),
    }
    for name, values in expected.items():
        torch.testing.assert_close(table[name], values.float(), msg=name)
    summary = metric.compute()
    assert summary["ssim/count"] == 6
    torch.testing.assert_close(
        summary["spearman/mean"].float(), expected["spearman"].float().mean()
    )


def test_channel_activity_per_class_means_over_correct_images():
    activations = torch.zeros(5, 4, 3, 3)
    activations[0, :3] = 1.0  # 3 active channels, class 0
    activations[1, :1] = 1.0  # 1 active, class 0
    activations[2, :4] = 1.0  # 4 active, class 1, but wrongly predicted
    activations[3, :2] = 1.0  # 2 active, class 1
    activations[4, 0] = 0.0005  # below τ = 0.001: 0 active, class 2
    labels = torch.tensor([0, 0, 1, 1, 2])
    correct = torch.tensor([True, True, False, True, True])
    metric = ChannelActivity(num_classes=4)
    metric.update(activations, labels, torch.arange(5), correct)
    metric.update(activations[:2], labels[:2], torch.arange(2), correct[:2])  # duplicates
    result = metric.compute()
    assert result["active_channels/count"] == 4
    torch.testing.assert_close(
        result["active_channels/class_mean"],
        torch.tensor([2.0, 2.0, 0.0, 0.0], dtype=torch.float64),
    )
    assert result["active_channels/class_count"].tolist() == [2, 1, 1, 0]
    assert not any(key.startswith("label/") for key in result)


def test_top_k_intersection_class_matches_functional():
    generator = torch.Generator().manual_seed(1)
    maps = torch.rand(4, 16, 16, generator=generator)
    masks = torch.rand(4, 16, 16, generator=generator) > 0.6
    from contrastive_saliency.metrics import TopKIntersection

    metric = TopKIntersection(k=20)
    metric.update(maps, masks, torch.tensor([3, 1, 2, 0]))
    indices, values = metric.per_sample()
    expected = F.top_k_intersection(maps, masks, 20)[torch.tensor([3, 1, 2, 0]).argsort()]
    assert indices.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(values, expected)


def test_pic_class_matches_functional_and_skips_invalid_images():
    from torch import nn

    from contrastive_saliency.metrics import PerformanceInformationCurves

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(3, 3, 24, 24, generator=generator) * 2 - 1
    maps = (torch.rand(3, 24, 24, generator=generator) * 5).floor()  # ties at the quantiles
    classes = torch.tensor([0, 1, 2])
    index = torch.tensor([5, 6, 7])
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    metric = PerformanceInformationCurves(mean, std, min_confidence=0.0, batch_size=7, seed=10)
    metric.update(model, images, maps, classes, index)
    masks = torch.cat([F.random_pixel_masks(1, 24, 24, seed=10 + i) for i in (5, 6, 7)])
    expected = F.pic_curves(
        model, images, maps, classes, mean=mean, std=std, random_masks=masks, min_confidence=0.0,
        indices=index,
    )  # fmt: skip
    _, table = metric.per_sample_table()
    torch.testing.assert_close(table["sic_auc"], expected.sic_auc.float(), atol=1e-5, rtol=0)
    assert torch.equal(table["sic_valid"].bool(), expected.sic_valid)
    summary = metric.compute()
    assert summary["sic_auc/count"] + summary["sic_auc/skipped"] == 3
