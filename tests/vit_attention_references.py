"""Test-side references for the attention attributions of ViTs, written from the authors'
descriptions and public code: one image at a time, float64, with the attention
probabilities and their gradients recorded the way the authors' code records them (a hook on
the output of ``attn_drop`` of timm's non-fused attention path, and a tensor hook for its
gradient), and, for T-LRP, the LRP rules evaluated with autograd as the authors' ``relprop``
modules do (``Z = f(X)``, ``S = R / Z``, ``C = ∂Z/∂X · S``, ``R_X = X ⊙ C``)."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Recorder:
    """A float64 copy of a timm ViT that records, per block, the attention probabilities and
    the tensors the references need; ``run(image, cls)`` (``image`` ``[1, C, H, W]``)
    returns the logits and, with ``cls``, back-propagates ``logits[0, cls]``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = copy.deepcopy(model).double().eval()
        self.records: dict[int, dict[str, torch.Tensor]] = {}
        self.depth = len(self.model.blocks)
        for index, block in enumerate(self.model.blocks):
            block.attn.fused_attn = False
            block.register_forward_pre_hook(self._save(index, "tokens", input_=True))
            block.register_forward_hook(self._save(index, "output"))
            block.attn.qkv.register_forward_hook(self._save(index, "qkv_in", input_=True))
            block.attn.qkv.register_forward_hook(self._save(index, "qkv"))
            block.attn.attn_drop.register_forward_hook(self._attention(index))
            block.attn.proj.register_forward_hook(self._save(index, "merged", input_=True))
            block.attn.proj.register_forward_hook(self._save(index, "proj"))
            block.mlp.fc1.register_forward_hook(self._save(index, "fc1_in", input_=True))
            block.mlp.fc2.register_forward_hook(self._save(index, "hidden", input_=True))
            block.mlp.fc2.register_forward_hook(self._save(index, "mlp"))
        self.model.head.register_forward_hook(self._save(-1, "head_in", input_=True))

    def _save(self, index: int, key: str, input_: bool = False):
        def hook(module, args, output=None):
            self.records.setdefault(index, {})[key] = args[0] if input_ else output

        return hook

    def _attention(self, index: int):
        def hook(module, args, output):
            record = self.records.setdefault(index, {})
            record["attention"] = output
            output.register_hook(lambda grad: record.__setitem__("gradient", grad))

        return hook

    def run(self, image: torch.Tensor, cls: int | None = None) -> torch.Tensor:
        self.records = {}
        logits = self.model(image.double())
        if cls is not None:
            logits[0, cls].backward(retain_graph=True)
        return logits

    def attention(self, index: int) -> torch.Tensor:
        return self.records[index]["attention"][0].detach()

    def gradient(self, index: int) -> torch.Tensor:
        return self.records[index]["gradient"][0]


def grad_rollout(recorder: Recorder, image, cls: int, discard_ratio: float) -> torch.Tensor:
    """jacobgil/vit-explain's grad rollout, each block with its own gradient, rows normalised,
    the ``[0, 0]`` entry never discarded (the corrections the method's docstring lists)."""
    recorder.run(image, cls)
    tokens = recorder.attention(0).shape[-1]
    result = torch.eye(tokens, dtype=torch.float64)
    for index in range(recorder.depth):
        fused = (recorder.attention(index) * recorder.gradient(index)).mean(0)
        fused[fused < 0] = 0
        count = int(tokens * tokens * discard_ratio)
        if count:
            flat = fused.flatten().clone()
            order = [i for i in np.argsort(flat.numpy(), kind="stable") if i != 0][:count]
            flat[order] = 0
            fused = flat.view(tokens, tokens)
        step = (fused + torch.eye(tokens, dtype=torch.float64)) / 2
        step = step / step.sum(dim=-1, keepdim=True)
        result = step @ result
    return result[0, 1:]


def integrated_last_gradient(recorder: Recorder, image, cls: int, steps: int) -> torch.Tensor:
    """``(1/S) Σ_{α ∈ np.linspace(0, 1, S)} ∂y_c(αx)/∂A_{L−1}(αx)``, ``[H, T, T]``."""
    total = 0
    for alpha in np.linspace(0, 1, steps):
        recorder.run(image * alpha, cls)
        total = total + recorder.gradient(recorder.depth - 1)
    return total / steps


def transition_attention(recorder: Recorder, image, cls: int, start_layer: int, steps: int):
    """XianrenYty/Transition_Attention_Maps ``transition_attention_maps`` for one image."""
    recorder.run(image, cls)
    last = recorder.depth - 1
    states = recorder.attention(last).mean(0)[0:1]
    for index in range(start_layer, last)[::-1]:
        states = states @ recorder.attention(index).mean(0) + states
    weights = integrated_last_gradient(recorder, image, cls, steps).clamp(min=0).mean(0)[0:1]
    return (states * weights)[0, 1:]


def bidirectional_attention(recorder: Recorder, image, cls: int, start_layer: int, steps: int):
    """jiaminchen-1031/transformerinterp ``generate_ours`` for one image (their 1-based-ish
    ``start_layer``: blocks with index ≥ start_layer − 1 are used)."""
    recorder.run(image, cls)
    attention = recorder.attention(0)
    heads, tokens = attention.shape[0], attention.shape[-1]
    relevance = torch.eye(tokens, dtype=torch.float64)
    for index in range(recorder.depth):
        if index < start_layer - 1:
            continue
        cam, grad = recorder.attention(index), recorder.gradient(index)
        importance = torch.mean(torch.matmul(cam.transpose(-1, -2), grad).abs(), dim=(-1, -2))
        importance = importance / importance.sum()
        cam = torch.matmul(importance, cam.reshape(heads, -1)).reshape(tokens, tokens)
        relevance = relevance + cam @ relevance
    weights = integrated_last_gradient(recorder, image, cls, steps).clamp(min=0).mean(0)
    return (weights * relevance)[0, 1:]


# ------------------------------------------------------------------ T-LRP (Chefer et al.)
def safe_divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The authors' ``safe_divide``."""
    den = b.clamp(min=1e-9) + b.clamp(max=1e-9)
    den = den + den.eq(0).type(den.type()) * 1e-9
    return a / den * b.ne(0).type(b.type())


def _leaf(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().clone().requires_grad_()


def z_rule(function, inputs: list[torch.Tensor], relevance: torch.Tensor) -> list[torch.Tensor]:
    """``RelPropSimple``: ``R_X = X ⊙ ∂Z/∂X · (R / Z)`` for each input X of ``Z = f(X…)``."""
    leaves = [_leaf(x) for x in inputs]
    output = function(*leaves)
    contributions = torch.autograd.grad(output, leaves, safe_divide(relevance, output))
    return [leaf.detach() * c for leaf, c in zip(leaves, contributions, strict=True)]


def linear_rule(inputs: torch.Tensor, weight: torch.Tensor, relevance: torch.Tensor):
    """The authors' ``Linear.relprop`` with alpha = 1 (beta = 0)."""
    positive_w, negative_w = weight.detach().clamp(min=0), weight.detach().clamp(max=0)
    positive_x, negative_x = _leaf(inputs.clamp(min=0)), _leaf(inputs.clamp(max=0))
    z1, z2 = F.linear(positive_x, positive_w), F.linear(negative_x, negative_w)
    scaled = safe_divide(relevance, z1 + z2)
    c1 = positive_x * torch.autograd.grad(z1, positive_x, scaled)[0]
    c2 = negative_x * torch.autograd.grad(z2, negative_x, scaled)[0]
    return (c1 + c2).detach()


def add_rule(first: torch.Tensor, second: torch.Tensor, relevance: torch.Tensor):
    """The authors' ``Add.relprop``: the z-rule, each part rescaled to its share of Σ R."""
    a, b = z_rule(lambda x, y: x + y, [first, second], relevance)
    a_sum, b_sum = a.sum(), b.sum()
    a_fact = safe_divide(a_sum.abs(), a_sum.abs() + b_sum.abs()) * relevance.sum()
    b_fact = safe_divide(b_sum.abs(), a_sum.abs() + b_sum.abs()) * relevance.sum()
    return a * safe_divide(a_fact, a.sum()), b * safe_divide(b_fact, b.sum())


def clone_rule(inputs: torch.Tensor, relevances: list[torch.Tensor]) -> torch.Tensor:
    """The authors' ``Clone.relprop``: ``X ⊙ Σ_i R_i / X``."""
    return inputs.detach() * sum(safe_divide(r, inputs.detach()) for r in relevances)


def _qkv_weight(module: nn.Module) -> torch.Tensor:
    """timm's fused qkv weight, or the stacked query/key/value weights of a Hugging Face ViT."""
    if isinstance(module, nn.Linear):
        return module.weight
    return torch.cat([module.query.weight, module.key.weight, module.value.weight])


def attention_relevances(recorder: Recorder, cls: int) -> list[torch.Tensor]:
    """The authors' ``VisionTransformer.relprop`` down the blocks (after ``run``): the halved
    relevance of every block's attention (``attn_cam``), first block first."""
    model = recorder.model
    classes = model.head.weight.shape[0]
    relevance = F.one_hot(torch.tensor([cls]), classes).double()
    head_in = recorder.records[-1]["head_in"]
    relevance = linear_rule(head_in, model.head.weight, relevance)
    normed = model.norm(recorder.records[recorder.depth - 1]["output"])
    (relevance,) = z_rule(lambda x: x[:, 0], [normed], relevance)  # IndexSelect; norm: identity
    found = []
    for index in reversed(range(recorder.depth)):
        record, block = recorder.records[index], model.blocks[index]
        tokens, merged_out = record["tokens"], record["proj"]
        middle = tokens + merged_out
        relevance_middle, relevance_mlp = add_rule(middle, record["mlp"], relevance)
        relevance_mlp = linear_rule(record["hidden"], block.mlp.fc2.weight, relevance_mlp)
        relevance_mlp = linear_rule(record["fc1_in"], block.mlp.fc1.weight, relevance_mlp)
        relevance = clone_rule(middle, [relevance_middle, relevance_mlp])
        relevance_tokens, relevance_attn = add_rule(tokens, merged_out, relevance)
        relevance_attn = linear_rule(record["merged"], block.attn.proj.weight, relevance_attn)
        heads = block.attn.num_heads
        batch, length, _ = relevance_attn.shape
        relevance_attn = relevance_attn.reshape(batch, length, heads, -1).permute(0, 2, 1, 3)
        qkv = record["qkv"].reshape(batch, length, 3, heads, -1).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)
        attention = record["attention"]
        cam, cam_v = z_rule(
            lambda a, v: torch.einsum("bhij,bhjd->bhid", a, v), [attention, value], relevance_attn
        )
        cam, cam_v = cam / 2, cam_v / 2
        found.append(cam[0])
        cam_q, cam_k = z_rule(lambda q, k: torch.einsum("bhid,bhjd->bhij", q, k), [query, key], cam)
        cam_q, cam_k = cam_q / 2, cam_k / 2
        cam_qkv = (
            torch.stack([cam_q, cam_k, cam_v]).permute(1, 3, 0, 2, 4).reshape(batch, length, -1)
        )
        relevance_qkv = linear_rule(record["qkv_in"], _qkv_weight(block.attn.qkv), cam_qkv)
        relevance = clone_rule(tokens, [relevance_tokens, relevance_qkv])
    return found[::-1]


def transformer_attribution(recorder: Recorder, image, cls: int, start_layer: int = 0):
    """hila-chefer/Transformer-Explainability ``relprop(method="transformer_attribution")``
    for one image: ``Π (I + mean_h (∇A ⊙ R_A)⁺)`` from ``start_layer``, class-token row."""
    recorder.run(image, cls)
    relevances = attention_relevances(recorder, cls)
    tokens = relevances[0].shape[-1]
    eye = torch.eye(tokens, dtype=torch.float64)
    cams = [
        (recorder.gradient(i) * relevances[i]).clamp(min=0).mean(dim=0) + eye
        for i in range(recorder.depth)
    ]
    joint = cams[start_layer]
    for cam in cams[start_layer + 1 :]:
        joint = cam @ joint
    return joint[0, 1:]


# ------------------------------------------------------------------ InFlow (Walker et al.)
def inflow(recorder: Recorder, image, cls: int) -> torch.Tensor:
    """chasewalker26/InFlow-ViT-Explanation ``generate_InFlow`` (withgrad=True) and
    ``compute_InFlow`` (ablate=0) for one image."""
    model = recorder.model
    recorder.run(image, cls)
    heads = model.blocks[0].attn.num_heads
    matrices = []
    for index in range(recorder.depth):
        record = recorder.records[index]
        attention_heads = record["attention"]
        grad = record["gradient"]
        grad_t = grad.reshape(-1, grad.shape[-2], grad.shape[-1])
        attn_t = attention_heads.detach().reshape(-1, grad.shape[-2], grad.shape[-1])
        importance = torch.mean(torch.matmul(attn_t.transpose(-1, -2), grad_t).abs(), dim=(-1, -2))
        importance = importance / importance.sum()
        max_heads = torch.max(attention_heads.detach() * importance.reshape(1, heads, 1, 1), 1)[0]
        block_logits = model.head(model.norm(record["output"])[:, 0])
        gradient = torch.autograd.grad(block_logits[0, cls], attention_heads, retain_graph=True)[0][
            0
        ]
        max_heads = (gradient.mean(dim=0, keepdim=True) * max_heads).clamp(0)[0]
        tokens = record["tokens"][0].detach()
        attn_out = record["proj"][0].detach()
        middle = tokens + attn_out
        mlp = record["mlp"][0].detach()
        first = F.normalize(torch.stack((tokens.norm(dim=1), attn_out.norm(dim=1))), p=1, dim=0)
        second = F.normalize(torch.stack((middle.norm(dim=1), mlp.norm(dim=1))), p=1, dim=0)
        resid_1 = max_heads * first[1].reshape(1, -1) + torch.diag(first[0])
        ratio = F.normalize(second[1] / second[0], p=1, dim=-1)
        resid_2 = torch.diag(ratio) * torch.diag(second[1]) + torch.diag(second[0])
        matrix = resid_1 @ resid_2
        matrices.append(matrix / matrix.sum(dim=-1, keepdim=True))
    joint = matrices[0]
    for matrix in matrices[1:]:
        joint = matrix @ joint
    return joint[0, 1:]
