"""Cascading / independent model-parameter randomisation (Adebayo et al. 2018, Sec. 3.1)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import resnet18

from contrastive_saliency.metrics.functional.randomisation import (
    cascading_randomisation,
    default_randomisation_order,
    grouped_randomisation_order,
    independent_randomisation,
    parameterised_layers,
    randomise_module,
)


class SmallBNNet(nn.Module):
    """conv → BN → ReLU → conv → BN → ReLU → GAP → linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 6, 3),
            nn.BatchNorm2d(6),
            nn.ReLU(),
        )
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def _pretend_trained(model: nn.Module, seed: int = 123) -> nn.Module:
    """Give every parameter and float buffer non-initial values (like a trained model), so that
    re-initialisation visibly changes each parameter (BN's reset weight 1 / bias 0 included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3 + 0.5)
    return model.eval()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    assert before.keys() == after.keys()
    return {key for key in before if not torch.equal(before[key], after[key])}


def _direct_parameter_keys(model: nn.Module, name: str) -> set[str]:
    module = model.get_submodule(name)
    prefix = f"{name}." if name else ""
    return {prefix + key for key, _ in module.named_parameters(recurse=False)}


def _subtree_parameter_keys(model: nn.Module, name: str) -> set[str]:
    prefix = f"{name}." if name else ""
    return {prefix + key for key, _ in model.get_submodule(name).named_parameters()}


@pytest.fixture
def small_net() -> SmallBNNet:
    torch.manual_seed(0)
    return _pretend_trained(SmallBNNet())


def test_default_order_is_output_to_input(small_net):
    assert parameterised_layers(small_net) == [
        "features.0",
        "features.1",
        "features.3",
        "features.4",
        "head",
    ]
    assert default_randomisation_order(small_net) == [
        "head",
        "features.4",
        "features.3",
        "features.1",
        "features.0",
    ]
    names = [name for name, _ in cascading_randomisation(small_net)]
    assert names == default_randomisation_order(small_net)


def test_each_step_randomises_exactly_one_more_layer(small_net):
    original = _snapshot(small_net)
    previous = original
    randomised: set[str] = set()
    for name, model in cascading_randomisation(small_net, seed=3):
        current = _snapshot(model)
        # Exactly the new layer's parameters changed; every other tensor (earlier randomised
        # layers, untouched layers, BN running statistics) equals the previous step.
        assert _changed(previous, current) == _direct_parameter_keys(small_net, name)
        randomised |= _direct_parameter_keys(small_net, name)
        # Cumulative: relative to the original, all layers so far differ, nothing else.
        assert _changed(original, current) == randomised
        previous = current
    assert randomised == set(dict(small_net.named_parameters()))


def test_original_model_is_untouched(small_net):
    before = _snapshot(small_net)
    for _, model in cascading_randomisation(small_net):
        assert model is not small_net
    for _, model in independent_randomisation(small_net):
        assert model is not small_net
    assert _changed(before, _snapshot(small_net)) == set()


def test_deterministic_under_seed_and_global_rng_untouched(small_net):
    rng_state = torch.get_rng_state()
    run_a = [(n, _snapshot(m)) for n, m in cascading_randomisation(small_net, seed=7)]
    assert torch.equal(torch.get_rng_state(), rng_state)
    torch.manual_seed(999)  # a different global RNG state must not matter
    run_b = [(n, _snapshot(m)) for n, m in cascading_randomisation(small_net, seed=7)]
    run_c = [(n, _snapshot(m)) for n, m in cascading_randomisation(small_net, seed=8)]
    for (name_a, state_a), (name_b, state_b), _ in zip(run_a, run_b, run_c, strict=True):
        assert name_a == name_b
        assert _changed(state_a, state_b) == set()
    # Another seed gives other random values for the (randomly initialised) conv / linear layers.
    assert "head.weight" in _changed(run_a[0][1], run_c[0][1])


def test_reinit_semantics_for_batch_norm(small_net):
    running_mean = small_net.features[1].running_mean.clone()
    *_, (name, model) = cascading_randomisation(small_net)
    assert name == "features.0"
    bn = model.features[1]
    # reset_parameters(): affine weight 1, bias 0; running statistics kept by default.
    assert torch.equal(bn.weight, torch.ones_like(bn.weight))
    assert torch.equal(bn.bias, torch.zeros_like(bn.bias))
    assert torch.equal(bn.running_mean, running_mean)
    *_, (_, reset_model) = cascading_randomisation(small_net, reset_running_stats=True)
    bn = reset_model.features[1]
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))


def test_reinit_matches_reset_parameters_under_seed(small_net):
    layer = nn.Linear(6, 5)
    randomise_module(layer, seed=11)
    expected = nn.Linear(6, 5)
    torch.manual_seed(11)
    expected.reset_parameters()
    assert torch.equal(layer.weight, expected.weight)
    assert torch.equal(layer.bias, expected.bias)


def test_normal_init_keeps_scale_and_fallback():
    layer = nn.Linear(64, 64)
    with torch.no_grad():
        layer.weight.normal_(0.2, 0.5)
    randomise_module(layer, seed=0, init="normal")
    assert abs(layer.weight.mean().item() - 0.2) < 0.05
    assert abs(layer.weight.std().item() - 0.5) < 0.05

    class NoReset(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.token = nn.Parameter(torch.linspace(-1, 1, 100))

    module = NoReset()
    before = module.token.detach().clone()
    randomise_module(module, seed=0)  # no reset_parameters → normal fallback
    assert not torch.equal(module.token, before)
    assert abs(module.token.std().item() - before.std().item()) < 0.25


def test_callable_init_and_invalid_init(small_net):
    layer = nn.Linear(3, 2)
    randomise_module(layer, seed=0, init=lambda m: m.weight.data.fill_(2.0))
    assert torch.equal(layer.weight, torch.full_like(layer.weight, 2.0))
    with pytest.raises(ValueError, match="init must be"):
        randomise_module(layer, seed=0, init="xavier")  # type: ignore[arg-type]


def test_explicit_block_order(small_net):
    order = ["head", "features"]
    steps = [(n, _snapshot(m)) for n, m in cascading_randomisation(small_net, order)]
    assert [n for n, _ in steps] == order
    assert _changed(_snapshot(small_net), steps[0][1]) == _subtree_parameter_keys(small_net, "head")
    assert _changed(steps[0][1], steps[1][1]) == _subtree_parameter_keys(small_net, "features")


@pytest.mark.parametrize(
    ("order", "message"),
    [
        (["head", "nope"], "not a module"),
        (["head", "head"], "more than once"),
        (
            ["features", "features.0", "features.1", "features.3", "features.4"],
            "no parameters left",
        ),
        (["features.2"], "no parameters"),
    ],
)
def test_invalid_orders(small_net, order, message):
    with pytest.raises(ValueError, match=message):
        next(cascading_randomisation(small_net, order))


def test_nested_names_randomise_the_innermost_first(small_net):
    """A parameter belongs to the most specific name containing it: "features.0" on its own,
    then the rest of "features"."""
    order = ["head", "features.0", "features"]
    steps = [(n, _snapshot(m)) for n, m in cascading_randomisation(small_net, order, seed=4)]
    assert [n for n, _ in steps] == order
    before = _snapshot(small_net)
    assert _changed(before, steps[0][1]) == _subtree_parameter_keys(small_net, "head")
    assert _changed(steps[0][1], steps[1][1]) == _direct_parameter_keys(small_net, "features.0")
    rest = _subtree_parameter_keys(small_net, "features") - _direct_parameter_keys(
        small_net, "features.0"
    )
    assert _changed(steps[1][1], steps[2][1]) == rest
    # independent mode: each step alone changes exactly its cascade step's keys, to the
    # same values
    states = [before] + [state for _, state in steps]
    for index, (name, model) in enumerate(independent_randomisation(small_net, order, seed=4)):
        step_keys = _changed(states[index], states[index + 1])
        state = _snapshot(model)
        assert _changed(before, state) == step_keys, name
        assert all(torch.equal(state[key], states[index + 1][key]) for key in step_keys)


class _RootParameterNet(nn.Module):
    """Parameters on the root itself (as a ViT's cls_token) next to parameterised children."""

    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.linspace(-1.0, 1.0, 8))
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x + self.token))


def test_root_parameters_are_the_last_step_and_only_theirs():
    model = _pretend_trained(_RootParameterNet())
    assert default_randomisation_order(model) == ["head", "body", ""]
    steps = [(n, _snapshot(m)) for n, m in cascading_randomisation(model, seed=1)]
    assert [n for n, _ in steps] == ["head", "body", ""]
    assert _changed(steps[1][1], steps[2][1]) == {"token"}


def test_tied_weights_rejected():
    model = _RootParameterNet()
    model.tied = nn.Linear(8, 3)
    model.tied.weight = model.head.weight
    with pytest.raises(ValueError, match="share parameters"):
        next(cascading_randomisation(model, ["head", "tied", "body"]))


def _conv_block(channels_in: int, channels_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels_in, channels_out, 3), nn.BatchNorm2d(channels_out))


def test_grouped_order_is_block_wise():
    # the layout of lightning_modules.small_cnn.SmallCNN: stages of (pool,) conv blocks
    model = nn.Module()
    model.features = nn.Sequential(
        nn.Sequential(_conv_block(3, 4)),
        nn.Sequential(nn.MaxPool2d(2), _conv_block(4, 8), _conv_block(8, 8)),
    )
    model.classifier = nn.Linear(8, 4)
    assert grouped_randomisation_order(model, 3) == [
        "classifier",
        "features.1.2",
        "features.1.1",
        "features.0.0",
    ]
    assert grouped_randomisation_order(model, 1) == ["classifier", "features"]
    resnet = resnet18(weights=None, num_classes=10)
    order = grouped_randomisation_order(resnet, 2)
    assert order == [
        "fc", "layer4.1", "layer4.0", "layer3.1", "layer3.0", "layer2.1", "layer2.0",
        "layer1.1", "layer1.0", "bn1", "conv1",
    ]  # fmt: skip
    steps = [n for n, _ in cascading_randomisation(resnet, order)]
    assert steps == order
    assert grouped_randomisation_order(_RootParameterNet(), 2)[-1] == ""
    with pytest.raises(ValueError, match="positive integer"):
        grouped_randomisation_order(model, 0)


def test_string_order_rejected(small_net):
    with pytest.raises(TypeError, match="sequence of module names"):
        next(cascading_randomisation(small_net, "head"))


def test_independent_randomises_one_layer_at_a_time(small_net):
    original = _snapshot(small_net)
    cascading = {n: _snapshot(m) for n, m in cascading_randomisation(small_net, seed=5)}
    for name, model in independent_randomisation(small_net, seed=5):
        current = _snapshot(model)
        keys = _direct_parameter_keys(small_net, name)
        assert _changed(original, current) == keys
        # Same seeds: the layer gets the same values as in the cascading run.
        for key in keys:
            assert torch.equal(current[key], cascading[name][key])


def test_copy_each_step_keeps_every_model(small_net):
    models = [m for _, m in cascading_randomisation(small_net, copy_each_step=True)]
    assert len({id(m) for m in models}) == len(models)
    assert not torch.equal(models[0].features[0].weight, models[-1].features[0].weight)
    shared = [m for _, m in cascading_randomisation(small_net)]
    assert len({id(m) for m in shared}) == 1


def test_resnet18_parameter_checks():
    torch.manual_seed(0)
    model = _pretend_trained(resnet18(weights=None, num_classes=10))
    order = default_randomisation_order(model)
    # 20 convolutions + 20 batch norms (3 of each in downsample paths) + fc.
    assert len(order) == 41
    assert order[0] == "fc"
    assert order[-1] == "conv1"
    assert (
        order.index("layer4.1.conv2")
        < order.index("layer4.0.conv1")
        < order.index("layer1.0.conv1")
    )
    original = _snapshot(model)
    # Per step, compare only the layers involved (full state comparisons of 11M parameters at
    # every step are slow on a loaded CPU): the new layer changed, the previous step's layer
    # kept its randomised values, the next layer is still original.
    earlier: dict[str, torch.Tensor] = {}
    for step, (name, randomised) in enumerate(cascading_randomisation(model, seed=1)):
        state = randomised.state_dict()
        keys = _direct_parameter_keys(model, name)
        assert all(not torch.equal(state[key], original[key]) for key in keys)
        assert all(torch.equal(state[key], value) for key, value in earlier.items())
        if step + 1 < len(order):
            for key in _direct_parameter_keys(model, order[step + 1]):
                assert torch.equal(state[key], original[key])
        earlier = {key: state[key].clone() for key in keys}
    assert _changed(original, _snapshot(randomised)) == set(dict(model.named_parameters()))
    assert _changed(original, _snapshot(model)) == set()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_model_deterministic_and_rng_untouched(small_net):
    model = small_net.cuda()
    cuda_state = torch.cuda.get_rng_state()
    run_a = [(n, _snapshot(m)) for n, m in cascading_randomisation(model, seed=2)]
    run_b = [(n, _snapshot(m)) for n, m in cascading_randomisation(model, seed=2)]
    assert torch.equal(torch.cuda.get_rng_state(), cuda_state)
    for (_, state_a), (_, state_b) in zip(run_a, run_b, strict=True):
        assert _changed(state_a, state_b) == set()
