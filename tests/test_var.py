"""VAR (var.md Sec. 3.2–3.3): closed forms against NumPy, properties of q, real base methods."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from contrastive_saliency.errors import ConfigurationError, UnknownMethodError
from contrastive_saliency.methods import SaliencyMethod, create_method, list_methods
from contrastive_saliency.methods.registry import method_factory
from contrastive_saliency.methods.var import VAR, class_distribution, var_refine
from contrastive_saliency.targets import ClassSet, TopPredictions
from tests.tiny_models import TinyCAMNet

NUM_CLASSES = 6
SIZE = 8


class TableMethod(SaliencyMethod):
    """A base method with given maps: ``maps[b, k] = table[b, classes[b, k]]``; records calls."""

    def __init__(self, model: nn.Module, table: torch.Tensor) -> None:
        super().__init__(model)
        self.table = table
        self.requests: list[torch.Tensor] = []

    def compute(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        self.requests.append(classes.clone())
        return self.table[torch.arange(classes.shape[0])[:, None], classes]


class CountingNet(TinyCAMNet):
    def __init__(self) -> None:
        super().__init__(num_classes=NUM_CLASSES)
        self.forwards = 0

    def forward(self, x):
        self.forwards += 1
        return super().forward(x)


@pytest.fixture
def net():
    torch.manual_seed(0)
    return CountingNet()


def _assert_close(actual, expected, rtol=1.3e-6, atol=1e-5):
    """NumPy comparison (torch.testing's first call costs seconds of lazy imports)."""
    np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=rtol, atol=atol)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=0, keepdims=True))
    return e / e.sum(axis=0)


def numpy_paper(maps, temperatures=(1, 5, 100), divisor=True, max_abs=False):
    """H′ = H_c ⊙ q_c ⊙ 1[q_c − 1/K > 0], q = mean_t softmax(H/t) (target at index 0)."""
    maps = np.asarray(maps, dtype=np.float64)
    scaled = maps / np.abs(maps).max() if max_abs and np.abs(maps).max() > 0 else maps
    q = np.mean([_softmax(scaled / t if divisor else scaled * t) for t in temperatures], axis=0)
    return maps[0] * q[0] * (q[0] > 1.0 / len(maps))


def numpy_code(maps, sharpening=10.0, tau=0.1):
    """q = softmax(s·|H|), kept where q_c − 1/K > τ, output H_c ⊙ q_c ⊙ mask."""
    maps = np.asarray(maps, dtype=np.float64)
    q = _softmax(sharpening * np.abs(maps))
    return maps[0] * q[0] * (q[0] - 1.0 / len(maps) > tau)


def _table(batch=2, scale=2.0, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(batch, NUM_CLASSES, SIZE, SIZE, generator=generator)


GRIDS = torch.tensor([[3, 1, 5, 0], [2, 4, 1, 5]])
TARGETS = torch.tensor([[5, 3], [4, 2]])  # two targets per image, both in the image's set


@pytest.mark.parametrize(
    ("options", "reference"),
    [
        ({}, lambda m: numpy_paper(m)),
        ({"temperature_as": "factor"}, lambda m: numpy_paper(m, divisor=False)),
        ({"temperatures": (0.5, 2.0)}, lambda m: numpy_paper(m, temperatures=(0.5, 2.0))),
        ({"normalise": "max_abs"}, lambda m: numpy_paper(m, max_abs=True)),
        ({"mode": "code"}, lambda m: numpy_code(m)),
        ({"mode": "code", "tau": 0.01, "sharpening": 2.0}, lambda m: numpy_code(m, 2.0, 0.01)),
    ],
)
def test_closed_form_against_numpy(net, options, reference):
    table = _table()
    base = TableMethod(net, table)
    method = VAR(net, base=base, class_set=ClassSet.fixed(GRIDS), **options)
    maps = method(torch.zeros(2, 3, SIZE, SIZE), TARGETS)
    assert maps.shape == (2, 2, SIZE, SIZE)
    kept = 0
    for b in range(2):
        for j in range(2):
            target = int(TARGETS[b, j])
            order = [target] + [c for c in GRIDS[b].tolist() if c != target]
            expected = reference(table[b, order].numpy())
            np.testing.assert_allclose(maps[b, j].numpy(), expected, rtol=1e-5, atol=1e-6)
            kept += int((expected != 0).sum())
    assert 0 < kept < maps.numel()  # the threshold keeps some pixels and drops others
    # ONE base call, with each image's distinct classes (the 2 targets share one set of 4).
    assert len(base.requests) == 1
    assert base.requests[0].tolist() == GRIDS.sort(dim=1).values.tolist()
    assert net.forwards == 0  # fixed sets need no logits


def test_top_k_least_class_set_costs_one_forward_and_matches_the_selector(net):
    table = _table(batch=3)
    base = TableMethod(net, table)
    method = VAR(net, base=base, class_set=ClassSet(k=2))
    images = torch.randn(3, 3, SIZE, SIZE)
    targets = torch.tensor([[0, 1], [2, 2], [5, 4]])
    maps = method(images, targets)
    assert net.forwards == 1 and len(base.requests) == 1
    with torch.no_grad():
        logits = net(images)
    sets = ClassSet(k=2)(logits.repeat_interleave(2, dim=0), targets.reshape(-1)).view(3, 2, 4)
    assert torch.equal(method.class_sets(images, targets), sets)
    for b in range(3):
        for j in range(2):
            expected = numpy_paper(table[b, sets[b, j]].numpy())
            np.testing.assert_allclose(maps[b, j].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_a_dominating_target_keeps_its_map_and_ties_give_zero():
    """q_c → 1 where the target dominates by a wide margin (H′ ≈ H); equal maps give
    q = 1/K′ exactly, so the pixel is dropped; all-zero maps give zeros, never NaN."""
    maps = torch.zeros(3, 4, 4)
    maps[0, 0, 0] = 1e4  # the target dominates pixel (0, 0) even at t = 100
    maps[1, 1, 1] = 1e4  # a rival dominates pixel (1, 1)
    maps[:, 2, 2] = 3.0  # all classes equal at (2, 2)
    for options in ({}, {"mode": "code"}, {"temperature_as": "factor"}, {"normalise": "max_abs"}):
        refined = var_refine(maps, **options)
        assert torch.isfinite(refined).all()
        if "normalise" not in options:  # max_abs rescales the margin to 1: q_c < 1 there
            assert abs(float(refined[0, 0]) - 1e4) <= 1e-2
        assert refined[0, 0] > 0 and refined[1, 1] == 0 and refined[2, 2] == 0
        assert (refined[3] == 0).all()  # a row of pixels where every map is 0
    equal = torch.randn(1, 4, 4).expand(5, 4, 4)
    assert (var_refine(equal) == 0).all() and (var_refine(equal, mode="code") == 0).all()
    assert (var_refine(torch.zeros(2, 3, 6, 6)) == 0).all()


@pytest.mark.parametrize("mode", ["paper", "code"])
def test_output_is_zero_exactly_where_q_is_at_most_chance(mode):
    torch.manual_seed(3)
    maps = 0.3 * torch.randn(4, 5, 16, 16)  # 4 sets of K′ = 5 classes
    tau = 0.0 if mode == "code" else 0.1
    refined = var_refine(maps, mode=mode, tau=tau)
    q = class_distribution(maps, mode=mode)
    _assert_close(q.sum(dim=1), torch.ones(4, 16, 16))
    above = q[:, 0] > 1 / 5
    assert 0 < int(above.sum()) < above.numel()
    assert (refined[~above] == 0).all()
    _assert_close(refined[above], (maps[:, 0] * q[:, 0])[above])


BASES = [
    "grad_cam",
    "hires_cam",
    pytest.param(
        "input_x_gradient",
        marks=pytest.mark.skipif(
            "input_x_gradient" not in list_methods(), reason="input_x_gradient not registered"
        ),
    ),
]


@pytest.mark.parametrize("base", BASES)
def test_wraps_real_methods_finite_batched_and_batch_invariant(base):
    torch.manual_seed(0)
    model = TinyCAMNet(num_classes=NUM_CLASSES)
    layer = None if base == "input_x_gradient" else "features"
    method = create_method("var", model, layer, base=base, class_set=ClassSet(k=2))
    images = torch.randn(4, 3, SIZE, SIZE)
    classes = torch.tensor([[0, 1], [2, 5], [3, 3], [4, 0]])
    model.train()
    maps = method(images, classes)
    assert model.training  # the mode is restored
    assert maps.shape == (4, 2, SIZE, SIZE) and maps.dtype == torch.float32
    assert torch.isfinite(maps).all() and maps.abs().max() > 0
    for i in range(4):
        single = method(images[i : i + 1], classes[i : i + 1])
        _assert_close(single[0], maps[i], atol=1e-5, rtol=1e-5)
    # VAR of a class is its own base map where it keeps anything: |H′| <= |H|.
    base_maps = create_method(base, model, layer)(images, classes)
    assert (maps.abs() <= base_maps.abs() + 1e-6).all()


def test_the_class_set_changes_the_map_of_the_top_class():
    torch.manual_seed(0)
    model = TinyCAMNet(num_classes=NUM_CLASSES)
    images = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        order = model(images).argsort(dim=1, descending=True)
    top = order[:, :1]
    near = torch.cat([top, order[:, 1:3]], dim=1)  # the top class against its runners-up
    far = torch.cat([top, order[:, -2:]], dim=1)  # against the two least likely classes
    method = create_method("var", model, "features", base="grad_cam", class_set=near)
    with_near = method(images, top)
    with_far = method(images, top, class_set=far)  # per-call override
    assert with_near.abs().max() > 0 and with_far.abs().max() > 0
    assert (with_near - with_far).abs().max() > 1e-4
    # The per-call class set is used for that call only.
    _assert_close(method(images, top), with_near)


def test_grid_targets_with_the_grid_as_class_set(net):
    """Grid pointing game usage: explain the four cell classes, each against the other three."""
    table = _table()
    base = TableMethod(net, table)
    method = VAR(net, base=base)
    maps = method(torch.zeros(2, 3, SIZE, SIZE), GRIDS, class_set=GRIDS)
    assert maps.shape == (2, 4, SIZE, SIZE) and net.forwards == 0
    assert len(base.requests) == 1 and base.requests[0].shape == (2, 4)  # 16 maps, 4 computed
    for b in range(2):
        for j in range(4):
            order = GRIDS[b].roll(-j).tolist()  # target first; order of rivals is irrelevant
            expected = numpy_paper(table[b, order].numpy())
            np.testing.assert_allclose(maps[b, j].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_errors(net):
    with pytest.raises(
        UnknownMethodError, match=r"var base: unknown saliency method 'grad_cma'.*grad_cam"
    ):
        create_method("var", net, "features", base="grad_cma")
    with pytest.raises(UnknownMethodError, match=r"available: .*hires_cam"):
        create_method("var", net, "features", base="no_such_method")
    method = create_method("var", net, "features", class_set=ClassSet.fixed(GRIDS))
    with pytest.raises(ConfigurationError, match=r"target class 0 \(row 1\) is not in its fixed"):
        method(torch.zeros(2, 3, SIZE, SIZE), torch.tensor([[5], [0]]))
    with pytest.raises(ConfigurationError, match=r"batch of 2 images but this batch has 3"):
        method(torch.zeros(3, 3, SIZE, SIZE), torch.tensor([3, 2, 1]))
    reference_selector = create_method("var", net, "features", class_set=TopPredictions(2))
    with pytest.raises(ConfigurationError, match=r"target class first"):
        reference_selector(torch.zeros(2, 3, SIZE, SIZE), torch.tensor([0, 1]))
    with pytest.raises(ConfigurationError, match=r"at least 2 classes"):
        method(
            torch.zeros(2, 3, SIZE, SIZE), torch.tensor([1, 2]), class_set=torch.tensor([[1], [2]])
        )
    with pytest.raises(ConfigurationError, match=r"mode must be 'paper'.*got 'papper'"):
        create_method("var", net, "features", mode="papper")
    with pytest.raises(ConfigurationError, match=r"temperatures .* got \(1.0, 0.0\)"):
        create_method("var", net, "features", temperatures=(1.0, 0.0))
    with pytest.raises(ConfigurationError, match=r"tau must lie in \[0, 1\).*got 1.5"):
        create_method("var", net, "features", tau=1.5)
    with pytest.raises(ConfigurationError, match=r"normalise must be 'none'.*got 'minmax'"):
        create_method("var", net, "features", normalise="minmax")
    with pytest.raises(ConfigurationError, match=r"cannot wrap itself"):
        create_method("var", net, "features", base="var")
    with pytest.raises(ConfigurationError, match=r"var's own layer= argument"):
        create_method("var", net, None, base="grad_cam", base_kwargs={"layer": "features"})
    with pytest.raises(ConfigurationError, match=r"either base=<method name>"):
        VAR(net, "features", base=TableMethod(net, _table()))
    with pytest.raises(ConfigurationError, match=r"K' >= 2"):
        var_refine(torch.zeros(1, 4, 4))


CLASS_AGNOSTIC = {
    "attention_rollout",
    "eigen_cam",
    "oracle_part",
    "oracle_object",
    "random",
    "edge",
}


def test_class_agnostic_bases_are_refused(net):
    """The methods whose class declares ``class_agnostic = True`` are exactly those whose maps do
    not depend on the class; VAR over any of them would be 0 everywhere, so it refuses them
    (a registered name before building it, and a built method)."""
    flagged = {
        name for name in list_methods() if getattr(method_factory(name), "class_agnostic", False)
    }
    assert flagged == CLASS_AGNOSTIC
    for name in sorted(flagged):
        with pytest.raises(ConfigurationError, match=rf"var base '{name}' is class-agnostic"):
            create_method("var", net, base=name)
    built = create_method("eigen_cam", net, "features")
    with pytest.raises(ConfigurationError, match=r"base 'eigen_cam' is class-agnostic"):
        VAR(net, base=built)


@pytest.mark.parametrize(
    ("base", "base_kwargs"),
    [
        ("gradient_shap", {"n_samples": 4, "stdevs": 0.1}),
        ("deeplift", {}),
        ("occlusion", {"window": 3, "stride": 2}),
        ("full_grad", {}),
    ],
)
def test_new_bases_give_class_dependent_maps(base, base_kwargs):
    """VAR over each issue-19 method on a small CNN: non-zero maps that differ between the two
    explained classes of an image (batch fields such as GradientSHAP's index pass through)."""
    torch.manual_seed(0)
    model = TinyCAMNet(num_classes=NUM_CLASSES).eval()
    method = create_method("var", model, base=base, base_kwargs=base_kwargs)
    images = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        classes = model(images).topk(2, dim=1).indices  # top-1 and top-2
    fields = {"index": torch.tensor([3, 8, 21])} if base == "gradient_shap" else {}
    assert set(method.batch_fields) == set(fields)
    maps = method(images, classes, **fields)
    assert torch.isfinite(maps).all()
    assert (maps.abs().amax(dim=(2, 3)) > 0).all()  # every image, every class
    assert ((maps[:, 0] - maps[:, 1]).abs().amax(dim=(1, 2)) > 1e-6).all()
