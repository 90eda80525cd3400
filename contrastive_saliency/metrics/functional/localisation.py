"""Localisation metrics: pointing games, energy, localisation error, AUPR, VAR region scores.

All functions are batched and pure torch: maps are ``[B, H, W]`` saliency maps, masks
``[B, H, W]`` bool regions of interest, boxes ``[B, 4]`` ``(x1, y1, x2, y2)`` in pixel-edge
coordinates (pixel column ``j`` lies inside when ``x1 ≤ j < x2``, i.e. the box covers columns
``x1 … x2 − 1``). Every function returns per-sample values ``[B]`` and defines degenerate cases
(constant or all-zero maps, empty masks, ties) without NaN.
"""

from __future__ import annotations

import torch
from torchvision.transforms.functional import gaussian_blur

from contrastive_saliency.metrics.functional.ties import expected_top_k_inside, top_k_ties


def _check_maps(maps: torch.Tensor, name: str = "maps") -> None:
    if maps.dim() != 3:
        raise ValueError(
            f"{name} must be [B, H, W], got shape {tuple(maps.shape)}; squeeze the channel "
            "dimension of [B, 1, H, W] maps first"
        )


def _check_masks(maps: torch.Tensor, masks: torch.Tensor) -> None:
    _check_maps(maps)
    if masks.shape != maps.shape:
        raise ValueError(
            f"masks must match the maps' shape {tuple(maps.shape)}, got {tuple(masks.shape)}; "
            "resize masks (nearest) or maps to the same resolution"
        )
    if masks.dtype != torch.bool:
        raise ValueError(f"masks must be bool, got {masks.dtype}; use masks > 0.5")


def _safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator`` where ``denominator > 0``, else 0."""
    positive = denominator > 0
    return torch.where(positive, numerator / denominator.where(positive, 1), 0.0)


def dilate_masks(masks: torch.Tensor, tolerance_px: int) -> torch.Tensor:
    """Bool ``[B, H, W]`` masks grown by every pixel closer than ``tolerance_px`` to them
    (Euclidean distance ``< tolerance_px``, TorchRay's acceptance disk ``du² + dv² < t²``);
    ``tolerance_px`` 0 or 1 leaves them as they are. One convolution with the disk, batched."""
    if isinstance(tolerance_px, bool) or not isinstance(tolerance_px, int) or tolerance_px < 0:
        raise ValueError(f"tolerance_px must be a non-negative integer, got {tolerance_px!r}")
    reach = tolerance_px - 1
    if reach <= 0:
        return masks.bool()
    offsets = torch.arange(-reach, reach + 1, device=masks.device, dtype=torch.float32)
    disk = (offsets[:, None].square() + offsets[None, :].square() < tolerance_px**2).float()
    grown = torch.nn.functional.conv2d(masks[:, None].float(), disk[None, None], padding=reach)
    return grown[:, 0] > 0


def pointing_game(
    maps: torch.Tensor, masks: torch.Tensor, ties: str = "expected", tolerance_px: int = 0
) -> torch.Tensor:
    """Hit (1.0) when the map's maximum lies inside the mask, else 0.0 (CAAP Sec. 4, "PG";
    Zhang et al. 2018).

    ``hit = mask[argmax E]``. Ties between maximal pixels: ``ties="expected"`` (default, the
    rule of :mod:`contrastive_saliency.metrics.functional.ties`) scores the expected hit when the maximum
    is drawn uniformly among them — the share of maximal pixels inside the mask, so a constant
    map scores the mask's area share; ``ties="first"`` takes the first in row-major order
    (``torch.argmax`` semantics), so a constant map points at pixel (0, 0); ``ties="any"``
    counts a hit when any maximal pixel is inside (Quantus' ``PointingGame``), so a constant
    map hits every non-empty mask. A map with a unique maximum scores the same under all
    three. NaN pixels are never the maximum. An empty mask gives 0 (Quantus: NaN).

    ``tolerance_px``: a hit also when the maximum lies closer than this many pixels to the mask
    (Zhang et al. 2018's protocol, TorchRay ``PointingGame(tolerance=15)``: the mask is grown by
    :func:`dilate_masks`); 0 (default) counts only pixels inside the mask.
    """
    _check_masks(maps, masks)
    masks = dilate_masks(masks, tolerance_px)
    flat_maps, flat_masks = maps.flatten(1), masks.flatten(1)
    if ties == "expected":
        return expected_top_k_inside(top_k_ties(flat_maps, 1), flat_masks).to(maps.dtype)
    if ties == "first":
        index = flat_maps.argmax(dim=1, keepdim=True)
        return flat_masks.gather(1, index)[:, 0].to(maps.dtype)
    if ties == "any":
        maximal = flat_maps == flat_maps.max(dim=1, keepdim=True).values
        return (maximal & flat_masks).any(dim=1).to(maps.dtype)
    raise ValueError(f"ties must be 'expected', 'first' or 'any', got {ties!r}")


def relevance_rank_accuracy(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of the ``K = |R|`` highest-valued pixels that lie inside the mask ``R`` (Arras et
    al. 2022, CLEVR-XAI, "relevance rank accuracy"; Quantus ``RelevanceRankAccuracy``):
    ``|top_K(E) ∩ R| / K`` per sample, the map's signed values (Quantus' ``abs=False``).

    Ties at the ``K``-th value count by their expected share under uniform tie-breaking (the
    rule of :mod:`contrastive_saliency.metrics.functional.ties`), so a constant map scores the
    mask's area share ``K / N`` (Quantus: ``argsort`` order). NaN ranks lowest. An empty mask
    gives 0 (Quantus: NaN), as :func:`top_k_intersection`.
    """
    _check_masks(maps, masks)
    region = masks.flatten(1).bool()
    k = region.sum(dim=1)
    ties = top_k_ties(maps.flatten(1), k.clamp_min(1))  # an empty mask is scored 0 below
    accuracy = expected_top_k_inside(ties, region) / k.clamp_min(1).double()
    return torch.where(k > 0, accuracy, torch.zeros_like(accuracy)).to(maps.dtype)


def top_k_intersection(maps: torch.Tensor, masks: torch.Tensor, k: int) -> torch.Tensor:
    """Fraction of the ``k`` highest-valued pixels that lie inside the mask (Theiner et al.
    2021, "top-k intersection"; Quantus ``TopKIntersection``): ``|topk(E) ∩ R| / k``.

    Ties at the ``k``-th value count by their expected share under uniform tie-breaking
    (:mod:`contrastive_saliency.metrics.functional.ties`): ``E|topk(E) ∩ R| / k``, deterministic, so a
    constant map scores the mask's area share rather than that of the first ``k`` pixels in
    raster order (Quantus' ``argsort`` order); NaN ranks lowest. An empty mask gives 0
    (Quantus: NaN).
    """
    _check_masks(maps, masks)
    num_pixels = maps[0].numel()
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_pixels:
        raise ValueError(f"k must be an integer in [1, {num_pixels}] (pixels per map), got {k!r}")
    inside = expected_top_k_inside(top_k_ties(maps.flatten(1), k), masks.flatten(1))
    dtype = maps.dtype if maps.is_floating_point() else torch.get_default_dtype()
    return (inside / k).to(dtype)


def energy_pointing_game(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Energy-based pointing game (Score-CAM, Wang et al. 2020; ClusCAM App. C Eq. 14).

    ``Σ_{i∈mask} E⁺_i / Σ_i E⁺_i`` with ``E⁺ = max(E, 0)``; 0 when the total positive mass is 0.
    """
    _check_masks(maps, masks)
    positive = maps.clamp(min=0).flatten(1)
    inside = (positive * masks.flatten(1)).sum(dim=1)
    return _safe_divide(inside, positive.sum(dim=1))


def boxes_to_masks(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[B, 4]`` xyxy pixel-edge boxes → ``[B, H, W]`` bool masks.

    Pixel ``(r, c)`` is inside when ``x1 ≤ c < x2`` and ``y1 ≤ r < y2``; boxes reaching outside
    the image are clipped to it, and empty or fully outside boxes give empty masks.
    """
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [B, 4] (x1, y1, x2, y2), got {tuple(boxes.shape)}")
    cols = torch.arange(width, device=boxes.device).view(1, 1, width)
    rows = torch.arange(height, device=boxes.device).view(1, height, 1)
    x1, y1, x2, y2 = (boxes[:, i].view(-1, 1, 1) for i in range(4))
    return (cols >= x1) & (cols < x2) & (rows >= y1) & (rows < y2)


def _first_true(flags: torch.Tensor) -> torch.Tensor:
    """Index of the first True along the last dimension (0 if none)."""
    return flags.to(torch.uint8).argmax(dim=-1)


def localisation_error(maps: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Localisation error ``1 − IoU(B̂, B)`` (Opti-CAM, Zhang et al. 2024; ClusCAM App. C Eq. 15).

    ``B̂`` is the bounding box of all pixels with ``E ≥ mean(E)`` (a constant or all-zero map
    selects every pixel, i.e. the whole image); ``B`` is the ground-truth box clipped to the
    image. An empty clipped ground-truth box gives IoU 0, i.e. error 1.
    """
    _check_maps(maps)
    b, h, w = maps.shape
    if boxes.shape != (b, 4):
        raise ValueError(f"boxes must be [{b}, 4] (one xyxy box per map), got {tuple(boxes.shape)}")
    selected = maps >= maps.mean(dim=(1, 2), keepdim=True)
    rows_any = selected.any(dim=2)  # [B, H]
    cols_any = selected.any(dim=1)  # [B, W]
    y_min = _first_true(rows_any)
    y_max = h - _first_true(rows_any.flip(-1))  # exclusive edge
    x_min = _first_true(cols_any)
    x_max = w - _first_true(cols_any.flip(-1))
    pred = torch.stack([x_min, y_min, x_max, y_max], dim=1).to(maps.dtype)
    limits = torch.tensor([w, h, w, h], device=maps.device, dtype=maps.dtype)
    gt = torch.minimum(boxes.to(maps.dtype).clamp(min=0), limits)
    inter_w = (torch.minimum(pred[:, 2], gt[:, 2]) - torch.maximum(pred[:, 0], gt[:, 0])).clamp(
        min=0
    )
    inter_h = (torch.minimum(pred[:, 3], gt[:, 3]) - torch.maximum(pred[:, 1], gt[:, 1])).clamp(
        min=0
    )
    inter = inter_w * inter_h
    area_pred = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    area_gt = (gt[:, 2] - gt[:, 0]).clamp(min=0) * (gt[:, 3] - gt[:, 1]).clamp(min=0)
    return 1.0 - _safe_divide(inter, area_pred + area_gt - inter)


def min_max_normalise(maps: torch.Tensor) -> torch.Tensor:
    """Per-map ``(E − min) / (max − min)`` over all but the first dimension; constant maps → 0."""
    flat = maps.flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    high = flat.max(dim=1, keepdim=True).values
    return _safe_divide(flat - low, high - low).view_as(maps)


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Average precision per row of ``[B, N]`` scores against bool labels (sklearn's definition).

    ``AP = Σ_n (R_n − R_{n−1}) P_n`` over the distinct score thresholds in decreasing order
    (tied scores enter together), identical to ``sklearn.metrics.average_precision_score``.
    Rows without a positive label give 0.
    """
    if scores.shape != labels.shape or scores.dim() != 2:
        raise ValueError(
            f"scores and labels must both be [B, N], got {tuple(scores.shape)} and "
            f"{tuple(labels.shape)}"
        )
    order = torch.sort(scores, dim=1, descending=True, stable=True)
    sorted_labels = labels.gather(1, order.indices).to(torch.float64)
    true_positives = sorted_labels.cumsum(dim=1)
    # Last position of each tie group: the number of scores ≥ this score, minus one.
    negated = -order.values.contiguous()
    group_end = torch.searchsorted(negated, negated, right=True) - 1
    precision_at_end = true_positives.gather(1, group_end) / (group_end + 1).to(torch.float64)
    positives = sorted_labels.sum(dim=1)
    ap = _safe_divide((sorted_labels * precision_at_end).sum(dim=1), positives)
    return ap.to(scores.dtype if scores.is_floating_point() else torch.float32)


def aupr(maps: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(AUPR₁, AUPR₀)`` per sample (CAAP Sec. 4, "Localization metrics").

    AUPR₁ is the average precision of the min-max normalised map ``Ê ∈ [0, 1]`` against the
    mask, AUPR₀ that of ``1 − Ê`` against the inverted mask (see :func:`average_precision`).
    A constant map is one tie group (AP = the positive fraction); an empty mask gives
    AUPR₁ = 0 and a full mask AUPR₀ = 0.
    """
    _check_masks(maps, masks)
    normalised = min_max_normalise(maps).flatten(1)
    labels = masks.flatten(1)
    return average_precision(normalised, labels), average_precision(1.0 - normalised, ~labels)


def grid_cell_masks(
    cell_index: torch.Tensor, height: int, width: int, grid: int = 2
) -> torch.Tensor:
    """``[B, H, W]`` bool masks of cell ``cell_index`` (row-major: 0 = top-left, 1 = top-right …)
    of a ``grid × grid`` layout; cell edges at ``floor(i · H / grid)`` and ``floor(j · W / grid)``.
    """
    if grid < 1:
        raise ValueError(f"grid must be a positive number of cells per side, got {grid}")
    if cell_index.numel() and (cell_index.min() < 0 or cell_index.max() >= grid * grid):
        raise ValueError(
            f"cell_index must lie in [0, {grid * grid - 1}] for a {grid}×{grid} grid, got "
            f"{cell_index.min().item()}..{cell_index.max().item()}"
        )
    cell_index = cell_index.long()
    row, col = cell_index // grid, cell_index % grid
    y1, y2 = row * height // grid, (row + 1) * height // grid
    x1, x2 = col * width // grid, (col + 1) * width // grid
    return boxes_to_masks(torch.stack([x1, y1, x2, y2], dim=1), height, width)


def grid_pointing_game(
    maps: torch.Tensor, cell_index: torch.Tensor, grid: int = 2, eps: float = 1e-7
) -> torch.Tensor:
    """Grid pointing game (Rao et al. 2022; VAR Sec. 4.1 and App. B.1).

    ``Σ_{i∈cell} E⁺_i / Σ_i E⁺_i`` with ``E⁺ = max(E, 0)`` and the target cell of a
    ``grid × grid`` image grid; 0 when the total positive mass is ``≤ eps`` (1e-7). A uniform map
    scores ``1 / grid²`` (0.25, chance, for 2×2).
    """
    _check_maps(maps)
    masks = grid_cell_masks(cell_index.to(maps.device), maps.shape[1], maps.shape[2], grid)
    positive = maps.clamp(min=0).flatten(1)
    total = positive.sum(dim=1)
    inside = (positive * masks.flatten(1)).sum(dim=1)
    return torch.where(total > eps, inside / total.clamp(min=eps), 0.0)


def region_scores(
    maps: torch.Tensor,
    masks: torch.Tensor,
    blur_kernel: int = 11,
    blur_sigma: float | None = None,
    threshold: float = 0.0,
    eps: float = 1e-7,
) -> dict[str, torch.Tensor]:
    """VAR localisation scores (VAR App. B.1): region attribution, IoU, precision, recall, F1.

    ``H̃ = G_σ * max(E, 0)`` (``blur_kernel × blur_kernel`` Gaussian, reflect padding; σ defaults
    to torchvision's/OpenCV's ``0.3·((k − 1)/2 − 1) + 0.8`` = 2.0 for k = 11, VAR does not state
    it). ``RA = Σ_{i∈R} H̃_i / Σ_i H̃_i`` (0 when the total is ``≤ eps``). For the set metrics the
    attributed pixels are ``A = {i : H̃_i > threshold · max H̃}``; VAR B.1 does not state its
    binarisation, the default ``threshold = 0`` takes the support of the blurred positive map
    (nothing for an all-zero map). ``IoU = |A∩R| / |A∪R|``, ``precision = |A∩R| / |A|``,
    ``recall = |A∩R| / |R|``, ``F1 = 2PR / (P + R)``, each 0 where its denominator is 0.
    Returns a dict of ``[B]`` tensors keyed ``region_attribution, iou, precision, recall, f1``.
    """
    _check_masks(maps, masks)
    if blur_kernel < 1 or blur_kernel % 2 == 0:
        raise ValueError(f"blur_kernel must be a positive odd size, got {blur_kernel}")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(
            f"threshold is a fraction of each map's maximum in [0, 1), got {threshold}"
        )
    if blur_kernel // 2 >= min(maps.shape[1], maps.shape[2]):
        raise ValueError(
            f"blur_kernel {blur_kernel} needs maps larger than {blur_kernel // 2} pixels per side "
            f"(reflect padding), got {tuple(maps.shape[1:])}; upsample the maps or pass a smaller "
            "blur_kernel"
        )
    positive = maps.clamp(min=0).unsqueeze(1)
    if blur_kernel > 1:
        sigma = blur_sigma if blur_sigma is not None else 0.3 * ((blur_kernel - 1) * 0.5 - 1) + 0.8
        positive = gaussian_blur(positive, [blur_kernel, blur_kernel], [sigma, sigma])
    blurred = positive.flatten(1)
    region = masks.flatten(1)
    total = blurred.sum(dim=1)
    inside = (blurred * region).sum(dim=1)
    region_attribution = torch.where(total > eps, inside / total.clamp(min=eps), 0.0)
    peak = blurred.max(dim=1, keepdim=True).values
    attributed = (blurred > threshold * peak) & (peak > 0)
    intersection = (attributed & region).sum(dim=1).to(maps.dtype)
    union = (attributed | region).sum(dim=1).to(maps.dtype)
    precision = _safe_divide(intersection, attributed.sum(dim=1).to(maps.dtype))
    recall = _safe_divide(intersection, region.sum(dim=1).to(maps.dtype))
    return {
        "region_attribution": region_attribution,
        "iou": _safe_divide(intersection, union),
        "precision": precision,
        "recall": recall,
        "f1": _safe_divide(2 * precision * recall, precision + recall),
    }


def grid_region_scores(
    maps: torch.Tensor,
    cell_index: torch.Tensor,
    grid: int = 2,
    blur_kernel: int = 11,
    blur_sigma: float | None = None,
    threshold: float = 0.0,
    eps: float = 1e-7,
) -> dict[str, torch.Tensor]:
    """:func:`region_scores` with the target cell of a ``grid × grid`` image as the region
    (VAR Sec. 4.1 / App. B.1, Quad-ImageNet)."""
    _check_maps(maps)
    masks = grid_cell_masks(cell_index.to(maps.device), maps.shape[1], maps.shape[2], grid)
    return region_scores(maps, masks, blur_kernel, blur_sigma, threshold, eps)
