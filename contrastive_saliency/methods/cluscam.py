"""ClusCAM: k-means++ groups of channel maps, scored by masked forwards (``cluscam.md``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.feature_layout import check_layout, detect_layout
from contrastive_saliency.gradients import _check_classes
from contrastive_saliency.input_gradients import frozen_eval
from contrastive_saliency.kmeans import kmeans
from contrastive_saliency.layers import capture_layer, default_layer, resolve_layer
from contrastive_saliency.masked_forward import chunked_class_scores, row_chunks
from contrastive_saliency.methods.base import SaliencyMethod
from contrastive_saliency.methods.registry import register_method


@dataclass(frozen=True)
class ClusCAMPreset:
    """One row of the paper's Table 3: ``num_clusters`` K, ``discard_ratio`` r (a fraction),
    ``temperature`` τ (the table's value, which is Eq. 10 ``1 / ln(1 + rK)`` rounded)."""

    num_clusters: int
    discard_ratio: float
    temperature: float


CLUSCAM_PRESETS: dict[str, ClusCAMPreset] = {
    "resnet18": ClusCAMPreset(30, 0.3712, 0.40),
    "resnet34": ClusCAMPreset(40, 0.3609, 0.37),
    "resnet50": ClusCAMPreset(45, 0.5171, 0.31),
    "resnet101": ClusCAMPreset(50, 0.5417, 0.30),
    "efficientnet": ClusCAMPreset(50, 0.4078, 0.33),
    "inception_v3": ClusCAMPreset(45, 0.4508, 0.33),
    "vit_b": ClusCAMPreset(40, 0.1493, 0.51),
    "swin_b": ClusCAMPreset(45, 0.1404, 0.50),
    "levit_192": ClusCAMPreset(45, 0.1532, 0.48),
    "levit_256": ClusCAMPreset(50, 0.1952, 0.42),
    "cait_xxs24": ClusCAMPreset(40, 0.1602, 0.50),
    "pvt_v2": ClusCAMPreset(45, 0.1625, 0.47),
}
"""ClusCAM Table 3 (App. A), by architecture."""

CODE_PRESET = ClusCAMPreset(10, 0.5, 0.5)
"""The authors' reference code: K = 10 (its sweeps run 10–150), r = 0.5, τ = 0.5."""

EQ10 = "eq10"
"""``temperature="eq10"``: τ = 1 / ln(1 + rK) (Eq. 10) of the chosen K and r."""


def temperature_from(discard_ratio: float, num_clusters: int) -> float:
    """ClusCAM Eq. 10: ``τ = 1 / ln(1 + rK)``; needs ``rK > 0``."""
    product = discard_ratio * num_clusters
    if not product > 0:
        raise ConfigurationError(
            f"τ = 1/ln(1 + rK) needs r·K > 0, got r = {discard_ratio!r}, K = {num_clusters!r}; "
            f"pass temperature= explicitly"
        )
    return 1.0 / math.log1p(product)


@dataclass(frozen=True)
class MetaRepresentations:
    """What ClusCAM computes before combining: ``maps`` ``[B, G, H, W]``, the G
    meta-representations ``M_j`` (Eq. 4) at input resolution, in [0, 1]; ``assignments``
    ``[B, C]``, the group of each channel map; ``logits`` ``[B, N]`` of the unmasked images;
    ``scores`` ``[B, K, G]``, ``s_j^c = logit_c(x ⊙ M_j) − logit_c(x)`` (Eq. 5) for each
    requested class ``classes[b, k]``."""

    maps: torch.Tensor
    assignments: torch.Tensor
    logits: torch.Tensor
    scores: torch.Tensor


@register_method("cluscam")
class ClusCAM(SaliencyMethod):
    """ClusCAM (``cluscam.md``, Alg. 1, Eqs. 4–7), gradient-free.

    1. One forward captures the layer's C channel maps ``F_i`` (CNN maps; ViT patch tokens
       laid on the patch grid, ``layout`` as :mod:`contrastive_saliency.feature_layout`).
    2. ``NormalizeUpsample(F_i)``: bilinear upsampling to the input size, then min-max to
       [0, 1] per channel (a constant map becomes all zeros; the reference code leaves it
       unchanged, identical for the usual all-zero ReLU channel).
    3. Per image, k-means++ (:func:`contrastive_saliency.kmeans.kmeans`) groups the C flattened maps into
       G = ``num_clusters`` groups; ``M_j`` = mean of the group's maps (Eq. 4). The reference
       code uses scikit-learn's cluster centres instead; for Lloyd centres these coincide
       (each returned centre is its members' mean). A group left empty (fewer than G
       distinct maps, or the iteration cap reached right after a relocation) is its k-means
       centre, as in the code.
    4. ``s_j^c = logit_c(x ⊙ M_j) − logit_c(x)`` (Eq. 5), for every requested class from the
       same B·G masked forwards (``batch_size`` masked images per forward, no gradients).
    5. The ``⌊rG⌋`` lowest scores are discarded (the code's ``int(r·K)``; ties: lowest index
       first), ``α = softmax(s/τ)`` over the rest (Eq. 6), ``E^c = Normalize(Σ_j α_j M_j)``
       (Eq. 7): min-max to [0, 1] per map, a constant map becoming zeros.

    The clustering is exact but cheap: bilinear upsampling is linear, ``U`` (``[HW, hw]``,
    rows summing to 1), so ``NormalizeUpsample(F_i) = U g_i`` with ``g_i`` the low-resolution
    map shifted and scaled by the upsampled map's min and max, and
    ``‖U g_i − U g_j‖ = ‖T g_i − T g_j‖`` for ``T`` the R factor of ``U = QR`` (``U`` itself
    on an axis that is downsampled); ``U`` is separable, ``T = T_h ⊗ T_w``. k-means on
    ``T g_i`` (dimension ``h·w`` instead of ``H·W``) therefore has the same D² weights,
    assignments and, mapped back by ``U T⁺``, the same centres as k-means on the upsampled
    maps, up to float rounding.

    Hyper-parameters (K, r, τ) come as one coherent set from ``preset``: a key of
    :data:`CLUSCAM_PRESETS` (the paper's Table 3 row of that architecture, e.g. ``"resnet50"``:
    K = 45, r = 0.5171, τ = 0.31, whose τ is Eq. 10 of its K and r) or ``"code"``
    (:data:`CODE_PRESET`, the authors' code: K = 10, r = 0.5, τ = 0.5). Without a preset the
    default is ``"code"``: the paper gives no architecture-independent values (Table 3's rows
    were selected per architecture by Alg. 2–3 on ImageNet validation data), and the code's
    set is the only one its authors published for any model; for an architecture outside
    Table 3 the paper's way is to select K and r (:mod:`contrastive_saliency.cluscam_selection`, App. B)
    and pass them with ``temperature="eq10"``. An explicit ``num_clusters``,
    ``discard_ratio`` or ``temperature`` replaces that one value of the preset and nothing
    else; ``temperature="eq10"`` is Eq. 10 of the final K and r (docs/deviations.md).
    The paper hooks the last convolutional layer of CNNs (the
    default layer) and the patch embedding of ViTs (pass its path as ``layer=``). ``seed`` is
    the k-means random state (the code's ``random_state=0``); every image is clustered as if
    alone with it. ``kmeans_iterations`` and ``kmeans_tol`` are scikit-learn's ``max_iter``
    and ``tol`` defaults, ``tol`` relative to the mean per-pixel variance of the upsampled maps
    as scikit-learn applies it to them.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | None = None,
        num_clusters: int | None = None,
        discard_ratio: float | None = None,
        temperature: float | Literal["eq10"] | None = None,
        batch_size: int = 32,
        seed: int = 0,
        kmeans_iterations: int = 300,
        kmeans_tol: float = 1e-4,
        layout: str | None = None,
        preset: str | None = None,
    ) -> None:
        super().__init__(model)
        self.layer = layer if layer is not None else default_layer(model)
        resolve_layer(model, self.layer)
        self.layout = check_layout(layout)
        chosen = _preset(preset)
        num_clusters = chosen.num_clusters if num_clusters is None else num_clusters
        discard_ratio = chosen.discard_ratio if discard_ratio is None else discard_ratio
        _check_int("num_clusters", num_clusters, 1)
        if not 0 <= discard_ratio < 1:
            raise ConfigurationError(
                f"discard_ratio must lie in [0, 1) (the fraction of groups discarded), got "
                f"{discard_ratio!r}"
            )
        if temperature is None:
            temperature = chosen.temperature
        elif temperature == EQ10:
            temperature = temperature_from(discard_ratio, num_clusters)
        if isinstance(temperature, str) or not temperature > 0:
            raise ConfigurationError(
                f"temperature must be > 0 or 'eq10' (Eq. 10), got {temperature!r}"
            )
        if not kmeans_tol >= 0:
            raise ConfigurationError(f"kmeans_tol must be >= 0, got {kmeans_tol!r}")
        _check_int("batch_size", batch_size, 1)
        _check_int("kmeans_iterations", kmeans_iterations, 0)
        _check_int("seed", seed, None)
        self.num_clusters = num_clusters
        self.discard_ratio = float(discard_ratio)
        self.temperature = float(temperature)
        self.batch_size = batch_size
        self.seed = seed
        self.kmeans_iterations = kmeans_iterations
        self.kmeans_tol = kmeans_tol

    def compute(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        meta = self.meta_representations(images, classes)
        return combine(meta.maps, meta.scores, self.discard_ratio, self.temperature)

    def meta_representations(
        self, images: torch.Tensor, classes: torch.Tensor
    ) -> MetaRepresentations:
        """Steps 1–4 (Eqs. 4–5) for ``classes`` ``[B, K]``: the groups and their scores."""
        maps, assignments, logits = self.cluster(images)
        classes = classes.to(logits.device)
        _check_classes(classes, logits.shape[1])
        return MetaRepresentations(
            maps, assignments, logits, self.score(images, maps, classes, logits)
        )

    def cluster(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Steps 1–3: ``(maps [B, G, H, W], assignments [B, C], logits [B, N])``."""
        activations, logits = self.features(images)
        maps, assignments = self.group(activations, (images.shape[-2], images.shape[-1]))
        return maps, assignments, logits

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 1: one forward; the layer's maps ``[B, C, h, w]`` (float) and the logits."""
        with torch.no_grad(), capture_layer(self.model, self.layer, track_gradient=False) as cap:
            logits = self.model(images)
            output = cap.output()
        if logits.dim() != 2:
            raise ConfigurationError(
                f"the model returns shape {tuple(logits.shape)}; ClusCAM needs logits of shape "
                f"[B, num_classes]"
            )
        layout = detect_layout(
            self.model, self.layer, output, images.shape[-2:], self.layout, images.shape[0]
        )
        activations = layout.to_grid(output).float()
        if not bool(torch.isfinite(activations).all()):
            raise ConfigurationError(
                f"layer {self.layer!r} produced NaN or infinite activations; ClusCAM cannot "
                f"cluster them (check the model and the input)"
            )
        return activations, logits.detach().float()

    def group(
        self, activations: torch.Tensor, size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 2–3 for maps ``[B, C, h, w]`` and input ``size``: the meta-representations
        ``[B, G, H, W]`` (Eq. 4) and each channel's group ``[B, C]``, by k-means in the reduced
        space (class docstring)."""
        channels = activations.shape[1]
        if self.num_clusters > channels:
            raise ConfigurationError(
                f"num_clusters = {self.num_clusters} exceeds the {channels} channel maps of "
                f"layer {self.layer!r}; choose num_clusters <= {channels}"
            )
        unit = normalise_by_upsampled_range(activations, size)  # g_i, [B, C, h, w]
        factor_h, inverse_h = upsampling_metric(unit.shape[-2], size[0], unit.device)
        factor_w, inverse_w = upsampling_metric(unit.shape[-1], size[1], unit.device)
        points = torch.einsum("ph,bchw,qw->bcpq", factor_h, unit, factor_w).flatten(2)
        # scikit-learn's tol is relative to the mean per-dimension variance; the reduction keeps
        # the total variance, so over h·w instead of H·W dimensions the tol is rescaled.
        tol = self.kmeans_tol * points.shape[-1] / (size[0] * size[1])
        assignments, centres = kmeans(
            points, self.num_clusters, self.kmeans_iterations, self.seed, tol
        )
        centres = centres.unflatten(2, (factor_h.shape[0], factor_w.shape[0]))
        low = torch.einsum("hp,bkpq,wq->bkhw", inverse_h, centres, inverse_w)
        maps = F.interpolate(low, size=size, mode="bilinear", align_corners=False)
        # Means of [0, 1] maps lie in [0, 1]; clamp only the float rounding of T⁺ and U.
        return maps.clamp(0, 1), assignments

    def score(
        self,
        images: torch.Tensor,
        maps: torch.Tensor,
        classes: torch.Tensor,
        logits: torch.Tensor,
    ) -> torch.Tensor:
        """Step 4 (Eq. 5): ``scores [B, K, G]`` from the ``B·G`` masked images ``x_b ⊙ M_bj``,
        ``batch_size`` per forward; ``logits`` are those of the unmasked images."""
        batch, groups = maps.shape[:2]
        baseline = logits.gather(1, classes)  # [B, K]
        rows = torch.arange(batch * groups, device=images.device)
        image, group = rows // groups, rows % groups

        def run(chunk: slice) -> torch.Tensor:
            masks = maps[image[chunk], group[chunk]].unsqueeze(1).to(images.dtype)
            return self.model(images[image[chunk]] * masks)

        with frozen_eval(self.model), torch.no_grad():
            chunks = row_chunks(batch * groups, self.batch_size)
            scores = chunked_class_scores(run, chunks, classes[image]).float() - baseline[image]
        return scores.view(batch, groups, -1).transpose(1, 2)


def combine(
    maps: torch.Tensor, scores: torch.Tensor, discard_ratio: float, temperature: float
) -> torch.Tensor:
    """Step 5 (Eqs. 6–7): ``maps`` ``[B, G, H, W]``, ``scores`` ``[B, K, G]`` →
    ``Normalize(Σ_{j∈S} softmax_S(s/τ)_j M_j)`` ``[B, K, H, W]``, S = all but the ``⌊rG⌋``
    lowest scores of each row."""
    groups = maps.shape[1]
    discarded = math.floor(discard_ratio * groups + 1e-9)  # robust to 0.29·100 = 28.999…
    order = scores.argsort(dim=-1, stable=True)
    drop = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, order[..., :discarded], True)
    weights = (scores / temperature).masked_fill(drop, float("-inf")).softmax(dim=-1)
    return min_max(torch.einsum("bkg,bghw->bkhw", weights, maps.to(weights.dtype)))


def min_max(maps: torch.Tensor) -> torch.Tensor:
    """Each ``[H, W]`` map of ``[..., H, W]`` scaled to [0, 1]; a constant map becomes zeros."""
    low = maps.amin(dim=(-2, -1), keepdim=True)
    span = maps.amax(dim=(-2, -1), keepdim=True) - low
    return torch.where(span > 0, (maps - low) / span.masked_fill(span == 0, 1), 0.0)


def normalise_by_upsampled_range(activations: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``g_i = (F_i − m_i) / (M_i − m_i)`` ``[B, C, h, w]`` with ``m_i, M_i`` the min and max of
    ``Upsample(F_i)`` at ``size``, so ``Upsample(g_i) = NormalizeUpsample(F_i)`` exactly
    (bilinear rows sum to 1); zeros for constant maps.

    The extremes are found without upsampling: an output row is ``(1 − λ) F[a] + λ F[a + 1]``
    with λ increasing along each run of rows sharing the source pair ``(a, a + 1)``, so over a
    run a linear function peaks at the run's first or last row (:func:`extreme_rows`); the
    same holds for columns, and the extremes of the ``[~2h, ~2w]`` sub-grid are those of the
    whole ``[H, W]`` map."""
    height, width = activations.shape[-2:]
    rows = bilinear_matrix(height, size[0], activations.device)
    columns = bilinear_matrix(width, size[1], activations.device)
    rows, columns = rows[extreme_rows(rows)], columns[extreme_rows(columns)]
    sampled = torch.einsum("ph,bchw,qw->bcpq", rows, activations, columns)
    low = sampled.amin(dim=(-2, -1), keepdim=True)
    span = sampled.amax(dim=(-2, -1), keepdim=True) - low
    return torch.where(span > 0, (activations - low) / span.masked_fill(span == 0, 1), 0.0)


def extreme_rows(matrix: torch.Tensor) -> torch.Tensor:
    """Indices of the first and last row of every run of consecutive rows of a 1-D bilinear
    resize matrix ``[target, source]`` with the same non-zero columns."""
    support = matrix > 0
    first = support.int().argmax(dim=1)
    last = matrix.shape[1] - 1 - support.flip(1).int().argmax(dim=1)
    key = first * matrix.shape[1] + last
    starts = torch.ones_like(key, dtype=torch.bool)
    ends = torch.ones_like(key, dtype=torch.bool)
    starts[1:] = key[1:] != key[:-1]
    ends[:-1] = key[:-1] != key[1:]
    return torch.nonzero(starts | ends).squeeze(1)


def bilinear_matrix(source: int, target: int, device: torch.device | None = None) -> torch.Tensor:
    """The ``[target, source]`` matrix of 1-D bilinear resizing (``align_corners=False``), so
    that ``F.interpolate(x, (H, W), mode="bilinear") = U_h x U_wᵀ``."""
    basis = torch.eye(source, device=device).view(source, 1, source, 1)
    resized = F.interpolate(basis, size=(target, 1), mode="bilinear", align_corners=False)
    return resized[:, 0, :, 0].T


def upsampling_metric(
    source: int, target: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T, T⁺)`` with ``‖U x‖ = ‖T x‖`` for the resize ``U`` (``[target, source]``): R of
    ``U = QR`` (``[source, source]``) when upsampling, else ``U`` itself (the smaller side).
    ``U T⁺ T x = U x`` in both cases, which maps centres back exactly."""
    matrix = bilinear_matrix(source, target, device).double()
    factor = matrix if target < source else torch.linalg.qr(matrix, mode="r").R
    return factor.float(), torch.linalg.pinv(factor).float()


def _preset(name: str | None) -> ClusCAMPreset:
    """A Table 3 row, or the authors' code's values for ``"code"`` and ``None``."""
    if name is None or name == "code":
        return CODE_PRESET
    if name not in CLUSCAM_PRESETS:
        raise ConfigurationError(
            f"unknown ClusCAM preset {name!r}; the paper's Table 3 has "
            f"{', '.join(CLUSCAM_PRESETS)}, the authors' code is 'code'"
        )
    return CLUSCAM_PRESETS[name]


def _check_int(name: str, value: object, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigurationError(f"{name} must be >= {minimum}, got {value}")
