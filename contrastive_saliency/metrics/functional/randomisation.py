"""Model-parameter randomisation for the saliency sanity check (Adebayo et al. 2018).

Adebayo et al. ("Sanity checks for saliency maps", NeurIPS 2018, Sec. 3.1 "Model parameter
randomization test") compare the saliency map of a trained model with the maps of models whose
parameters have been re-initialised:

- **cascading randomisation**: starting from the top (logits) layer, the weights are
  re-initialised layer by layer towards the input, *cumulatively* — step ``k`` has the ``k``
  topmost layers randomised (VAR, `papers/var.md` Sec. 4.3 / Fig. 6: "from back to front");
- **independent randomisation**: one layer at a time is re-initialised, all others keep their
  trained values.

Their reference code re-runs each TensorFlow variable's own initialiser for the trainable
variables of a layer (batch-norm moving statistics are not trainable and stay). The torch
counterpart used here (``init="reinit"``) calls the module's own ``reset_parameters()``; see
:func:`randomise_module` for the exact rules, the fallback and the normalisation layers.

**Layer order.** A *layer* is a module that directly owns at least one parameter
(``module.parameters(recurse=False)`` non-empty: ``Conv2d``, ``Linear``, ``BatchNorm2d``,
``LayerNorm``, … — or the root itself for, e.g., a ViT's ``cls_token``). The default order is
the **reverse of registration order** (``model.named_modules()``), which for torchvision / timm
classifiers equals reverse forward order, i.e. output (logits) → input. Where registration and
forward order differ, pass ``order`` explicitly: a list of module names, each of which may also
be a block (all parameterised modules inside it are randomised together in that step, as in
Adebayo et al.'s block-wise Inception-v3 order ``Logits, Mixed_7c, Mixed_7b, …``);
:func:`grouped_randomisation_order` builds such a block order from the module names.

**Which parameters a step changes.** Every parameterised module belongs to the step of the
*most specific* name of ``order`` that contains it (the name itself or its nearest listed
ancestor). Names may therefore be nested: ``["head", "features.0", "features"]`` randomises
``features.0`` on its own and then the rest of ``features``; the root ``""`` (a ViT's
``cls_token`` / ``pos_embed``) randomises only what no other step claims. A step whose modules
are all claimed by more specific names is an error, and so is a parameter reachable under two
names that are not nested (tied weights).

All randomisation happens on a deep copy; the model passed in is never modified. Randomness is
seeded per step (independent of the global RNG, whose CPU and CUDA states are restored).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
from torch import nn

InitName = Literal["reinit", "normal"]
Init = InitName | Callable[[nn.Module], None]


def parameterised_layers(model: nn.Module) -> list[str]:
    """Names of the modules that directly own parameters, in registration order.

    Names are those of ``model.named_modules()`` (``""`` is the model itself).
    """
    return [
        name
        for name, module in model.named_modules()
        if next(module.parameters(recurse=False), None) is not None
    ]


def default_randomisation_order(model: nn.Module) -> list[str]:
    """Cascading order output → input: :func:`parameterised_layers` reversed."""
    return parameterised_layers(model)[::-1]


def grouped_randomisation_order(model: nn.Module, depth: int) -> list[str]:
    """Block order output → input: :func:`parameterised_layers` grouped by the first ``depth``
    components of their dotted names, groups in reverse order of their first layer.

    Adebayo et al. (2018, Sec. 3.1) randomise Inception-v3 block by block; this gives the same
    kind of order for any network: ``depth=2`` turns a torchvision / timm ResNet into
    ``fc, layer4.2, layer4.1, …, layer1.0, bn1, conv1`` and ``depth=3`` the small CNN of the
    embedded benchmark into ``classifier, features.3.2, features.3.1, …, features.0.0`` (one
    conv + batch-norm block per step). A layer with fewer components is its own group, and
    the root's own parameters (``""``) form the last group.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive integer (name components), got {depth!r}")
    groups: list[str] = []
    for name in parameterised_layers(model):
        group = ".".join(name.split(".")[:depth]) if name else ""
        if group not in groups:
            groups.append(group)
    return groups[::-1]


def _contains(ancestor: str, name: str) -> bool:
    """Whether module ``name`` lies inside module ``ancestor`` (itself included)."""
    return ancestor == "" or name == ancestor or name.startswith(ancestor + ".")


def _step_targets(model: nn.Module, names: list[str]) -> list[list[nn.Module]]:
    """For each name of the (checked) order, the parameterised modules its step randomises:
    those whose most specific containing name of the order is that name."""
    steps: dict[str, list[nn.Module]] = {name: [] for name in names}
    for module_name, module in model.named_modules():
        if next(module.parameters(recurse=False), None) is None:
            continue
        owners = [name for name in names if _contains(name, module_name)]
        if owners:
            steps[max(owners, key=len)].append(module)  # nested: the longest is innermost
    return [steps[name] for name in names]


def resolve_randomisation_order(model: nn.Module, order: Sequence[str] | None) -> list[str]:
    """``order`` (default :func:`default_randomisation_order`) as a list, checked against
    ``model``: every name a module with parameters, none twice, every step left with modules of
    its own (nesting rules in the module docstring), no parameter in two steps (tied weights).
    Raises ``ValueError`` (``TypeError`` for a single string) naming the problem."""
    if isinstance(order, str):
        raise TypeError("order must be a sequence of module names, not a single string")
    names = default_randomisation_order(model) if order is None else list(order)
    modules = dict(model.named_modules())
    if len(set(names)) != len(names):
        duplicates = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"order names a module more than once: {duplicates}")
    for name in names:
        if name not in modules:
            raise ValueError(
                f"order names {name!r}, which is not a module of {type(model).__name__}; "
                "use names from model.named_modules()"
            )
        if next(modules[name].parameters(), None) is None:
            raise ValueError(f"module {name!r} has no parameters to randomise")
    owner: dict[int, str] = {}
    for name, targets in zip(names, _step_targets(model, names), strict=True):
        if not targets:
            raise ValueError(
                f"module {name!r} has no parameters left to randomise: every parameterised "
                "module inside it is named more specifically in the order"
            )
        for parameter in (p for target in targets for p in target.parameters(recurse=False)):
            previous = owner.setdefault(id(parameter), name)
            if previous != name:
                raise ValueError(
                    f"modules {previous!r} and {name!r} share parameters (tied weights); each "
                    "step must randomise a disjoint set of parameters — pass an explicit order "
                    "that names the tied modules together"
                )
    return names


def _step_seeds(seed: int, steps: int) -> list[int]:
    """Per-step seeds drawn from one seeded generator (step k always gets the same seed)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**62, (steps,), generator=generator).tolist()


def _normal_(module: nn.Module) -> None:
    """Direct parameters ← N(μ, σ²) with μ, σ the mean and (population) standard deviation of
    the parameter's current values, preserving each parameter's scale."""
    with torch.no_grad():
        for parameter in module.parameters(recurse=False):
            values = parameter.detach().float()
            mean = float(values.mean())
            std = float(values.std(correction=0)) if values.numel() > 1 else 0.0
            if std > 0:
                parameter.normal_(mean, std)
            else:
                parameter.fill_(mean)


def _reinit_(module: nn.Module) -> None:
    """The module's own ``reset_parameters()`` if it has one, else :func:`_normal_`."""
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        reset()
    else:
        _normal_(module)


def _cuda_devices(module: nn.Module) -> list[int]:
    devices = {t.device.index for t in module.parameters() if t.device.type == "cuda"}
    return sorted(index if index is not None else torch.cuda.current_device() for index in devices)


def randomise_module(
    module: nn.Module,
    *,
    seed: int,
    init: Init = "reinit",
    reset_running_stats: bool = False,
) -> None:
    """Re-initialise, in place, every parameterised module inside ``module`` (itself included).

    For each such module (one that directly owns parameters), only its *direct* parameters
    change:

    - ``init="reinit"`` (default, Adebayo et al.: re-run the layer's initialiser): the module's
      own ``reset_parameters()`` (``Conv2d``/``Linear``: Kaiming-uniform weight, uniform bias).
      Normalisation layers (``BatchNorm``, ``LayerNorm``, ``GroupNorm``) have their affine
      parameters re-initialised too, which by torch's definition sets weight 1 and bias 0
      (not random — as TensorFlow's ones/zeros initialisers in the reference code). Modules
      without ``reset_parameters()`` (e.g. ``nn.MultiheadAttention``, a ViT root's
      ``cls_token``) fall back to ``"normal"``.
    - ``init="normal"``: every direct parameter ← N(μ, σ²), μ and σ its current mean and
      population standard deviation (a constant parameter is kept at its mean).
    - a callable ``init(module)``: randomises ``module``'s direct parameters in place.

    Buffers are kept unless ``reset_running_stats``: batch-norm running mean/variance are not
    parameters (Adebayo et al. re-initialise trainable variables only), so by default a
    ``BatchNorm`` keeps its running statistics even though ``reset_parameters()`` resets them.
    Parameters and buffers of child modules are always restored after a module's
    ``reset_parameters()``, so a step changes exactly the direct parameters of the targeted
    modules. Randomness comes from ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng``,
    so the result is deterministic and the caller's CPU/CUDA RNG state is untouched.
    """
    targets = [m for m in module.modules() if next(m.parameters(recurse=False), None) is not None]
    if not targets:
        raise ValueError(f"{type(module).__name__} has no parameters to randomise")
    _randomise_targets(
        targets, seed=seed, init=init, reset_running_stats=reset_running_stats, device=module
    )


def _randomise_targets(
    targets: Sequence[nn.Module],
    *,
    seed: int,
    init: Init,
    reset_running_stats: bool,
    device: nn.Module,
) -> None:
    """Re-initialise the direct parameters of each of ``targets`` (see :func:`randomise_module`);
    ``device`` is the module whose CUDA RNG states are saved and restored."""
    if isinstance(init, str) and init not in ("reinit", "normal"):
        raise ValueError(f"init must be 'reinit', 'normal' or a callable, got {init!r}")
    if not isinstance(init, str) and not callable(init):
        raise TypeError(f"init must be 'reinit', 'normal' or a callable, got {type(init)}")
    initialise = {"reinit": _reinit_, "normal": _normal_}[init] if isinstance(init, str) else init
    with torch.random.fork_rng(devices=_cuda_devices(device)), torch.no_grad():
        torch.manual_seed(seed)
        for target in targets:
            kept = [
                (tensor, tensor.detach().clone())
                for child in target.children()
                for tensor in (*child.parameters(), *child.buffers())
            ]
            if not reset_running_stats:
                kept += [(b, b.detach().clone()) for b in target.buffers(recurse=False)]
            initialise(target)
            for tensor, saved in kept:
                tensor.copy_(saved)


def cascading_randomisation(
    model: nn.Module,
    order: Sequence[str] | None = None,
    *,
    seed: int = 0,
    init: Init = "reinit",
    reset_running_stats: bool = False,
    copy_each_step: bool = False,
) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(layer_name, randomised_model)`` cumulatively from the logits towards the input.

    Adebayo et al. (2018), Sec. 3.1 / Fig. 2: step ``k`` (1-based) yields a copy of ``model``
    whose first ``k`` layers of ``order`` are re-initialised — each step randomises exactly one
    more layer (or block) and leaves the already randomised ones as they were. ``order``
    defaults to :func:`default_randomisation_order` (reverse registration order: logits first).
    The unrandomised model (step 0) is not yielded; it is ``model`` itself. Layer ``k`` is
    randomised with a seed derived from ``(seed, k)``, so runs are reproducible and step ``k``
    randomises a layer exactly as :func:`independent_randomisation` does.

    The model is deep-copied once, when iteration starts, and ``model`` is never modified. By
    default the *same* copy is yielded at every step and mutated by the next step (cheap for
    large networks: compute what you need before advancing); with ``copy_each_step`` every
    yielded model is an independent copy.
    """
    yield from _randomised_steps(
        model, order, seed, init, reset_running_stats, copy_each_step, restore=False
    )


def independent_randomisation(
    model: nn.Module,
    order: Sequence[str] | None = None,
    *,
    seed: int = 0,
    init: Init = "reinit",
    reset_running_stats: bool = False,
    copy_each_step: bool = False,
) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(layer_name, model_with_only_that_layer_randomised)`` for each layer of ``order``.

    Adebayo et al. (2018), Sec. 3.1 "independent randomization": one layer at a time is
    re-initialised while all others keep the trained values. Same ``order``, seeds and
    randomisation as :func:`cascading_randomisation`; the working copy is restored from
    ``model`` after each step (yielded models are the same object unless ``copy_each_step``).
    """
    yield from _randomised_steps(
        model, order, seed, init, reset_running_stats, copy_each_step, restore=True
    )


def _randomised_steps(
    model: nn.Module,
    order: Sequence[str] | None,
    seed: int,
    init: Init,
    reset_running_stats: bool,
    copy_each_step: bool,
    restore: bool,
) -> Iterator[tuple[str, nn.Module]]:
    """The step loop of both tests on one working copy: randomise the step's layer, yield;
    with ``restore`` (independent randomisation) put its trained values back afterwards."""
    names = resolve_randomisation_order(model, order)
    working = copy.deepcopy(model)
    steps = zip(names, _step_targets(working, names), _step_seeds(seed, len(names)), strict=True)
    for name, targets, step_seed in steps:
        _randomise_targets(
            targets,
            seed=step_seed,
            init=init,
            reset_running_stats=reset_running_stats,
            device=working,
        )
        yield name, (copy.deepcopy(working) if copy_each_step else working)
        if restore:
            working.get_submodule(name).load_state_dict(model.get_submodule(name).state_dict())
