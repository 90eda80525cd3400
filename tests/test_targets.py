"""Contrast / reference-class selectors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.targets import PADDING, ConfusionContrast, LogitNeighbours, TopPredictions

COUNTS = np.array(
    [
        [50, 1, 9, 0],  # class 0 is confused most with 2, then 1
        [2, 10, 3, 5],  # class 1: 3, then 2, then 0
        [0, 0, 0, 0],  # class 2 never occurs in validation
        [7, 1, 1, 90],  # class 3: 0, then 1 and 2 tied (lower index first)
    ]
)


def test_confusion_contrast_takes_the_top_off_diagonal_entries_of_the_target_row():
    selector = ConfusionContrast(COUNTS, k=2)
    contrasts = selector(None, torch.tensor([0, 1, 3, 0]))
    assert contrasts.tolist() == [[2, 1], [3, 2], [0, 1], [2, 1]]
    assert contrasts.dtype == torch.long
    # Rows normalised per true class, diagonal zeroed; an empty row stays zero (no NaN).
    torch.testing.assert_close(selector.matrix[1], torch.tensor([0.1, 0.0, 0.15, 0.25]).double())
    assert torch.equal(selector.matrix[2], torch.zeros(4, dtype=torch.float64))
    assert selector.contrasts_from_matrix(torch.tensor([0, 1, 2, 3])).tolist() == [2, 2, 0, 2]
    # Tied confusions (class 3: classes 1 and 2, one image each) go to the image's higher
    # logit, without logits to the lower index.
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 2.0, 1.0, 3.0]])
    assert selector(logits, torch.tensor([3, 3])).tolist() == [[0, 2], [0, 1]]


def test_confusion_contrast_never_returns_an_unconfused_class():
    """A diagonal matrix (an accurate model): no class was ever confused, so every contrast is
    the fallback's — the image's highest-logit other classes — or an empty slot."""
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0, 4.0], [9.0, 1.0, 7.0, 8.0, 0.0]])
    targets = torch.tensor([4, 0])
    diagonal = ConfusionContrast(np.diag([10, 20, 30, 40, 50]), k=3)
    assert diagonal.contrasts_from_matrix(targets).tolist() == [0, 0]
    assert diagonal(logits, targets).tolist() == [[1, 3, 0], [3, 2, 1]]
    padded = ConfusionContrast(np.diag([10, 20, 30, 40, 50]), k=3, fallback="none")
    assert padded(logits, targets).tolist() == [[PADDING] * 3] * 2
    # One confusion (4 → 2, class 2 has the image's LOWEST logit): it comes first, then the
    # highest-logit others, never a zero-confusion class by index and never class 2 twice.
    counts = np.diag([10, 20, 30, 40, 50])
    counts[4, 2] = 1
    one = ConfusionContrast(counts, k=3)
    assert one(logits[:1], targets[:1]).tolist() == [[2, 1, 3]]
    assert one.contrasts_from_matrix(targets[:1]).tolist() == [1]
    short = ConfusionContrast(counts, k=3, fallback="none")
    assert short(logits[:1], targets[:1]).tolist() == [[2, PADDING, PADDING]]
    assert short(None, targets[:1]).tolist() == [[2, PADDING, PADDING]]  # no logits needed
    with pytest.raises(ConfigurationError, match=r"only 1 confused.*without logits"):
        one(None, targets[:1])


def test_confusion_contrast_reads_the_files_train_py_writes(tmp_path):
    np.save(tmp_path / "confusion_matrix.npy", COUNTS)
    names = ["a", "b", "c", "d"]
    frame = pd.DataFrame(COUNTS, index=names, columns=names)
    frame.index.name = "true\\predicted"
    frame.to_csv(tmp_path / "confusion_matrix.csv")
    targets = torch.tensor([0, 1, 3])
    expected = ConfusionContrast(COUNTS, k=1)(None, targets)
    for suffix in ("npy", "csv"):
        path = tmp_path / f"confusion_matrix.{suffix}"
        assert torch.equal(ConfusionContrast(path, k=1)(None, targets), expected)
        assert torch.equal(ConfusionContrast(str(path), k=1)(None, targets), expected)
    assert torch.equal(ConfusionContrast(torch.tensor(COUNTS), k=1)(None, targets), expected)


def test_confusion_contrast_errors(tmp_path):
    missing = tmp_path / "nope" / "confusion_matrix.npy"
    with pytest.raises(FileNotFoundError, match=r"nope/confusion_matrix\.npy.*train\.py"):
        ConfusionContrast(missing, k=1)
    with pytest.raises(ConfigurationError, match=r"k=4 .* 4 classes.*k <= 3"):
        ConfusionContrast(COUNTS, k=4)
    with pytest.raises(ConfigurationError, match=r"square \[N, N\].*\(4, 3\)"):
        ConfusionContrast(COUNTS[:, :3], k=1)
    with pytest.raises(ConfigurationError, match=r"positive integer, got 0"):
        ConfusionContrast(COUNTS, k=0)
    with pytest.raises(ConfigurationError, match=r"'top_predictions'.*'none'.*'random'"):
        ConfusionContrast(COUNTS, k=1, fallback="random")
    with pytest.raises(ConfigurationError, match=r"\[0, 3\].*max 4"):
        ConfusionContrast(COUNTS, k=1)(None, torch.tensor([4]))
    with pytest.raises(ConfigurationError, match=r"4 classes but the model outputs 5"):
        ConfusionContrast(COUNTS, k=1)(torch.zeros(1, 5), torch.tensor([0]))
    (tmp_path / "m.txt").write_text("1")
    with pytest.raises(ConfigurationError, match=r"\.npy or \.csv"):
        ConfusionContrast(tmp_path / "m.txt", k=1)


LOGITS = torch.tensor([[5.0, 4.0, 1.0, 4.5, -3.0], [0.0, 2.0, 2.5, 1.0, 1.9]])


def test_logit_neighbours_rank_below_the_target_as_finer_cam_table_2():
    # LOGITS row 0 ranks classes 0 > 3 > 1 > 2 > 4, row 1 ranks 2 > 1 > 4 > 3 > 0.
    # A top-1 target: the 2nd, 3rd, 4th predictions in both modes (Table 2).
    for mode in ("below", "nearest"):
        neighbours = LogitNeighbours(k=3, mode=mode)(LOGITS, torch.tensor([0, 2]))
        assert neighbours.tolist() == [[3, 1, 2], [1, 4, 3]], mode
    # A target that is not the top-1: the classes ranked just below it, never above ...
    below = LogitNeighbours(k=2)(LOGITS, torch.tensor([3, 1]))
    assert below.tolist() == [[1, 2], [4, 3]]
    # ... while the authors' code takes the nearest logits on both sides (row 0: |4 − 4.5| =
    # 0.5 for class 1 and |5 − 4.5| = 0.5 for class 0 above it; row 1: 1.9 then 2.5 above).
    nearest = LogitNeighbours(k=2, mode="nearest")(LOGITS, torch.tensor([3, 1]))
    assert nearest.tolist() == [[0, 1], [4, 2]]
    # Fewer than k classes below: the shortfall comes from just above, nearest first.
    assert LogitNeighbours(k=3)(LOGITS, torch.tensor([4, 0])).tolist() == [[2, 1, 3], [3, 4, 1]]
    # Equal logits: the lower class index ranks first.
    tied = torch.tensor([[1.0, 3.0, 2.0, 2.0, 2.0]])
    assert LogitNeighbours(k=2)(tied, torch.tensor([3])).tolist() == [[4, 0]]  # 1 > 2 > 3 > 4 > 0
    assert LogitNeighbours(k=2)(tied, torch.tensor([2])).tolist() == [[3, 4]]
    with pytest.raises(ConfigurationError, match=r"'below'.*'nearest'.*got 'above'"):
        LogitNeighbours(k=2, mode="above")


def test_top_predictions_are_the_other_highest_logits():
    assert TopPredictions(k=2)(LOGITS, torch.tensor([0, 1])).tolist() == [[3, 1], [2, 4]]
    assert TopPredictions(k=3)(LOGITS, torch.tensor([4, 2])).tolist() == [[0, 3, 1], [1, 4, 3]]


@pytest.mark.parametrize("selector_class", [LogitNeighbours, TopPredictions])
def test_logit_selectors_reject_k_at_least_the_number_of_classes(selector_class):
    with pytest.raises(ConfigurationError, match=r"k=5 .* 5 classes.*k <= 4"):
        selector_class(k=5)(LOGITS, torch.tensor([0, 1]))
    assert selector_class(k=4)(LOGITS, torch.tensor([0, 1])).shape == (2, 4)
    with pytest.raises(ConfigurationError, match=r"positive integer"):
        selector_class(k=-1)
