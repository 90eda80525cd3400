"""Pointing games, energy, localisation error, AUPR (sklearn parity) and VAR region scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score
from torchvision.transforms.functional import gaussian_blur

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.metrics.functional.localisation import (
    aupr,
    average_precision,
    boxes_to_masks,
    energy_pointing_game,
    grid_cell_masks,
    grid_pointing_game,
    grid_region_scores,
    localisation_error,
    min_max_normalise,
    pointing_game,
    region_scores,
    relevance_rank_accuracy,
)


def _sklearn_ap(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return float(average_precision_score(labels.numpy().ravel(), scores.numpy().ravel()))


def test_boxes_to_masks_edges_and_clipping():
    boxes = torch.tensor(
        [[1, 2, 4, 3], [-3, -3, 2, 2], [6, 6, 20, 20], [8, 8, 12, 12], [3, 3, 3, 5]]
    )
    masks = boxes_to_masks(boxes, 8, 8)
    expected = torch.zeros(5, 8, 8, dtype=torch.bool)
    expected[0, 2:3, 1:4] = True  # columns x1..x2−1, rows y1..y2−1
    expected[1, 0:2, 0:2] = True  # clipped at the top-left
    expected[2, 6:, 6:] = True  # clipped at the bottom-right
    # [3] lies fully outside, [4] has zero width: both empty.
    assert torch.equal(masks, expected)
    with pytest.raises(ValueError, match=r"\[B, 4\]"):
        boxes_to_masks(torch.zeros(2, 3), 8, 8)


def test_map_equal_to_mask_is_perfect():
    masks = torch.zeros(3, 12, 12, dtype=torch.bool)
    masks[0, 2:5, 3:9] = True
    masks[1, 7:, :4] = True
    masks[2, 0, 0] = True
    maps = masks.float()
    assert torch.equal(pointing_game(maps, masks), torch.ones(3))
    torch.testing.assert_close(energy_pointing_game(maps, masks), torch.ones(3))
    aupr1, aupr0 = aupr(maps, masks)
    torch.testing.assert_close(aupr1, torch.ones(3))
    torch.testing.assert_close(aupr0, torch.ones(3))
    # The inverse map is the worst case: AP equals the positive fraction (one tie group each).
    inv1, _ = aupr(1 - maps, masks)
    torch.testing.assert_close(inv1, masks.flatten(1).float().mean(1))


def test_pointing_game_ties_and_energy_closed_form():
    maps = torch.zeros(3, 4, 4)
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    maps[0, 1, 2] = maps[0, 3, 0] = 5.0  # tie: first in row-major order is (1, 2)
    masks[0, 1, 2] = True
    maps[1, 1, 2] = maps[1, 3, 0] = 5.0
    masks[1, 3, 0] = True  # the later tie does not count
    masks[2, 0, 0] = True  # constant map points at (0, 0)
    assert torch.equal(pointing_game(maps, masks, ties="first"), torch.tensor([1.0, 0.0, 1.0]))
    # Default: the expected hit when the maximum is drawn uniformly among the tied maxima —
    # one of two maxima inside, one of 16 for the constant map, never (0, 0) by position.
    expected = torch.tensor([0.5, 0.5, 1 / 16])
    torch.testing.assert_close(pointing_game(maps, masks), expected)
    assert torch.equal(pointing_game(maps, masks, ties="any"), torch.ones(3))
    energy_maps = torch.tensor([[[3.0, 1.0], [-4.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    energy_masks = torch.tensor([[[True, False], [True, True]], [[True, False], [False, False]]])
    # Negative mass is ignored: 3 / (3 + 1); an all-zero map scores 0 (no NaN).
    torch.testing.assert_close(
        energy_pointing_game(energy_maps, energy_masks), torch.tensor([0.75, 0.0])
    )
    empty = torch.zeros(1, 2, 2, dtype=torch.bool)
    assert energy_pointing_game(torch.rand(1, 2, 2), empty).item() == 0.0
    assert pointing_game(torch.rand(1, 2, 2), empty).item() == 0.0
    with pytest.raises(ValueError, match="bool"):
        pointing_game(maps, masks.float())
    with pytest.raises(ValueError, match="shape"):
        pointing_game(maps, masks[:, :2])
    with pytest.raises(ValueError, match="expected"):
        pointing_game(maps, masks, ties="last")


def test_average_precision_matches_sklearn_with_ties():
    gen = torch.Generator().manual_seed(0)
    b, n = 16, 300
    # Quantised scores give many ties; float64 so both sides sort identical values.
    scores = torch.randint(0, 12, (b, n), generator=gen).double() / 11
    labels = torch.rand(b, n, generator=gen) < torch.linspace(0.02, 0.6, b).view(-1, 1)
    labels[:, 0] = True  # at least one positive per row
    ours = average_precision(scores, labels)
    for i in range(b):
        assert abs(ours[i].item() - _sklearn_ap(scores[i], labels[i])) < 1e-10


def test_aupr_matches_sklearn_per_image():
    gen = torch.Generator().manual_seed(1)
    maps = torch.randn(6, 20, 24, generator=gen, dtype=torch.float64)
    maps[1] = maps[1].round()  # ties
    maps[2] = maps[2].clamp(min=0)  # ReLU'd map: a large tie group at 0
    masks = torch.rand(6, 20, 24, generator=gen) < 0.3
    aupr1, aupr0 = aupr(maps, masks)
    normalised = min_max_normalise(maps)
    for i in range(6):
        assert abs(aupr1[i].item() - _sklearn_ap(normalised[i], masks[i])) < 1e-10
        assert abs(aupr0[i].item() - _sklearn_ap(1 - normalised[i], ~masks[i])) < 1e-10
    assert torch.all(normalised.amin(dim=(1, 2)) == 0) and torch.all(
        normalised.amax(dim=(1, 2)) == 1
    )


def test_aupr_edge_cases_are_defined():
    masks = torch.zeros(3, 6, 6, dtype=torch.bool)
    masks[0, :3] = True  # half
    masks[2] = True  # full
    maps = torch.zeros(3, 6, 6)  # constant maps
    aupr1, aupr0 = aupr(maps, masks)
    # Constant map = one tie group: AP = positive fraction; empty class → 0.
    torch.testing.assert_close(aupr1, torch.tensor([0.5, 0.0, 1.0]))
    torch.testing.assert_close(aupr0, torch.tensor([0.5, 1.0, 0.0]))
    assert not torch.isnan(aupr1).any() and not torch.isnan(aupr0).any()


def test_localisation_error_closed_form():
    maps = torch.zeros(4, 10, 10)
    maps[0, 2:5, 3:7] = 1.0  # box (3, 2, 7, 5), equal to the GT → error 0
    maps[1, 0:5, 0:10] = 1.0  # top half (0, 0, 10, 5) vs GT (0, 0, 10, 10): IoU 0.5
    maps[2, 1, 1] = 1.0  # (1, 1, 2, 2) vs disjoint GT → error 1
    # maps[3]: all-zero → every pixel ≥ mean → whole image vs GT clipped to (0, 0, 10, 5)
    boxes = torch.tensor([[3, 2, 7, 5], [0, 0, 10, 10], [5, 5, 8, 8], [-4, -4, 14, 5]])
    torch.testing.assert_close(localisation_error(maps, boxes), torch.tensor([0.0, 0.5, 1.0, 0.5]))
    # Threshold at the mean: values below the mean leave the box, values at/above stay.
    graded = torch.zeros(1, 10, 10)
    graded[0, 0, 0] = 0.001  # tiny but the mean is 1.0 · 4 / 100 → below
    graded[0, 6:8, 6:8] = 1.0
    torch.testing.assert_close(
        localisation_error(graded, torch.tensor([[6, 6, 8, 8]])), torch.tensor([0.0])
    )
    with pytest.raises(ValueError, match="boxes"):
        localisation_error(maps, boxes[:2])


def test_grid_pointing_game_closed_forms():
    uniform = torch.ones(4, 8, 8)
    cells = torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(grid_pointing_game(uniform, cells), torch.full((4,), 0.25))
    masks = grid_cell_masks(cells, 8, 8)
    assert masks[1, :4, 4:].all() and masks[1].sum() == 16 and masks[2, 4:, :4].all()
    maps = torch.zeros(3, 8, 8)
    maps[0, :4, 4:] = 2.0  # all mass in the top-right cell (index 1)
    maps[0, 4:, 4:] = -9.0  # negative attribution is ignored
    maps[1, 0, 0] = 1e-9  # total ≤ 1e-7 → 0
    maps[2, :4, :4] = 1.0
    maps[2, 4:, 4:] = 3.0
    result = grid_pointing_game(maps, torch.tensor([1, 0, 3]))
    torch.testing.assert_close(result, torch.tensor([1.0, 0.0, 0.75]))
    torch.testing.assert_close(
        grid_pointing_game(torch.ones(1, 9, 9), torch.tensor([4]), grid=3), torch.tensor([1 / 9])
    )
    with pytest.raises(ValueError, match="cell_index"):
        grid_pointing_game(uniform, torch.tensor([0, 1, 2, 4]))


def test_region_scores_closed_forms_and_blur():
    h = w = 32
    cells = torch.tensor([0, 3])
    maps = torch.zeros(2, h, w)
    maps[0, :16, :16] = 1.0  # exactly the target cell
    maps[1, :16, :16] = 1.0  # the wrong cell
    scores = grid_region_scores(maps, cells, blur_kernel=1)  # no blur: exact sets
    torch.testing.assert_close(scores["iou"], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(scores["f1"], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(scores["region_attribution"], torch.tensor([1.0, 0.0]))
    # With the 11×11 blur the mass leaks over the cell edge; RA equals the blurred fraction.
    blurred = gaussian_blur(maps[:1, None].clamp(min=0), [11, 11], [2.0, 2.0])[:, 0]
    masks = grid_cell_masks(cells, h, w)
    expected_ra = (blurred[0] * masks[0]).sum() / blurred[0].sum()
    scores = grid_region_scores(maps, cells)
    torch.testing.assert_close(scores["region_attribution"][0], expected_ra)
    assert 0.8 < scores["region_attribution"][0] < 1.0
    # Support of the blurred map: the cell grown by the kernel radius (5 px) inside the image.
    attributed = 21 * 21
    torch.testing.assert_close(scores["precision"][0], torch.tensor(256 / attributed))
    torch.testing.assert_close(scores["recall"][0], torch.tensor(1.0))
    torch.testing.assert_close(scores["iou"][0], torch.tensor(256 / attributed))
    p, r = 256 / attributed, 1.0
    torch.testing.assert_close(scores["f1"][0], torch.tensor(2 * p * r / (p + r)))


def test_region_scores_edge_cases_are_defined():
    maps = torch.stack([torch.zeros(16, 16), torch.full((16, 16), -1.0), torch.ones(16, 16)])
    masks = torch.zeros(3, 16, 16, dtype=torch.bool)
    masks[0, :8] = True
    masks[1, :8] = True  # masks[2] empty
    scores = region_scores(maps, masks)
    for name, value in scores.items():
        assert not torch.isnan(value).any(), name
    # No positive attribution → every score 0; empty region → RA, recall, IoU, F1 = 0.
    for name in scores:
        assert scores[name][0] == 0 and scores[name][1] == 0
    assert scores["precision"][2] == 0 and scores["iou"][2] == 0 and scores["f1"][2] == 0
    # A uniform map with a half-image region: RA 0.5, everything attributed → IoU 0.5.
    half = region_scores(torch.ones(1, 16, 16), masks[:1])
    torch.testing.assert_close(half["region_attribution"], torch.tensor([0.5]))
    torch.testing.assert_close(half["iou"], torch.tensor([0.5]))
    # threshold = 0.5 keeps only pixels above half the blurred maximum.
    peaked = torch.zeros(1, 16, 16)
    peaked[0, 8, 8] = 1.0
    wide = region_scores(peaked, masks[:1])
    narrow = region_scores(peaked, masks[:1], threshold=0.5)
    assert narrow["recall"] < wide["recall"] or narrow["precision"] >= wide["precision"]
    with pytest.raises(ValueError, match="threshold"):
        region_scores(peaked, masks[:1], threshold=1.5)
    with pytest.raises(ValueError, match="smaller"):
        region_scores(torch.ones(1, 4, 4), torch.ones(1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="odd"):
        region_scores(peaked, masks[:1], blur_kernel=4)


def test_batched_equals_single_and_numpy_free_dtype():
    gen = torch.Generator().manual_seed(3)
    maps = torch.randn(5, 16, 16, generator=gen)
    masks = torch.rand(5, 16, 16, generator=gen) < 0.4
    boxes = torch.tensor(
        [[0, 0, 8, 8], [2, 2, 10, 14], [4, 0, 16, 16], [1, 1, 2, 2], [0, 0, 16, 16]]
    )
    batched = [
        pointing_game(maps, masks),
        energy_pointing_game(maps, masks),
        localisation_error(maps, boxes),
        *aupr(maps, masks),
    ]
    for i in range(5):
        single = [
            pointing_game(maps[i : i + 1], masks[i : i + 1]),
            energy_pointing_game(maps[i : i + 1], masks[i : i + 1]),
            localisation_error(maps[i : i + 1], boxes[i : i + 1]),
            *aupr(maps[i : i + 1], masks[i : i + 1]),
        ]
        for full, one in zip(batched, single, strict=True):
            torch.testing.assert_close(full[i : i + 1], one)
    assert all(value.dtype == torch.float32 for value in batched)
    assert np.isfinite(torch.cat(batched).numpy()).all()


def test_pointing_game_tolerance_is_torchrays_acceptance_disk():
    """Zhang et al. 2018 / TorchRay: a hit when some mask pixel lies strictly closer than the
    tolerance to the maximum (``du² + dv² < t²``). A one-pixel mask at (row 10, col 10) and maxima
    at distances 15 (exactly), 14.87 and 14: with t = 15 the first misses (not < 15), the
    others hit; with t = 0 all miss; the per-pixel definition is checked on random masks."""
    maps = torch.zeros(3, 32, 32)
    maps[0, 10, 25] = 1.0  # distance 15
    maps[1, 20, 21] = 1.0  # sqrt(10² + 11²) = 14.87
    maps[2, 24, 10] = 1.0  # distance 14
    masks = torch.zeros(3, 32, 32, dtype=torch.bool)
    masks[:, 10, 10] = True
    assert pointing_game(maps, masks, tolerance_px=15).tolist() == [0.0, 1.0, 1.0]
    assert pointing_game(maps, masks, tolerance_px=0).tolist() == [0.0, 0.0, 0.0]
    assert pointing_game(maps, masks, tolerance_px=1).tolist() == [0.0, 0.0, 0.0]

    generator = torch.Generator().manual_seed(3)
    random_maps = torch.rand(6, 20, 20, generator=generator)
    random_masks = torch.rand(6, 20, 20, generator=generator) > 0.97
    rows, cols = torch.meshgrid(torch.arange(20.0), torch.arange(20.0), indexing="ij")
    for tolerance in (2, 5):
        expected = []
        for map_, mask in zip(random_maps, random_masks, strict=True):
            peak = divmod(int(map_.argmax()), 20)
            accept = (rows - peak[0]) ** 2 + (cols - peak[1]) ** 2 < tolerance**2
            expected.append(float((accept & mask).any()))
        assert pointing_game(random_maps, random_masks, tolerance_px=tolerance).tolist() == expected
    with pytest.raises(ValueError, match="tolerance_px"):
        pointing_game(maps, masks, tolerance_px=-1)


def test_relevance_rank_accuracy_closed_forms_ties_and_quantus_parity():
    """|top_K(E) ∩ R| / K with K = |R|: the top 4 values on a 4-pixel mask give 1, half of them
    0.5; a constant map scores K / N (every pixel tied at the K-th value); an empty mask 0;
    NaN ranks lowest. Quantus (``RelevanceRankAccuracy``, its defaults) on maps with distinct
    values gives the same numbers (it scores an empty mask NaN and breaks ties by argsort, so
    those cases are checked by the closed forms only)."""
    maps = torch.zeros(4, 6, 6)
    masks = torch.zeros(4, 6, 6, dtype=torch.bool)
    masks[:, 1:3, 1:3] = True  # K = 4
    maps[0, 1:3, 1:3] = torch.tensor([[4.0, 3.0], [2.0, 1.0]])
    maps[1, 1, 1:3] = 5.0
    maps[1, 5, 4:6] = 6.0  # two of the top 4 outside
    maps[2] = 0.7  # constant
    maps[3, 1:3, 1:3] = float("nan")  # NaN inside the mask ranks lowest
    maps[3, 0, :4] = 1.0
    values = relevance_rank_accuracy(maps, masks)
    torch.testing.assert_close(values, torch.tensor([1.0, 0.5, 4 / 36, 0.0]))
    assert relevance_rank_accuracy(maps[:1], torch.zeros(1, 6, 6, dtype=torch.bool)).item() == 0.0

    quantus = pytest.importorskip("quantus")
    rng = np.random.default_rng(1)
    a = rng.normal(size=(5, 1, 12, 12)).astype(np.float32)
    s = (rng.random((5, 1, 12, 12)) > 0.7).astype(np.float32)
    x = rng.random((5, 3, 12, 12)).astype(np.float32)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 12 * 12, 2))
    theirs = quantus.RelevanceRankAccuracy(disable_warnings=True)(
        model=model, x_batch=x, y_batch=np.zeros(5, dtype=int), a_batch=a, s_batch=s, device="cpu"
    )
    ours = relevance_rank_accuracy(torch.from_numpy(a[:, 0]), torch.from_numpy(s[:, 0] > 0))
    np.testing.assert_allclose(ours.numpy(), np.asarray(theirs, dtype=np.float64), rtol=1e-6)


def _blurred_1d_mass(length: int, start: int, stop: int, kernel: int, sigma: float):
    """``(inside, total)`` mass of the 1-D indicator of ``[start, stop)`` after a normalised
    ``kernel``-tap Gaussian with reflect padding (numpy, independent of torchvision)."""
    taps = np.arange(kernel) - kernel // 2
    weights = np.exp(-(taps**2) / (2 * sigma**2))
    weights /= weights.sum()
    signal = np.zeros(length)
    signal[start:stop] = 1.0
    padded = np.pad(signal, kernel // 2, mode="reflect")
    blurred = np.convolve(padded, weights[::-1], mode="valid")
    return blurred[start:stop].sum(), blurred.sum()


def test_registered_grid_region_scores_closed_form_on_every_cell_of_a_grid():
    """VAR App. B.1 through the registered metric on the evaluation's [B, cells, H, W] form:
    each cell's map is its own cell (every score 1 without blur); after the 11×11 blur
    (σ = 2) RA is the separable 1-D mass share squared, and the attributed set is the cell
    grown by the 5-pixel kernel radius inside the image (21×21 for a 16×16 corner cell)."""
    from contrastive_saliency.metrics.registry import create_metric

    size, cell = 32, 16
    masks = grid_cell_masks(torch.arange(4), size, size)
    maps = masks.float().unsqueeze(0)  # one grid, four cells, each map exactly its cell
    index = torch.tensor([7])
    exact = create_metric("grid_region_scores", blur_kernel=1)
    exact.update(**exact.update_arguments(_grid_inputs(maps, index)))
    _, table = exact.per_sample_table()
    for suffix in ("ra", "iou", "precision", "recall", "f1"):
        torch.testing.assert_close(table[f"grid_region_scores_{suffix}"], torch.tensor([1.0]))
    blurred = create_metric("grid_region_scores")  # the paper's 11×11 blur
    blurred.update(**blurred.update_arguments(_grid_inputs(maps, index)))
    _, table = blurred.per_sample_table()
    inside, total = _blurred_1d_mass(size, 0, cell, 11, 2.0)
    expected_ra = torch.tensor([(inside / total) ** 2], dtype=torch.float32)
    torch.testing.assert_close(table["grid_region_scores_ra"], expected_ra)
    precision = cell**2 / 21**2
    torch.testing.assert_close(table["grid_region_scores_precision"], torch.tensor([precision]))
    torch.testing.assert_close(table["grid_region_scores_recall"], torch.tensor([1.0]))
    torch.testing.assert_close(table["grid_region_scores_iou"], torch.tensor([precision]))
    f1 = 2 * precision / (precision + 1)
    torch.testing.assert_close(table["grid_region_scores_f1"], torch.tensor([f1]))
    # Per grid the mean over its cells: cells 0 and 1 swap maps (each lies in the other's
    # cell, 0 everywhere), cells 2 and 3 keep theirs (1): every score 0.5 without blur.
    swapped = maps[:, [1, 0, 2, 3]]
    half = create_metric("grid_region_scores", blur_kernel=1)
    half.update(**half.update_arguments(_grid_inputs(swapped, index)))
    _, table = half.per_sample_table()
    for suffix in ("ra", "iou", "precision", "recall", "f1"):
        torch.testing.assert_close(table[f"grid_region_scores_{suffix}"], torch.tensor([0.5]))


def test_registered_region_scores_read_the_configured_mask():
    from contrastive_saliency.metrics.registry import create_metric, metric_class

    assert metric_class("grid_region_scores").target_kind == "grid"
    assert metric_class("region_scores").needed_keys({"mask_key": "part_mask"}) == ("part_mask",)
    maps = torch.zeros(1, 1, 16, 16)
    maps[0, 0, :4, :4] = 2.0
    part = torch.zeros(1, 16, 16, dtype=torch.bool)
    part[0, :4, :8] = True  # the map covers half of the part and lies wholly inside it
    inputs = _grid_inputs(maps, torch.tensor([3]), batch={"part_mask": part})
    metric = create_metric("region_scores", mask_key="part_mask", blur_kernel=1)
    metric.update(**metric.update_arguments(inputs))
    _, table = metric.per_sample_table()
    expected = {"ra": 1.0, "iou": 0.5, "precision": 1.0, "recall": 0.5, "f1": 2 / 3}
    for suffix, value in expected.items():
        torch.testing.assert_close(table[f"region_scores_{suffix}"], torch.tensor([value]))
    with pytest.raises(ConfigurationError, match="blur_kernel"):
        metric_class("region_scores").check_options({"blur_kernel": 4}, "region_scores")


def _grid_inputs(maps: torch.Tensor, index: torch.Tensor, batch: dict | None = None):
    from contrastive_saliency.metrics.registry import MetricInputs

    images = torch.zeros(maps.shape[0], 3, *maps.shape[-2:])
    return MetricInputs(
        model=None, images=images, maps=maps,
        classes=torch.zeros(maps.shape[:2], dtype=torch.long), logits=None,
        batch={"index": index, **(batch or {})},
    )  # fmt: skip
