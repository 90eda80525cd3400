"""VAR class sets (ClassSet) and hand-chosen references for CASE / Finer-CAM (ExplicitReferences)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.methods import create_method
from contrastive_saliency.targets import (
    ClassSet,
    ConfusionContrast,
    ExplicitReferences,
    LogitNeighbours,
)
from tests.tiny_models import TinyCAMNet

LOGITS = torch.tensor([[5.0, 4.0, 1.0, 4.5, -3.0], [0.0, 2.0, 2.5, 1.0, 1.9]])


# ---------------------------------------------------------------- ClassSet("top_k_least")


def test_top_k_least_is_target_then_most_probable_others_then_least_probable():
    sets = ClassSet("top_k_least", k=2)(LOGITS, torch.tensor([0, 1]))
    assert sets.tolist() == [[0, 3, 1, 4], [1, 2, 4, 0]]
    assert sets.dtype == torch.long
    # Explaining a non-top class: the top prediction is among its rivals.
    assert ClassSet.top_k_least(k=1)(LOGITS, torch.tensor([4, 0])).tolist() == [
        [4, 0, 2],
        [0, 2, 3],
    ]


def test_top_k_least_default_k_and_best_vs_worst():
    assert ClassSet().k == 3 and ClassSet().mode == "top_k_least"
    assert ClassSet()(LOGITS, torch.tensor([0, 2])).tolist() == [[0, 3, 1, 2, 4], [2, 1, 4, 3, 0]]
    # k = 0: App. A.1's best-vs-worst set when the target is the prediction.
    assert ClassSet(k=0)(LOGITS, torch.tensor([0, 2])).tolist() == [[0, 4], [2, 0]]


def test_top_k_least_ties_go_to_the_lower_class_index():
    flat = torch.ones(1, 5)
    assert ClassSet(k=2)(flat, torch.tensor([2])).tolist() == [[2, 0, 1, 3]]
    ties = torch.tensor([[3.0, 1.0, 3.0, 1.0, 0.0, 0.0]])
    assert ClassSet(k=1)(ties, torch.tensor([1])).tolist() == [[1, 0, 4]]


def test_top_k_least_edge_cases_keep_a_fixed_width_without_duplicates():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    # The target is itself the least probable: the next least probable class fills the slot.
    assert ClassSet(k=1)(logits, torch.tensor([3])).tolist() == [[3, 0, 2]]
    # k = N - 1: every class is already in the set; the least-probable slot is dropped.
    assert ClassSet(k=3)(logits, torch.tensor([2])).tolist() == [[2, 0, 1, 3]]
    # k = N - 2: the only class left is the least probable one.
    assert ClassSet(k=2)(logits, torch.tensor([0])).tolist() == [[0, 1, 2, 3]]


def test_top_k_least_composes_with_the_per_target_call_convention():
    """Methods call selectors with logits repeated per target and the flattened [B, K]
    targets; each row must equal the single-target call."""
    torch.manual_seed(0)
    logits = torch.randn(3, 7)
    targets = torch.tensor([[0, 4], [6, 1], [2, 2]])
    selector = ClassSet(k=2)
    batched = selector(logits.repeat_interleave(2, dim=0), targets.reshape(-1))
    assert batched.shape == (6, 4)
    for row in range(6):
        image, column = divmod(row, 2)
        single = selector(logits[image : image + 1], targets[image, column : column + 1])
        assert batched[row].tolist() == single[0].tolist()
        assert len(set(batched[row].tolist())) == 4 and batched[row, 0] == targets[image, column]


def test_top_k_least_errors():
    with pytest.raises(ConfigurationError, match=r"k=5 .* 5 classes.*k <= 4"):
        ClassSet(k=5)(LOGITS, torch.tensor([0, 1]))
    with pytest.raises(ConfigurationError, match=r"integer >= 0, got -1"):
        ClassSet(k=-1)
    with pytest.raises(ConfigurationError, match=r"ranks classes by the logits"):
        ClassSet(k=1)(None, torch.tensor([0]))
    with pytest.raises(ConfigurationError, match=r"\[0, 4\].*max 7"):
        ClassSet(k=1)(LOGITS, torch.tensor([0, 7]))
    with pytest.raises(ConfigurationError, match=r"'top_k_least'.*'fixed'.*got 'grid'"):
        ClassSet("grid")
    with pytest.raises(ConfigurationError, match=r"only used with mode='fixed'"):
        ClassSet("top_k_least", sets=torch.tensor([[0, 1]]))


# ---------------------------------------------------------------------- ClassSet("fixed")


GRIDS = torch.tensor([[3, 1, 2, 0], [5, 4, 1, 2]])


def test_fixed_sets_put_the_target_first_and_keep_the_given_order():
    selector = ClassSet.fixed(GRIDS)
    assert selector(None, torch.tensor([2, 5])).tolist() == [[2, 3, 1, 0], [5, 4, 1, 2]]
    assert not selector.needs_logits and selector.batch_size == 2
    # K = 2 targets per image: rows b·K + j, each image's set repeated for its targets.
    rows = selector(torch.zeros(4, 6), torch.tensor([3, 0, 4, 1]))
    assert rows.tolist() == [[3, 1, 2, 0], [0, 3, 1, 2], [4, 5, 1, 2], [1, 5, 4, 2]]
    # One set shared by every image ([M]); nested lists are accepted.
    shared = ClassSet("fixed", sets=[7, 8, 9])
    assert shared.batch_size is None
    assert shared(None, torch.tensor([9, 7, 8])).tolist() == [[9, 7, 8], [7, 8, 9], [8, 7, 9]]


def test_fixed_set_without_its_target_is_an_error():
    with pytest.raises(ConfigurationError, match=r"target class 4 \(row 0\) is not in its fixed"):
        ClassSet.fixed(GRIDS)(None, torch.tensor([4, 5]))
    with pytest.raises(ConfigurationError, match=r"row 3.*\[5, 4, 1, 2\]"):
        ClassSet.fixed(GRIDS)(None, torch.tensor([3, 0, 4, 3]))


def test_fixed_set_errors():
    with pytest.raises(ConfigurationError, match=r"holds a class twice: \[5, 4, 5, 2\]"):
        ClassSet.fixed(torch.tensor([[3, 1, 2, 0], [5, 4, 5, 2]]))
    with pytest.raises(ConfigurationError, match=r"at least 2 classes"):
        ClassSet.fixed(torch.tensor([[3], [1]]))
    with pytest.raises(ConfigurationError, match=r"integer class indices, got dtype"):
        ClassSet.fixed(torch.tensor([[0.0, 1.0]]))
    with pytest.raises(ConfigurationError, match=r"1-D or 2-D"):
        ClassSet.fixed(torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ConfigurationError, match=r"negative class index -1"):
        ClassSet.fixed(torch.tensor([[0, -1]]))
    with pytest.raises(ConfigurationError, match=r"needs sets="):
        ClassSet("fixed")
    with pytest.raises(ConfigurationError, match=r"given for 2 images .* asked for 3 rows"):
        ClassSet.fixed(GRIDS)(None, torch.tensor([3, 5, 1]))
    with pytest.raises(ConfigurationError, match=r"class 5 but the model outputs 5 logits"):
        ClassSet.fixed(GRIDS)(torch.zeros(2, 5), torch.tensor([3, 5]))


# ------------------------------------------------------------------- ExplicitReferences


def test_explicit_references_are_returned_per_row_and_repeated_per_target():
    references = ExplicitReferences(torch.tensor([[1, 2], [0, 3]]))
    assert references.batch_size == 2 and references.k == 2
    assert references(LOGITS, torch.tensor([0, 1])).tolist() == [[1, 2], [0, 3]]
    assert references(None, torch.tensor([0, 1])).tolist() == [[1, 2], [0, 3]]
    per_image = ExplicitReferences(torch.tensor([[1, 2], [0, 3]]), targets_per_image=2)
    assert per_image(None, torch.tensor([0, 4, 1, 2])).tolist() == [[1, 2], [1, 2], [0, 3], [0, 3]]
    per_target = ExplicitReferences(torch.tensor([[[1, 2], [3, 4]], [[0, 3], [2, 4]]]))
    assert per_target.targets_per_image == 2
    assert per_target(None, torch.tensor([0, 1, 1, 3])).tolist() == [[1, 2], [3, 4], [0, 3], [2, 4]]


def test_explicit_references_from_a_mapping():
    by_position = ExplicitReferences({1: [4, 2], 0: [3, 1]})
    assert by_position(None, torch.tensor([0, 0])).tolist() == [[3, 1], [4, 2]]
    by_index = ExplicitReferences({10: [1], 11: [2], 12: [3]}, indices=torch.tensor([12, 10]))
    assert by_index(None, torch.tensor([0, 0])).tolist() == [[3], [1]]
    with pytest.raises(ConfigurationError, match=r"no entry for sample index 13"):
        ExplicitReferences({10: [1]}, indices=[13])
    with pytest.raises(ConfigurationError, match=r"keys 0\.\.1, got \[0, 5\]"):
        ExplicitReferences({0: [1], 5: [2]})
    with pytest.raises(
        ConfigurationError, match=r"same number of references; got lengths \[1, 2\]"
    ):
        ExplicitReferences({0: [1], 1: [2, 3]})


def test_explicit_references_errors():
    references = ExplicitReferences(torch.tensor([[1, 2], [0, 3]]))
    with pytest.raises(ConfigurationError, match=r"\[0, 3\] of image 1 .* target class 3 itself"):
        references(LOGITS, torch.tensor([0, 3]))
    # References of another batch size are an error, never silently repeated.
    with pytest.raises(ConfigurationError, match=r"2 images x 1 targets .* asked for 4"):
        references(None, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ConfigurationError, match=r"2 images x 2 targets per image = 4 rows.*2"):
        ExplicitReferences(torch.tensor([[1, 2], [0, 3]]), targets_per_image=2)(
            None, torch.tensor([0, 1])
        )
    with pytest.raises(ConfigurationError, match=r"class 7 but the model outputs 5 logits"):
        ExplicitReferences(torch.tensor([[7], [1]]))(LOGITS, torch.tensor([0, 0]))
    with pytest.raises(ConfigurationError, match=r"holds a class twice"):
        ExplicitReferences(torch.tensor([[1, 1]]))
    with pytest.raises(ConfigurationError, match=r"K=2 targets per image, but targets_per_image=3"):
        ExplicitReferences(torch.zeros(1, 2, 1, dtype=torch.long), targets_per_image=3)
    with pytest.raises(ConfigurationError, match=r"positive integer"):
        ExplicitReferences(torch.tensor([[1]]), targets_per_image=0)
    with pytest.raises(ConfigurationError, match=r"indices= is only used with a mapping"):
        ExplicitReferences(torch.tensor([[1]]), indices=[0])


def _assert_close(actual, expected, rtol=1.3e-6, atol=1e-5):
    """NumPy comparison (torch.testing's first call costs seconds of lazy imports)."""
    np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=rtol, atol=atol)


@pytest.fixture
def net():
    torch.manual_seed(0)
    return TinyCAMNet(num_classes=5)


def test_finer_cam_with_explicit_references_equals_its_selector(net):
    images, targets = torch.randn(3, 3, 8, 8), torch.tensor([[0, 2], [3, 1], [4, 4]])
    with torch.no_grad():
        logits = net(images)
    chosen = LogitNeighbours(3)(logits.repeat_interleave(2, dim=0), targets.reshape(-1))
    automatic = create_method("finer_cam", net, "features")(images, targets)
    explicit = create_method(
        "finer_cam", net, "features", references=ExplicitReferences(chosen.view(3, 2, 3))
    )(images, targets)
    _assert_close(explicit, automatic)


def test_finer_cam_uses_the_explicit_references(net):
    """Closed form on GAP + linear (Finer-CAM Eq. 7) with references the model would not
    choose: α^{c,d} = (W[c] − γ W[d]) / (hw)."""
    images, targets = torch.randn(2, 3, 8, 8), torch.tensor([0, 3])
    chosen = torch.tensor([[4], [2]])
    maps = create_method("finer_cam", net, "features", references=ExplicitReferences(chosen))(
        images, targets
    )
    with torch.no_grad():
        weights = (net.head.weight[targets] - 0.6 * net.head.weight[chosen[:, 0]]) / 64.0
        expected = torch.einsum("bc,bchw->bhw", weights, net.features(images)).relu()
    assert expected.max() > 0
    _assert_close(maps[:, 0], expected, atol=1e-6, rtol=1e-5)


def test_case_with_explicit_contrasts_equals_its_confusion_selector(net):
    counts = np.array(
        [
            [40, 6, 1, 3, 0],
            [5, 30, 2, 0, 9],
            [0, 1, 20, 8, 4],
            [2, 7, 3, 25, 1],
            [9, 0, 4, 2, 33],
        ]
    )
    images, targets = torch.randn(3, 3, 8, 8), torch.tensor([[1, 0], [4, 2], [3, 3]])
    confusion = ConfusionContrast(counts, k=2)
    contrasts = confusion(None, targets.reshape(-1)).view(3, 2, 2)
    automatic = create_method("case", net, "features", contrast=confusion)(images, targets)
    explicit = create_method("case", net, "features", contrast=ExplicitReferences(contrasts))(
        images, targets
    )
    _assert_close(explicit, automatic)
    # A [B, k] table for K = 2 targets needs targets_per_image=2 and then repeats per target.
    targets = torch.tensor([[1, 4], [4, 2], [3, 0]])
    table = torch.tensor([[2, 3], [0, 1], [1, 2]])
    with pytest.raises(ConfigurationError, match=r"asked for 6"):
        create_method("case", net, "features", contrast=ExplicitReferences(table))(images, targets)
    repeated = create_method(
        "case", net, "features", contrast=ExplicitReferences(table, targets_per_image=2)
    )(images, targets)
    per_target = create_method(
        "case", net, "features", contrast=ExplicitReferences(table[:, None].expand(3, 2, 2))
    )(images, targets)
    _assert_close(repeated, per_target)
    assert repeated.abs().max() > 0
