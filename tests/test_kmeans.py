"""Batched k-means++ (contrastive_saliency.kmeans): determinism, batching, recovery, scikit-learn parity."""

from __future__ import annotations

import pytest
import torch

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.kmeans import inertia, kmeans, kmeans_plus_plus, nearest_centres

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-9) -> None:
    """Element-wise ``|actual − expected| <= atol`` (torch.testing imports torch.distributed,
    seconds of start-up on a busy machine)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    error = float((actual - expected).abs().max()) if actual.numel() else 0.0
    assert error <= atol, f"max |difference| {error} > {atol}"


def blobs(centres: torch.Tensor, per_cluster: int, spread: float, seed: int) -> torch.Tensor:
    """``[k·per_cluster, D]`` points, cluster by cluster, around ``centres`` ``[k, D]``."""
    generator = torch.Generator().manual_seed(seed)
    noise = spread * torch.randn(
        centres.shape[0], per_cluster, centres.shape[1], generator=generator
    )
    return (centres[:, None, :] + noise).reshape(-1, centres.shape[1]).double()


def test_deterministic_under_a_seed_and_seed_matters():
    points = torch.rand(2, 200, 3, generator=torch.Generator().manual_seed(1))
    first = kmeans(points, 8, seed=5)
    again = kmeans(points, 8, seed=5)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    # A generator is consumed like the int seed it was made from.
    from_generator = kmeans(points, 8, seed=torch.Generator().manual_seed(5))
    assert torch.equal(first[0], from_generator[0])
    # Uniform data have many local optima: another seed gives other seeds.
    seeds_5 = kmeans(points, 8, iterations=0, seed=5)[1]
    seeds_6 = kmeans(points, 8, iterations=0, seed=6)[1]
    assert not torch.equal(seeds_5, seeds_6)


def test_batched_rows_equal_single_row_runs():
    points = torch.randn(4, 150, 6, generator=torch.Generator().manual_seed(2))
    points[2] *= 10  # rows of very different scale converge at different iterations
    assignments, centres = kmeans(points, 7, seed=3, tol=1e-3)
    for row in range(points.shape[0]):
        alone_assignments, alone_centres = kmeans(points[row : row + 1], 7, seed=3, tol=1e-3)
        assert torch.equal(alone_assignments[0], assignments[row])
        assert_close(alone_centres[0], centres[row], atol=1e-5)


def test_recovers_well_separated_clusters_in_every_row():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0], [5.0, 20.0]])
    rows, truths = [], []
    for seed in range(3):
        permutation = torch.randperm(100, generator=torch.Generator().manual_seed(seed))
        rows.append(blobs(centres, 20, 0.5, seed)[permutation])
        truths.append(torch.arange(5).repeat_interleave(20)[permutation])
    assignments, found = kmeans(torch.stack(rows), 5, seed=0)
    for row, truth in enumerate(truths):
        # The partition equals the truth up to renaming: a bijection between labels.
        pairs = set(zip(truth.tolist(), assignments[row].tolist(), strict=True))
        assert len(pairs) == 5 and len({b for _, b in pairs}) == 5
        for true_label, label in pairs:
            members = rows[row][truth == true_label]
            assert_close(found[row, label], members.mean(dim=0))


def test_inertia_matches_scikit_learn():
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    centres = torch.tensor([[0.0, 0.0, 0.0], [6.0, 0.0, 1.0], [0.0, 6.0, 2.0], [6.0, 6.0, 3.0]])
    points = blobs(centres, 50, 1.0, seed=4)
    assignments, found = kmeans(points[None], 4, seed=0)
    reference = sklearn_cluster.KMeans(4, init="k-means++", n_init=10, random_state=0)
    reference.fit(points.numpy())
    ours = float(inertia(points[None], assignments, found)[0])
    assert ours == pytest.approx(reference.inertia_, rel=1e-9)


def test_converged_result_is_a_lloyd_fixed_point():
    points = torch.randn(3, 120, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assignments, centres = kmeans(points, 6, seed=1, tol=0.0)
    nearest, _ = nearest_centres(points, centres)
    assert torch.equal(nearest, assignments)
    one_hot = torch.nn.functional.one_hot(assignments, 6).double()
    means = one_hot.transpose(1, 2) @ points / one_hot.sum(dim=1)[..., None]
    assert_close(centres, means)


def test_seeding_draws_distinct_points_and_exhausts_them_when_k_equals_n():
    points = torch.randn(2, 9, 2, generator=torch.Generator().manual_seed(0))
    seeds = kmeans_plus_plus(points, 9, torch.Generator().manual_seed(0))
    for row in range(2):
        matches = (seeds[row][:, None, :] == points[row][None]).all(dim=2)  # [k, N]
        assert torch.equal(matches.sum(dim=0), torch.ones(9, dtype=torch.long))
    assignments, _ = kmeans(points, 9, seed=0)
    assert torch.equal(assignments.sort(dim=1).values, torch.arange(9).expand(2, -1))


def test_duplicate_points_leave_clusters_empty_deterministically():
    values = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    points = values[torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])][None]  # 3 distinct points
    assignments, centres = kmeans(points, 5, seed=0)
    again = kmeans(points, 5, seed=0)
    assert torch.equal(assignments, again[0]) and torch.equal(centres, again[1])
    assert torch.isfinite(centres).all()
    assert float(inertia(points, assignments, centres)[0]) == 0.0
    assert assignments.unique().numel() == 3  # only 3 groups can be non-empty
    # Every centre is one of the points (empty clusters keep a duplicate seed).
    assert ((centres[0][:, None, :] == values[None]).all(dim=2)).any(dim=1).all()


def test_invalid_arguments_are_named():
    points = torch.zeros(1, 4, 2)
    with pytest.raises(ConfigurationError, match=r"k must be an int in \[1, N\] = \[1, 4\]"):
        kmeans(points, 5)
    with pytest.raises(ConfigurationError, match=r"\[B, N, D\]"):
        kmeans(torch.zeros(4, 2), 2)
    with pytest.raises(ConfigurationError, match="NaN"):
        kmeans(torch.full((1, 4, 2), float("nan")), 2)
