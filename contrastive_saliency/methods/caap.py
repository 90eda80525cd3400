"""CAAP: Causal Attribution via Activation Patching (Izadi et al., ``caap.md``) for timm ViTs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.functional import gaussian_blur

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.gradients import _check_classes
from contrastive_saliency.methods.base import SaliencyMethod
from contrastive_saliency.methods.registry import register_method
from contrastive_saliency.vit_blocks import (
    block_inputs,
    check_vision_transformer,
    class_token_logits,
    embed,
    evaluating,
    finish_block,
    patch_grid,
    query_key_value,
)

Mode = Literal["parallel", "loop"]
Prototype = Literal["mean", "weighted"]
SELECTIONS = ("none", "box1", "box2", "manhattan")
NAMED_BLANKS = ("zeros", "white", "black", "noisy", "blur_noisy")
NOISE_BLUR = (11, 5.0)  # blur_noisy's Gaussian (kernel, σ): the insertion blur (RISE; PROTOCOLS.md)

BlankSpec = str | float | Sequence[float] | torch.Tensor


class BlankContext:
    """The blank image ``x_0`` of CAAP and of its input-level baselines (``simple_insertion``,
    ``simple_deletion``): the ``blank`` option (see :class:`CAAP`), the images'
    ``normalisation`` and the noise blanks' ``noise_std`` / ``noise_seed``."""

    blank_owner: str = "caap"

    def _init_blank(
        self,
        blank: BlankSpec,
        normalisation: tuple[Sequence[float], Sequence[float]] | None,
        noise_std: float,
        noise_seed: int,
    ) -> None:
        self.blank = check_blank(blank)
        self.normalisation = check_normalisation(normalisation)
        if isinstance(self.blank, str) and self.blank in ("white", "black", "blur_noisy"):
            self._pixel_statistics()  # a pixel colour without a normalisation fails now
        if isinstance(noise_std, bool) or not isinstance(noise_std, int | float) or noise_std <= 0:
            raise ConfigurationError(
                f"{self.blank_owner} noise_std is the noise blanks' standard deviation in "
                f"normalised space, a positive number; got {noise_std!r}"
            )
        if isinstance(noise_seed, bool) or not isinstance(noise_seed, int):
            raise ConfigurationError(
                f"{self.blank_owner} noise_seed must be an integer, got {noise_seed!r}"
            )
        self.noise_std = float(noise_std)
        self.noise_seed = noise_seed

    def _blank_image(self, images: torch.Tensor) -> torch.Tensor:
        """``x_0`` as ``[1 or B, C, H, W]`` in the images' normalised space."""
        batch, channels, height, width = images.shape
        options = {"device": images.device, "dtype": images.dtype}
        if isinstance(self.blank, str):
            if self.blank == "zeros":
                return torch.zeros(1, channels, height, width, **options)
            if self.blank in ("noisy", "blur_noisy"):
                return self._noise_blank(channels, height, width).to(**options)
            mean, std = self._pixel_statistics()
            pixel = 1.0 if self.blank == "white" else 0.0
            mean = torch.as_tensor(mean, **options)
            std = torch.as_tensor(std, **options)
            colour = (pixel - mean) / std
        else:
            colour = self.blank.to(**options)
        if colour.dim() == 0:
            colour = colour.expand(1, channels, height, width)
        elif colour.dim() == 1:
            colour = colour.view(1, -1, 1, 1).expand(1, -1, height, width)
        elif colour.dim() == 3:
            colour = colour.unsqueeze(0)
        if (
            colour.dim() != 4
            or colour.shape[0] not in (1, batch)
            or colour.shape[1:] != (channels, height, width)
        ):
            raise ConfigurationError(
                f"{self.blank_owner} blank has shape {tuple(colour.shape)}; for images "
                f"{tuple(images.shape)} use [{channels}], [{channels}, {height}, {width}] or "
                f"[1 or {batch}, {channels}, {height}, {width}]"
            )
        return colour

    def _noise_blank(self, channels: int, height: int, width: int) -> torch.Tensor:
        """``[1, C, H, W]`` (float32, CPU): the ``noisy`` or ``blur_noisy`` blank."""
        generator = torch.Generator().manual_seed(self.noise_seed)
        noise = torch.randn(1, channels, height, width, generator=generator) * self.noise_std
        if self.blank == "noisy":
            return noise
        mean, std = self._pixel_statistics()
        white = (1.0 - torch.as_tensor(mean, dtype=torch.float32)) / torch.as_tensor(
            std, dtype=torch.float32
        )
        kernel, sigma = NOISE_BLUR
        return gaussian_blur(white.view(1, -1, 1, 1) + noise, [kernel, kernel], [sigma, sigma])

    def _pixel_statistics(self) -> tuple[Sequence[float], Sequence[float]]:
        """The images' ``(mean, std)``: ``normalisation``, else the model's pretrained_cfg."""
        if self.normalisation is not None:
            return self.normalisation
        model = getattr(self, "vit", self.model)
        config = getattr(model, "pretrained_cfg", None) or {}
        if "mean" in config and "std" in config:
            return config["mean"], config["std"]
        raise ConfigurationError(
            f"blank={self.blank!r} is a pixel colour: it needs the images' normalisation, and "
            f"{type(model).__name__} carries no pretrained_cfg 'mean' and 'std'; pass "
            f"normalisation=(mean, std), blank='zeros', or the blank colour in normalised "
            f"space as a tensor"
        )


@register_method("caap")
class CAAP(BlankContext, SaliencyMethod):
    """CAAP (``caap.md`` Alg. 1, Eqs. 1–3, Sec. 3.1–3.3, App. B.1) on timm ViTs.

    For every patch ``p`` the patched context ``c*(p)`` takes the source image's activations
    at the tokens ``S(p)`` and the blank image's elsewhere in the intervened layers (Eq. 2),
    and the map is ``A(p) = f(c*(p))_y`` (Eq. 3) for every requested class ``y``, on the
    ``[h, w]`` patch grid (the base class upsamples it bilinearly).

    Layers (Sec. 3.2): ``h^l`` is the residual stream after block ``l`` (1-based; ``h^0`` the
    embedded tokens entering block 1). ``layers=(l_s, l_e)`` patches ``h^l`` for
    ``l_s ≤ l ≤ l_e`` (``0 ≤ l_s ≤ l_e ≤ L``); the default is ``(1, ⌈2L/3⌉)``, "from the
    beginning up to ⌈2L/3⌉". Following Alg. 1 literally: the blank tokens keep the blank
    image's activations at every layer; the class token is propagated by blocks
    ``l_s+1 … L`` (so ``h^{l_s}`` holds the blank image's class token); the tokens ``S(p)``
    hold the source's activations up to ``h^{l_e}`` and are propagated by blocks
    ``l_e+1 … L``. Register tokens are not patches: they keep the blank image's activations.
    With every patch selected and ``layers=(0, L)`` the score is the model's own logit on the
    source image; with no patch selected it is the blank image's logit.

    Selection ``S(p)`` (Sec. 3.1): ``"none"`` (the patch), ``"box1"`` (radius-1 box, 3×3,
    default), ``"box2"`` (5×5), ``"manhattan"`` (radius-1 Manhattan), clipped at the border,
    or a boolean ``[N, N]`` tensor whose row ``p`` marks ``S(p)`` (N patches, row-major).

    Blank ``x_0`` (Sec. 4.4, "We use White blanks as the default setting in all experiments"):
    ``"white"`` (default) / ``"black"``, pixel value 1 / 0 in the images' normalised space,
    ``(pixel − mean) / std`` with ``normalisation=(mean, std)``, the statistics the images were
    normalised with (``evaluate.py`` passes the datamodule's), else the model's
    ``pretrained_cfg`` mean/std; ``"zeros"`` (zeros in normalised space, i.e. the
    normalisation's mean colour: the paper's "Mean" blank of Fig. 4), or a constant, a colour
    ``[C]`` or an image ``[C, H, W]``/``[1 or B, C, H, W]`` in normalised space.

    ``mode="loop"`` is Alg. 1 as written: one patched sequence per patch (a batch of
    ``patch_batch_size`` patches at a time), run through the model's own blocks, with the
    patched and blank activations written back after every block. ``mode="parallel"``
    (Sec. 3.3.1) computes the same scores with one extra class token per patch: in blocks
    ``l_s+1 … l_e`` class token ``p`` attends to itself, to the source tokens in ``S(p)`` and
    to the blank tokens elsewhere (SDPA with a boolean mask; class tokens do not attend to
    each other); in blocks ``l_e+1 … L`` each class token and its own copies of the tokens
    ``S(p)`` are propagated as one group attending to the group and to the blank tokens
    outside ``S(p)`` (Sec. 3.3.1 says only the class tokens are propagated; Alg. 1 and Sec. 3
    also propagate ``S(p)``, which the copies do, so both forms give the same map). Keys and
    values of source and blank tokens come from their cached
    activations (Sec. 3.3), computed once per call. ``patch_batch_size`` patches are scored
    at a time in either mode (``None``: all at once); it bounds memory, not the result.
    Cost (vit_tiny, 224², box1, CPU): the loop runs ~N full forwards, the parallel form
    ~8 forward-equivalents, mostly the MLPs of the propagated groups.

    ``precompute_blank=True`` (E-CAAP, Sec. 3.3.2, App. B.1 Eqs. 8–9; parallel mode only), an
    approximation: in blocks ``l_s+1 … l_e`` the blank tokens outside ``S(p)`` enter each class
    token's softmax as one term with weight ``Z_0 = Σ_j exp(⟨q_CLS^{c'}, k_{0,j}⟩/√d)``
    computed with the BLANK image's class-token query, and value ``v̄_0``: the plain mean of
    their values (``blank_prototype="mean"``, Eq. 9) or their softmax-weighted mean under that
    query (``"weighted"``, the "aggregated contribution" of Sec. 3.3.2; exact when the class
    token's query equals the blank one, e.g. with nothing selected). Blank statistics are
    recomputed per call, never cached across calls (the weights may change between calls).
    Here it saves little time: attention to blank tokens is a small part of the parallel
    form's cost (``benchmarks/caap_throughput.py`` measures both time and deviation).

    Everything runs under ``torch.no_grad`` in eval mode; the model's mode is restored.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | None = None,
        mode: Mode = "parallel",
        selection: str | torch.Tensor = "box1",
        layers: tuple[int, int] | None = None,
        blank: BlankSpec = "white",
        patch_batch_size: int | None = None,
        precompute_blank: bool = False,
        blank_prototype: Prototype = "mean",
        normalisation: tuple[Sequence[float], Sequence[float]] | None = None,
        noise_std: float = 1.0,
        noise_seed: int = 0,
    ) -> None:
        super().__init__(model)
        if layer is not None:
            raise ConfigurationError(
                f"caap intervenes on a range of blocks, not one layer: got layer={layer!r}; "
                f"use layers=(first, last) (paper layer indices, default (1, ceil(2L/3)))"
            )
        vit = check_vision_transformer(model, "caap")
        if not vit.has_class_token or vit.global_pool != "token" or vit.attn_pool is not None:
            raise ConfigurationError(
                f"caap reads the score from the class token (caap.md Sec. 3.3.1), so it needs "
                f"a timm ViT with class_token=True and global_pool='token'; got "
                f"class_token={vit.has_class_token}, global_pool={vit.global_pool!r}"
            )
        if mode not in ("parallel", "loop"):
            raise ConfigurationError(f"caap mode must be 'parallel' or 'loop', got {mode!r}")
        if isinstance(selection, str) and selection not in SELECTIONS:
            raise ConfigurationError(
                f"caap selection must be one of {', '.join(SELECTIONS)} or a boolean [N, N] "
                f"tensor, got {selection!r}"
            )
        if isinstance(selection, torch.Tensor) and (
            selection.dtype != torch.bool or selection.dim() != 2
        ):
            raise ConfigurationError(
                f"a caap selection tensor must be boolean [N, N] (row p marks S(p)), got "
                f"{selection.dtype} of shape {tuple(selection.shape)}"
            )
        if patch_batch_size is not None and patch_batch_size < 1:
            raise ConfigurationError(
                f"patch_batch_size must be a positive integer or None (all patches at once), "
                f"got {patch_batch_size}"
            )
        if precompute_blank and mode != "parallel":
            raise ConfigurationError(
                "precompute_blank=True approximates the parallel form's attention to blank "
                "tokens; it needs mode='parallel' (the loop is the exact reference)"
            )
        if blank_prototype not in ("mean", "weighted"):
            raise ConfigurationError(
                f"blank_prototype must be 'mean' (App. B.1 Eq. 9) or 'weighted', got "
                f"{blank_prototype!r}"
            )
        self.vit = vit
        self.mode = mode
        self.selection = selection
        self.layers = check_layers(layers, len(vit.blocks))
        self._init_blank(blank, normalisation, noise_std, noise_seed)
        self.patch_batch_size = patch_batch_size
        self.precompute_blank = precompute_blank
        self.blank_prototype = blank_prototype

    def compute(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        classes = classes.to(images.device)
        with evaluating(self.vit):
            _check_classes(classes, self.vit.num_classes)
            grid = patch_grid(self.vit, images)
            selected = self._selection_matrix(grid, images.device)
            depth = len(self.vit.blocks)
            source = block_inputs(self.vit, embed(self.vit, images), self.layers[1])
            blank = block_inputs(self.vit, embed(self.vit, self._blank_image(images)), depth)
            prefix = self.vit.num_prefix_tokens
            if source[0].shape[1] != prefix + grid[0] * grid[1]:
                raise ConfigurationError(
                    f"caap: the model embeds {source[0].shape[1]} tokens, expected {prefix} "
                    f"prefix tokens + a {grid[0]}x{grid[1]} patch grid"
                )
            runner = _LoopRunner if self.mode == "loop" else _ParallelRunner
            run = runner(self, source, blank, classes)
            patches = selected.shape[0]
            chunk = self.patch_batch_size or patches
            scores = torch.cat(
                [run(selected[start : start + chunk]) for start in range(0, patches, chunk)],
                dim=1,
            )  # [B, N, K]
        return scores.transpose(1, 2).reshape(images.shape[0], classes.shape[1], *grid)

    def _selection_matrix(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        patches = grid[0] * grid[1]
        if isinstance(self.selection, str):
            return selection_matrix(self.selection, grid).to(device)
        if self.selection.shape != (patches, patches):
            raise ConfigurationError(
                f"caap selection tensor has shape {tuple(self.selection.shape)}; this input "
                f"has a {grid[0]}x{grid[1]} patch grid, so it must be [{patches}, {patches}]"
            )
        return self.selection.to(device)


def check_layers(layers: tuple[int, int] | None, depth: int) -> tuple[int, int]:
    """``(l_s, l_e)`` with ``0 ≤ l_s ≤ l_e ≤ L``; ``None`` gives ``(1, ⌈2L/3⌉)`` (Sec. 3.2)."""
    if layers is None:
        return 1, math.ceil(2 * depth / 3)
    if (
        len(layers) != 2
        or not all(isinstance(value, int) for value in layers)
        or not 0 <= layers[0] <= layers[1] <= depth
    ):
        raise ConfigurationError(
            f"caap layers must be (first, last) with 0 <= first <= last <= {depth} (paper "
            f"layer indices: h^l is the output of block l, h^0 the embedding), got {layers!r}"
        )
    return int(layers[0]), int(layers[1])


def check_normalisation(
    normalisation: tuple[Sequence[float], Sequence[float]] | None,
) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``(mean, std)`` per channel, std > 0, or None."""
    if normalisation is None:
        return None
    try:
        mean, std = (tuple(float(v) for v in values) for values in normalisation)
    except (TypeError, ValueError) as error:
        raise ConfigurationError(
            f"caap normalisation must be (mean, std), two sequences of per-channel numbers, "
            f"got {normalisation!r}"
        ) from error
    if len(mean) != len(std) or not mean or min(std) <= 0:
        raise ConfigurationError(
            f"caap normalisation needs a mean and a positive std per channel, got mean {mean}, "
            f"std {std}"
        )
    return mean, std


def check_blank(blank: BlankSpec) -> str | torch.Tensor:
    """A named blank or a float tensor (a colour or an image in normalised space)."""
    if isinstance(blank, str):
        if blank not in NAMED_BLANKS:
            raise ConfigurationError(
                f"caap blank must be one of {', '.join(NAMED_BLANKS)}, a colour [C] or an image "
                f"[C, H, W] / [B, C, H, W] in normalised space, got {blank!r}"
            )
        return blank
    if isinstance(blank, int | float):
        return torch.tensor(float(blank))
    tensor = torch.as_tensor(blank, dtype=torch.float32) if not torch.is_tensor(blank) else blank
    if not tensor.is_floating_point() or tensor.dim() not in (0, 1, 3, 4):
        raise ConfigurationError(
            f"caap blank tensor must be floating point of shape [], [C], [C, H, W] or "
            f"[B, C, H, W], got {tensor.dtype} of shape {tuple(tensor.shape)}"
        )
    return tensor


def selection_matrix(operator: str, grid: tuple[int, int]) -> torch.Tensor:
    """Boolean ``[N, N]``: row ``p`` marks ``S(p)`` on the row-major ``h × w`` grid (Sec. 3.1).

    ``none``: ``q = p``; ``box1``/``box2``: ``max(|Δr|, |Δc|) ≤ 1 / 2``; ``manhattan``:
    ``|Δr| + |Δc| ≤ 1``.
    """
    height, width = grid
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    row_distance = (rows[:, None] - rows[None, :]).abs()
    col_distance = (cols[:, None] - cols[None, :]).abs()
    if operator == "none":
        return (row_distance == 0) & (col_distance == 0)
    if operator == "box1":
        return torch.maximum(row_distance, col_distance) <= 1
    if operator == "box2":
        return torch.maximum(row_distance, col_distance) <= 2
    if operator == "manhattan":
        return row_distance + col_distance <= 1
    raise ConfigurationError(f"unknown selection operator {operator!r}; use {SELECTIONS}")


class _Runner:
    """Scores ``[B, n, K]`` of a chunk of patches given the cached source states ``X_0 …
    X_{l_e}`` and blank states ``X_0 … X_L`` (``X_b`` enters block ``b+1``)."""

    def __init__(
        self,
        caap: CAAP,
        source: list[torch.Tensor],
        blank: list[torch.Tensor],
        classes: torch.Tensor,
    ) -> None:
        self.caap = caap
        self.vit = caap.vit
        self.first, self.last = caap.layers
        self.source = source
        self.blank = blank
        self.classes = classes
        self.batch = source[0].shape[0]
        self.prefix = self.vit.num_prefix_tokens

    def scores(self, class_tokens: torch.Tensor) -> torch.Tensor:
        """``[B, n, D]`` final class-token states → ``[B, n, K]`` requested logits."""
        batch, patches, _ = class_tokens.shape
        logits = class_token_logits(self.vit, class_tokens.flatten(0, 1)).view(batch, patches, -1)
        return logits.gather(2, self.classes[:, None, :].expand(-1, patches, -1))

    def blank_keys_allowed(self, selected: torch.Tensor) -> torch.Tensor:
        """``[n, T]``: the blank tokens a patched sequence keeps, i.e. registers and patches
        outside ``S(p)``; the blank class token is replaced by the propagated one."""
        patches = selected.shape[0]
        registers = torch.ones(patches, self.prefix - 1, dtype=torch.bool, device=selected.device)
        cls = torch.zeros(patches, 1, dtype=torch.bool, device=selected.device)
        return torch.cat([cls, registers, ~selected], dim=1)


class _LoopRunner(_Runner):
    """Alg. 1 as written: the full patched sequence of each patch through the model's blocks."""

    def __call__(self, selected: torch.Tensor) -> torch.Tensor:
        prefix = selected.new_zeros(selected.shape[0], self.prefix)
        from_source = torch.cat([prefix, selected], dim=1)[None, :, :, None]  # [1, n, T, 1]
        is_cls = torch.zeros_like(from_source)
        is_cls[:, :, 0] = True
        tokens = torch.where(
            from_source, self.source[self.first][:, None], self.blank[self.first][:, None]
        ).expand(self.batch, -1, -1, -1)  # [B, n, T, D]
        depth = len(self.vit.blocks)
        for index in range(self.first, depth):
            shape = tokens.shape
            out = self.vit.blocks[index](tokens.reshape(-1, *shape[2:])).view(shape)
            following = index + 1
            if following == depth:
                return self.scores(out[:, :, 0])
            patched = self.source[following][:, None] if following <= self.last else out
            tokens = torch.where(
                is_cls, out, torch.where(from_source, patched, self.blank[following][:, None])
            )
        # l_s = L: nothing is propagated; the score is the blank image's.
        return self.scores(tokens[:, :, 0])


class _ParallelRunner(_Runner):
    """Sec. 3.3.1: one class token per patch, masked attention over cached keys and values."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        blocks = self.vit.blocks
        # Keys/values of the cached source patch tokens (intervened blocks) and blank tokens.
        self.source_kv = {
            b: query_key_value(blocks[b].attn, blocks[b].norm1(self.source[b][:, self.prefix :]))
            for b in range(self.first, self.last)
        }
        self.blank_qkv = {
            b: query_key_value(blocks[b].attn, blocks[b].norm1(self.blank[b]))
            for b in range(self.first, len(blocks))
        }

    def __call__(self, selected: torch.Tensor) -> torch.Tensor:
        patches = selected.shape[0]
        class_tokens = self.blank[self.first][:, :1].expand(self.batch, patches, -1)
        blank_allowed = self.blank_keys_allowed(selected)
        for index in range(self.first, self.last):
            class_tokens = self._class_token_block(index, class_tokens, selected, blank_allowed)
        return self.scores(self._propagate_groups(class_tokens, selected, blank_allowed))

    def _class_token_block(
        self,
        index: int,
        class_tokens: torch.Tensor,
        selected: torch.Tensor,
        blank_allowed: torch.Tensor,
    ) -> torch.Tensor:
        """Block ``index+1`` (1-based) for the class tokens ``[B, n, D]`` of ``n`` patches."""
        block = self.vit.blocks[index]
        normed = block.norm1(class_tokens)
        query, key, value = query_key_value(block.attn, normed)  # [B, H, n, d]
        source_key, source_value = self.source_kv[index][1:]
        own = torch.eye(selected.shape[0], dtype=torch.bool, device=selected.device)
        if self.caap.precompute_blank:
            blank_key, blank_value, log_z = self._blank_prototype(index, blank_allowed)
            # Additive mask [Bb, H, n, n + N + n]: 0 where allowed, log Z_0 on the diagonal
            # of the prototype columns (patch p's own blank term), -inf elsewhere.
            minus_inf = torch.tensor(float("-inf"), dtype=query.dtype, device=query.device)
            dynamic = torch.cat([own, selected], dim=1)
            dynamic = torch.where(dynamic, torch.zeros_like(minus_inf), minus_inf)
            prototype = torch.where(own, log_z.unsqueeze(-1), minus_inf)  # [Bb, H, n, n]
            mask = torch.cat([dynamic.expand(*prototype.shape[:2], -1, -1), prototype], dim=-1)
            blank_key = blank_key.expand(self.batch, -1, -1, -1)
            blank_value = blank_value.expand(self.batch, -1, -1, -1)
        else:
            _, blank_key, blank_value = self.blank_qkv[index]
            blank_key = blank_key.expand(self.batch, -1, -1, -1)
            blank_value = blank_value.expand(self.batch, -1, -1, -1)
            mask = torch.cat([own, selected, blank_allowed], dim=1)  # [n, n + N + T]
        keys = torch.cat([key, source_key, blank_key], dim=2)
        values = torch.cat([value, source_value, blank_value], dim=2)
        attended = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, scale=block.attn.scale
        )
        return finish_block(block, class_tokens, attended, normed)

    def _blank_prototype(
        self, index: int, blank_allowed: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """App. B.1: per patch and head, ``log Z_0`` (Eq. 8) as an additive bias on a zero key
        whose value is the blank prototype ``v̄_0`` (Eq. 9, or the softmax-weighted mean)."""
        query, key, value = self.blank_qkv[index]  # [Bb, H, T, d]
        scale = self.vit.blocks[index].attn.scale
        logits = torch.einsum("bhd,bhtd->bht", query[:, :, 0], key) * scale  # blank CLS query
        logits = logits[:, :, None, :].masked_fill(~blank_allowed, float("-inf"))  # [Bb,H,n,T]
        log_z = torch.logsumexp(logits, dim=-1)  # [Bb, H, n]
        if self.caap.blank_prototype == "weighted":
            weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # empty set: no weight
        else:
            allowed = blank_allowed.to(value.dtype)
            weights = (allowed / allowed.sum(-1, keepdim=True).clamp_min(1.0)).expand_as(logits)
        prototype = weights @ value  # [Bb, H, n, d]
        return torch.zeros_like(prototype), prototype, log_z

    def _propagate_groups(
        self, class_tokens: torch.Tensor, selected: torch.Tensor, blank_allowed: torch.Tensor
    ) -> torch.Tensor:
        """Blocks ``l_e+1 … L``: each class token with its own copies of ``S(p)`` (from the
        source's ``h^{l_e}``), one group per patch in the batch dimension; returns the final
        class tokens ``[B, n, D]``."""
        patches = selected.shape[0]
        members = int(selected.sum(1).max()) if selected.numel() else 0
        # Indices of S(p), padded to the largest set; padding is masked out as a key.
        order = torch.sort(selected.to(torch.int8), dim=1, descending=True, stable=True)
        index, valid = order.indices[:, :members], order.values[:, :members].bool()
        copies = self.source[self.last][:, self.prefix :][:, index]  # [B, n, m, D]
        group = torch.cat([class_tokens.unsqueeze(2), copies], dim=2)  # [B, n, G, D]
        group_valid = torch.cat([valid.new_ones(patches, 1), valid], dim=1)  # [n, G]
        size = group.shape[2]
        mask = torch.cat(
            [
                group_valid[:, None, :].expand(-1, size, -1),
                blank_allowed[:, None, :].expand(-1, size, -1),
            ],
            dim=-1,
        )  # [n, G, G + T]
        mask = mask.unsqueeze(0).expand(self.batch, -1, -1, -1).flatten(0, 1).unsqueeze(1)
        group = group.flatten(0, 1)  # [B·n, G, D]
        for block_index in range(self.last, len(self.vit.blocks)):
            block = self.vit.blocks[block_index]
            normed = block.norm1(group)
            query, key, value = query_key_value(block.attn, normed)  # [B·n, H, G, d]
            _, blank_key, blank_value = self.blank_qkv[block_index]  # [Bb, H, T, d]
            keys = torch.cat([key, _per_group(blank_key, self.batch, patches)], dim=2)
            values = torch.cat([value, _per_group(blank_value, self.batch, patches)], dim=2)
            attended = F.scaled_dot_product_attention(
                query, keys, values, attn_mask=mask, scale=block.attn.scale
            )
            group = finish_block(block, group, attended, normed)
        return group[:, 0].view(self.batch, patches, -1)


def _per_group(tensor: torch.Tensor, batch: int, patches: int) -> torch.Tensor:
    """``[1 or B, H, T, d]`` → ``[B·n, H, T, d]``, the same blank keys for each patch group."""
    return tensor.unsqueeze(1).expand(batch, patches, -1, -1, -1).flatten(0, 1)
