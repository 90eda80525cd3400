"""The sanity check of an evaluation: cascading randomisation (Adebayo et al. 2018; VAR
Fig. 6) of the explained network on the first gallery samples, every method and layer of the
run (:mod:`callbacks.evaluation.randomisation`)."""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from callbacks.evaluation.engine import INPUT_LAYER, _Combination
from contrastive_saliency.errors import ConfigurationError


class SanityCheck:
    """The sanity check's order, colours and run (mixed into
    :class:`callbacks.evaluation.SaliencyEvaluationCallback`; reads ``sanity_check``,
    ``method_specs``, ``combinations`` and the engine's ``_method_kwargs``)."""

    def _sanity_order(self, network: torch.nn.Module) -> list[str] | None:
        """The sanity check's randomisation order (``None``: every parameterised layer), checked
        against ``network``."""
        if self.sanity_check is None:
            return None
        from contrastive_saliency.metrics.functional import (
            grouped_randomisation_order,
            resolve_randomisation_order,
        )

        order, depth = self.sanity_check["order"], self.sanity_check["group_depth"]
        if depth is not None:
            order = grouped_randomisation_order(network, depth)
        try:
            return resolve_randomisation_order(network, order)
        except (TypeError, ValueError) as error:
            raise ConfigurationError(f"evaluation.sanity_check.order: {error}") from error

    def _sanity_bases(self) -> dict[str, str]:
        """Label of each method → label of the line it shares a colour with: a wrapper's
        (``base_option``: VAR's ``base``) plain base method in this run (same name and
        ``base_kwargs``), else itself."""
        import inspect

        from contrastive_saliency.methods import method_factory

        bases = {}
        for spec in self.method_specs:
            bases[spec.label] = spec.label
            factory = method_factory(spec.name)
            option = getattr(factory, "base_option", None)
            if option is None:
                continue
            base = spec.kwargs.get(option, inspect.signature(factory).parameters[option].default)
            if not isinstance(base, str):
                continue
            wrapped = dict(spec.kwargs.get("base_kwargs") or {})
            plain = [s for s in self.method_specs if s.name == base]
            plain.sort(key=lambda s: dict(s.kwargs) != wrapped)  # same options first
            if plain:
                bases[spec.label] = plain[0].label
        return bases

    def _run_sanity_check(self, pl_module: Any, gallery) -> pd.DataFrame | None:
        """Cascading randomisation of ``pl_module.network`` on the first gallery samples
        (:func:`callbacks.evaluation.randomisation.randomisation_curves`), every method and layer of the
        run, all configured measures in one pass."""
        if self.sanity_check is None or not gallery:
            return None
        from callbacks.evaluation.randomisation import randomisation_curves
        from contrastive_saliency.methods import create_method

        network = pl_module.network
        chosen = gallery[: self.sanity_check["samples"]]
        device = next(network.parameters()).device
        images = torch.stack([g["image"] for g in chosen]).to(device)
        fields = {
            name: torch.stack([g["fields"][name] for g in chosen]).to(device)
            for name in self._method_fields()
        }
        matrix = self._matrix

        def builder(combination: _Combination):
            kwargs = self._method_kwargs(combination.spec, matrix)
            layer = None if combination.layer == INPUT_LAYER else combination.layer
            bound = {name: fields[name] for name in combination.batch_fields}

            def build(model: torch.nn.Module):
                method = create_method(combination.spec.name, model, layer=layer, **kwargs)
                return lambda images, classes: method(images, classes, **bound)

            return build

        builders = {(c.spec.label, c.layer): builder(c) for c in self.combinations}
        curves = randomisation_curves(
            network, images, builders,
            measures=self.sanity_check["measures"], target=self.sanity_check["target"],
            order=self._sanity_order(network), max_steps=self.sanity_check["max_steps"],
            seed=self.sanity_check["seed"],
        )  # fmt: skip
        from contrastive_saliency.methods import method_factory

        wrappers = {
            spec.label: getattr(method_factory(spec.name), "base_option", None) is not None
            for spec in self.method_specs
        }
        source = getattr(pl_module, "source_name", None)
        architecture = type(network).__name__
        return curves.assign(
            base_method=curves["method"].map(self._sanity_bases()),
            wrapper=curves["method"].map(wrappers),
            model=f"{source} ({architecture})" if source else architecture,
        )
