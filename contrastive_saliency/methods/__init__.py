"""Saliency methods: ``create_method(name, model, layer=None, **kwargs)`` and ``list_methods()``.

Importing this package registers every method defined in its modules.
"""

from contrastive_saliency.methods import (  # noqa: F401  (registers the methods)
    attention_rollout,
    bidirectional_attention,
    caap,
    case,
    cluscam,
    deeplift,
    finer_cam,
    full_grad,
    grad_rollout,
    gradient_attributions,
    gradient_cams,
    gradient_shap,
    inflow,
    lrp,
    occlusion,
    reference_maps,
    rise,
    score_cams,
    simple_patching,
    transformer_attribution,
    transition_attention,
    var,
)
from contrastive_saliency.methods.base import SaliencyMethod
from contrastive_saliency.methods.registry import (
    create_method,
    list_methods,
    method_factory,
    method_options,
    register_method,
)

__all__ = [
    "SaliencyMethod",
    "create_method",
    "list_methods",
    "method_factory",
    "method_options",
    "register_method",
]
