"""Channel activity (CASE Sec. V-B, Eq. 10) and classifier-weight similarity (Finer-CAM A.1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from contrastive_saliency.metrics.functional.representation import (
    ClassChannelActivity,
    active_channel_mask,
    channel_activity,
    class_channel_activity,
    classifier_weight_similarity,
    cosine_similarity_matrix,
    pooled_activations,
)


def _activations() -> torch.Tensor:
    """[2, 6, 4, 4] activations with known spatial means per channel."""
    acts = torch.zeros(2, 6, 4, 4, dtype=torch.float64)
    acts[0, 0] = 0.0  # mean 0 → inactive
    acts[0, 1] = 0.001  # mean exactly τ → inactive (strict >)
    acts[0, 2] = 0.0011  # active
    acts[0, 3, :2] = 10.0  # mean 5 → active
    acts[0, 3, 2:] = 0.0
    acts[0, 4, 0, 0] = 5.0  # one hot pixel, mean 5/16 → active
    acts[0, 5, :2] = 4.0  # mean -1 → inactive despite positive pixels
    acts[0, 5, 2:] = -6.0
    acts[1] = 0.5  # all six active
    acts[1, 2] = -0.5
    return acts


def test_channel_activity_closed_form():
    acts = _activations()
    pooled = pooled_activations(acts)
    torch.testing.assert_close(
        pooled[0], torch.tensor([0, 0.001, 0.0011, 5, 5 / 16, -1.0], dtype=torch.float64)
    )
    expected_mask = torch.tensor(
        [[False, False, True, True, True, False], [True, True, False, True, True, True]]
    )
    assert torch.equal(active_channel_mask(acts), expected_mask)
    counts = channel_activity(acts)
    assert counts.dtype == torch.int64
    assert counts.tolist() == [3, 5]
    # τ is a parameter: τ = 1 keeps only the mean-5 channel of the first sample.
    assert channel_activity(acts, tau=1.0).tolist() == [1, 0]
    # [B, C, L] token layout: the same means.
    assert channel_activity(acts.flatten(2)).tolist() == [3, 5]


def test_channel_activity_rejects_wrong_shapes():
    with pytest.raises(ValueError, match=r"\[B, C, h, w\]"):
        channel_activity(torch.zeros(2, 6))


def test_class_channel_activity_means_over_correct_images():
    counts = torch.tensor([3, 5, 10, 7, 1, 4])
    labels = torch.tensor([0, 0, 2, 2, 2, 3])
    correct = torch.tensor([True, True, True, False, True, False])
    result = class_channel_activity(counts, labels, num_classes=5, correct=correct)
    assert result.num_images.tolist() == [2, 0, 2, 0, 0]
    assert result.present.tolist() == [True, False, True, False, False]
    torch.testing.assert_close(result.mean, torch.tensor([4.0, 0, 5.5, 0, 0], dtype=torch.float64))
    assert not result.mean.isnan().any()
    every = class_channel_activity(counts, labels, num_classes=5)
    torch.testing.assert_close(every.mean, torch.tensor([4.0, 0, 6.0, 4.0, 0], dtype=torch.float64))


def test_class_channel_activity_merges_batches():
    counts = torch.tensor([3, 5, 10, 7, 1, 4])
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    correct = torch.tensor([True, False, True, True, True, True])
    whole = class_channel_activity(counts, labels, 3, correct)
    parts = [
        class_channel_activity(counts[s], labels[s], 3, correct[s])
        for s in (slice(0, 2), slice(2, 6))
    ]
    merged = parts[0].merge(parts[1])
    assert isinstance(merged, ClassChannelActivity)
    torch.testing.assert_close(merged.total, whole.total)
    assert torch.equal(merged.num_images, whole.num_images)
    with pytest.raises(ValueError, match="cannot merge"):
        whole.merge(class_channel_activity(counts, labels, 4))


@pytest.mark.parametrize(
    ("labels", "correct", "message"),
    [
        (torch.tensor([0, 3]), None, r"\[0, 3\)"),
        (torch.tensor([0.0, 1.0]), None, "integer"),
        (torch.tensor([0, 1]), torch.tensor([1, 0]), "bool"),
        (torch.tensor([0, 1, 2]), None, r"\[B\]"),
    ],
)
def test_class_channel_activity_errors(labels, correct, message):
    with pytest.raises(ValueError, match=message):
        class_channel_activity(torch.tensor([1, 2]), labels, 3, correct)


def _numpy_curve(weight: np.ndarray, exclude: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    unit = weight / np.linalg.norm(weight, axis=1, keepdims=True)
    similarity = unit @ unit.T
    n = len(weight)
    if exclude:
        rows = np.stack([np.delete(similarity[i], i) for i in range(n)])
    else:
        rows = similarity - np.eye(n)
    ordered = -np.sort(-rows, axis=1)
    return ordered.mean(axis=0), ordered.std(axis=0), ordered


@pytest.mark.parametrize("mode", ["exclude", "zero"])
def test_weight_similarity_matches_numpy(mode):
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(9, 16))
    weight[3] = weight[1] * 2.5 + 0.01 * rng.normal(size=16)  # a near-duplicate class
    result = classifier_weight_similarity(torch.from_numpy(weight), self_similarity=mode)
    curve, std, ordered = _numpy_curve(weight, exclude=mode == "exclude")
    width = 8 if mode == "exclude" else 9
    assert result.curve.shape == (width,)
    assert result.sorted.shape == (9, width)
    np.testing.assert_allclose(result.sorted.numpy(), ordered, atol=1e-12)
    np.testing.assert_allclose(result.curve.numpy(), curve, atol=1e-12)
    np.testing.assert_allclose(result.std.numpy(), std, atol=1e-12)
    assert (result.curve.diff() <= 1e-12).all()  # descending ranks → non-increasing curve
    assert result.sorted[1, 0].item() == pytest.approx(1.0, abs=1e-3)


def test_weight_similarity_closed_forms():
    identity = torch.eye(4)
    result = classifier_weight_similarity(identity)
    torch.testing.assert_close(result.curve, torch.zeros(3))
    torch.testing.assert_close(cosine_similarity_matrix(identity * 3), identity)
    zero_row = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    assert torch.isfinite(classifier_weight_similarity(zero_row).sorted).all()
    with pytest.raises(ValueError, match="N ≥ 2"):
        classifier_weight_similarity(torch.ones(1, 4))
    with pytest.raises(ValueError, match="self_similarity"):
        classifier_weight_similarity(identity, self_similarity="keep")  # type: ignore[arg-type]
