"""PIC (SIC / AIC, Kapishnikov et al., XRAI): the batched implementation against a per-image
reference written here with loops, numpy, Pillow and scipy (griddata, interp1d), following the
protocol of the public PAIR-code ``saliency.metrics.pic``; plus invariants and edge cases."""

from __future__ import annotations

import functools
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.interpolate import griddata, interp1d
from threadpoolctl import threadpool_limits
from torch import nn

from contrastive_saliency.metrics.functional.pic import (
    DEFAULT_THRESHOLDS,
    aggregate_pic,
    from_uint8_pixels,
    interpolate_from_kept,
    pic_curves,
    pic_interpolate,
    random_pixel_masks,
    saliency_keep_masks,
    to_uint8_pixels,
)
from tests.tiny_models import TinyCAMNet

_pic_curves = pic_curves

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SIZE = 32


def structured_images() -> np.ndarray:
    """uint8 ``[8, 32, 32, 3]`` images whose lossless WebP sizes differ widely."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    gradient = np.stack([yy * 200 + 20, xx * 180 + 30, (1 - yy) * 150 + 50], -1)
    noisy_square = gradient.copy()
    noisy_square[8:24, 6:20] += rng.normal(0, 40, (16, 14, 1))
    checker = ((np.floor(xx * 16) + np.floor(yy * 16)) % 2)[..., None] * 120 + 60
    checker = checker + rng.normal(0, 15, (SIZE, SIZE, 3))
    stripes = np.repeat((np.sin(xx * SIZE * 1.3) * 70 + 120)[..., None], 3, -1)
    stripes[((yy - 0.5) ** 2 + (xx - 0.5) ** 2) < 0.08] = [220, 40, 40]
    stripes += rng.normal(0, 10, (SIZE, SIZE, 3))
    faint = gradient * 0.5 + 60 + rng.normal(0, 6, (SIZE, SIZE, 3))  # low confidence
    constant = np.full((SIZE, SIZE, 3), [90.0, 140.0, 200.0])  # start image == original
    noise = rng.integers(0, 256, (SIZE, SIZE, 3)).astype(float)
    blobs = np.kron(rng.integers(0, 256, (8, 8, 3)), np.ones((4, 4, 1))).astype(float)
    blobs += rng.normal(0, 20, (SIZE, SIZE, 3))
    rings = np.repeat(
        (np.cos(((yy - 0.3) ** 2 + (xx - 0.6) ** 2) * 90) * 90 + 128)[..., None], 3, -1
    )
    rings += rng.normal(0, 12, (SIZE, SIZE, 3))
    stack = [noisy_square, checker, stripes, faint, constant, noise, blobs, rings]
    return np.clip(np.round(np.stack(stack)), 0, 255).astype(np.uint8)


def structured_maps(pixels: np.ndarray) -> np.ndarray:
    """float64 ``[B, H, W]`` maps: local contrast plus a bump and noise; image 1's map is
    quantised (ties at the quantiles), the constant image's map is constant."""
    rng = np.random.default_rng(1)
    gray = pixels.astype(np.float64).mean(-1)
    padded = np.pad(gray, ((0, 0), (1, 1), (1, 1)), mode="edge")
    laplacian = np.abs(
        padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
        - 4 * gray
    )  # fmt: skip
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    bump = np.exp(-((yy - 0.4) ** 2 + (xx - 0.5) ** 2) * 8) * 50
    maps = laplacian + bump + rng.random(gray.shape)
    maps[1] = np.round(maps[1] / 20.0)
    maps[4] = 1.0
    return maps


class TextureNet(nn.Module):
    """Two classes; logit of class 1 = gain · (mean |Laplacian| − bias) on the normalised
    image, class 0 = 0: textured originals are class 1, their interpolated versions less so."""

    def __init__(self, gain: float = 8.0, bias: float = 0.15) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3, padding=1, bias=False)
        kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
        with torch.no_grad():
            self.conv.weight.copy_(kernel.expand(1, 3, 3, 3) / 3)
        self.gain, self.bias = gain, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        energy = self.conv(x).abs().mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(energy), self.gain * (energy - self.bias)], 1)


class ConstantNet(nn.Module):
    """The same logits for every input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([0.3, 2.0, -1.0]).expand(x.shape[0], 3)


# ---------------------------------------------------------------- single-image reference


def ref_normalise(pixels: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(pixels).permute(2, 0, 1).float().div(255.0)
    x = (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    return x[None].contiguous()


def ref_predict(model: nn.Module, pixels: np.ndarray, cls: int, kind: str) -> float:
    with torch.no_grad():
        logits = model(ref_normalise(pixels))[0].float()
    if kind == "softmax":
        return float(logits.softmax(0)[cls])
    return 1.0 if int(logits.argmax()) == cls else 0.0


def ref_fill(pixels: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Corners kept; per-channel griddata linear from the kept pixels, mean colour outside."""
    keep = keep.copy()
    keep[0, 0] = keep[0, -1] = keep[-1, 0] = keep[-1, -1] = True
    if keep.all():
        return pixels
    out = pixels.astype(np.float32)
    known, unknown = np.argwhere(keep), np.argwhere(~keep)
    for c in range(pixels.shape[2]):
        channel = pixels[:, :, c]
        out[:, :, c][tuple(unknown.T)] = griddata(
            known, channel[tuple(known.T)], unknown, method="linear", fill_value=channel.mean()
        )
    return np.round(out).astype(np.uint8)


def ref_bytes(pixels: np.ndarray) -> int:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="webp", lossless=True, quality=100)
    return len(buffer.getvalue())


def ref_series(pixels, saliency, random_mask, thresholds):
    """Start image, one image per threshold, original; and their WebP sizes."""
    series = [ref_fill(pixels, random_mask)]
    for t in thresholds:
        keep = (saliency >= np.quantile(saliency, 1 - t)) | random_mask
        series.append(ref_fill(pixels, keep))
    series.append(pixels)
    return series, [ref_bytes(image) for image in series]


def ref_curve(model, series, infos, cls, kind, min_pred, points=1000):
    """One image, one curve type; ``valid`` False where the reference would skip the image.
    The curve is returned whenever both normalisations are defined."""
    preds = [ref_predict(model, image, cls, kind) for image in series]
    info_start, info_original = infos[0], infos[-1]
    pred_start, pred_original = preds[0], preds[-1]
    valid = pred_original >= min_pred and info_start < info_original and pred_start < pred_original
    result = {"valid": valid}
    if info_original > info_start and pred_original > pred_start:
        xs, ys, running = [], [], 0.0
        for info, pred in zip(infos[1:-1], preds[1:-1], strict=True):
            x = (info - info_start) / (info_original - info_start)
            y = (pred - pred_start) / (pred_original - pred_start)
            running = max(running, float(np.clip(y, 0.0, 1.0)))
            xs.append(float(np.clip(x, 0.0, 1.0)))
            ys.append(running)
        interp = interp1d(x=[*xs, 0.0, 1.0], y=[*ys, 0.0, 1.0])
        grid = np.linspace(0.0, 1.0, points, endpoint=False)
        curve = np.append(np.asarray([interp(g) for g in grid]), 1.0)
        grid = np.append(grid, 1.0)
        result.update(points=np.array(ys), grid=grid, curve=curve, auc=np.trapezoid(curve, grid))
    return result


# ---------------------------------------------------------------- fixtures


def _indices(images: torch.Tensor) -> torch.Tensor:
    """Dataset indices of a test batch (they key the tie-breaking at the quantiles)."""
    return torch.arange(len(images))


@pytest.fixture(scope="module")
def batch():
    pixels = structured_images()
    images = from_uint8_pixels(torch.from_numpy(pixels), MEAN, STD)
    maps = torch.from_numpy(structured_maps(pixels))
    model = TextureNet().eval()
    with torch.no_grad():
        classes = model(images).argmax(1)
    return pixels, images, maps, model, classes


@pytest.fixture(scope="module")
def result(batch):
    """With the reference's tie rule (keep every pixel at the quantile): the maps of images 1
    (quantised) and 4 (constant) have ties there, and this result is compared with it."""
    _, images, maps, model, classes = batch
    return pic_curves(model, images, maps, classes, mean=MEAN, std=STD, ties="keep_all")


# ---------------------------------------------------------------- tests


def test_pixel_round_trip(batch):
    pixels, images, *_ = batch
    assert torch.equal(to_uint8_pixels(images, MEAN, STD), torch.from_numpy(pixels))


def test_matches_single_image_reference(batch, result):
    pixels, _, maps, model, classes = batch
    masks = random_pixel_masks(len(pixels), SIZE, SIZE, 0.01, seed=0).numpy()
    with threadpool_limits(1):  # scipy's per-simplex LAPACK calls crawl with busy threads
        references = [
            ref_series(pixels[i], maps[i].numpy(), masks[i], DEFAULT_THRESHOLDS)
            for i in range(len(pixels))
        ]
    aggregated = aggregate_pic(result)
    for i, (_, infos) in enumerate(references):
        assert result.information[i].tolist() == infos
    # The default tie rule gives the reference's images wherever the maps have no ties at the
    # quantiles; on the quantised map (image 1) it keeps fewer pixels than the reference, which
    # keeps every tied one (module docstring, step 5). Image 4's map is constant too, but so
    # is the image: any kept set interpolates to the same image.
    _, images, *_ = batch
    random_ties = pic_curves(
        model, images, maps, classes, mean=MEAN, std=STD, indices=_indices(images)
    )
    for i, (_, infos) in enumerate(references):
        same = random_ties.information[i].tolist() == infos
        assert same == (i != 1), i
    for kind, prefix in (("softmax", "sic"), ("accuracy", "aic")):
        curves = []
        for i, (series, infos) in enumerate(references):
            ref = ref_curve(model, series, infos, int(classes[i]), kind, 0.8)
            assert bool(getattr(result, f"{prefix}_valid")[i]) == ref["valid"]
            if "curve" in ref:
                # Scores agree up to float32 noise of batched vs single-image forwards.
                points = getattr(result, f"{prefix}_points")[i].numpy()
                np.testing.assert_allclose(points, ref["points"], rtol=0, atol=1e-6)
                np.testing.assert_array_equal(result.grid.numpy(), ref["grid"])
                curve = getattr(result, f"{prefix}_curves")[i].numpy()
                np.testing.assert_allclose(curve, ref["curve"], rtol=0, atol=1e-6)
                auc = float(getattr(result, f"{prefix}_auc")[i])
                assert auc == pytest.approx(ref["auc"], abs=1e-6)
            if ref["valid"]:
                curves.append(ref["curve"])
        median = np.median(np.stack(curves), axis=0)
        np.testing.assert_allclose(aggregated[f"{prefix}_curve"].numpy(), median, atol=1e-6)
        expected_auc = np.trapezoid(median, result.grid.numpy())
        assert float(aggregated[f"{prefix}_auc"]) == pytest.approx(expected_auc, abs=1e-6)
        assert aggregated[f"{prefix}_count"] == len(curves)


def test_matches_reference_random_init_cnn():
    """A random-init CNN (near-uniform softmax; no confidence filter), random maps, a 5 %
    random mask, 200 grid points; with batch_size=1 and the same input layout as the
    reference the forwards are bitwise equal, so the curves agree to 1e-12."""
    torch.manual_seed(0)
    model = TinyCAMNet(channels=4, num_classes=3).eval()
    pixels = structured_images()[[1, 2, 5, 6]]
    images = from_uint8_pixels(torch.from_numpy(pixels), MEAN, STD)
    maps = torch.rand(4, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    classes = torch.tensor([0, 1, 2, 1])
    thresholds = (0.02, 0.1, 0.3)
    masks = random_pixel_masks(4, SIZE, SIZE, 0.05, seed=7)
    out = pic_curves(
        model, images, maps, classes, mean=MEAN, std=STD, thresholds=thresholds,
        random_masks=masks, min_confidence=0.0, num_points=200, batch_size=1,
        indices=_indices(images),
    )  # fmt: skip
    for i in range(4):
        with threadpool_limits(1):
            series, infos = ref_series(
                pixels[i], maps[i].double().numpy(), masks[i].numpy(), thresholds
            )
        ref = ref_curve(model, series, infos, int(classes[i]), "softmax", 0.0, points=200)
        assert out.information[i].tolist() == infos
        assert bool(out.sic_valid[i]) == ref["valid"]
        assert "curve" in ref or not ref["valid"]
        if "curve" in ref:
            np.testing.assert_allclose(out.sic_curves[i].numpy(), ref["curve"], atol=1e-12)
            assert float(out.sic_auc[i]) == pytest.approx(ref["auc"], abs=1e-12)


def test_fill_matches_griddata_on_many_masks():
    """The exact-rational fill equals per-channel griddata (float32, rounded) bit for bit."""
    rng = np.random.default_rng(4)
    for k in range(40):
        h, w = (SIZE, SIZE) if k % 2 else (23, 37)
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if k % 4 < 2:  # smooth images: many interpolated values near half-integers
            pixels = np.cumsum(rng.integers(-2, 3, (h, w, 3)), axis=0).clip(-100, 100) + 128
            pixels = pixels.astype(np.uint8)
        keep = rng.random((h, w)) < rng.choice([0.0, 0.01, 0.05, 0.2, 0.5, 0.8])
        if k % 3 == 0:  # blocks and lines of kept pixels, as top-saliency masks make
            keep[h // 4 : h // 2, w // 5 : w // 2] = True
            keep[:, w // 3] = True
        with threadpool_limits(1):
            expected = ref_fill(pixels, keep)
        np.testing.assert_array_equal(interpolate_from_kept(pixels, keep), expected)


def test_skipping_rules(result):
    info = result.information
    # The constant image: its start image is the image itself, not less informative.
    assert info[4, 0] == info[4, -1]
    assert not result.sic_valid[4] and not result.aic_valid[4]
    # The smooth gradient compresses better than its interpolated start image.
    assert info[0, 0] >= info[0, -1] and not result.sic_valid[0]
    # The faint image: correct but below 0.8 softmax → SIC skips it, AIC keeps it.
    assert 0.5 < result.scores[3, -1] < 0.8 and result.correct[3, -1]
    assert not result.sic_valid[3] and result.aic_valid[3]
    # Confident, informative, start scores lower → valid.
    for i in (1, 2, 5):
        assert result.scores[i, -1] >= 0.8 and info[i, 0] < info[i, -1]
        assert result.sic_valid[i]
    assert result.sic_valid.sum() >= 3 and result.aic_valid.sum() >= 3


def test_invariants(result):
    names = ("normalised_information", "sic_points", "aic_points", "sic_curves", "aic_curves")
    for name in names:
        values = getattr(result, name)
        assert torch.isfinite(values).all() and values.min() >= 0 and values.max() <= 1, name
    for points in (result.sic_points, result.aic_points):
        assert (points.diff(dim=1) >= 0).all()  # running maximum over the thresholds
    assert set(result.aic_points.unique().tolist()) <= {0.0, 1.0}
    ordered = (result.normalised_information.diff(dim=1) >= 0).all(dim=1)
    assert ordered.any()
    for curves in (result.sic_curves, result.aic_curves):
        assert (curves[ordered].diff(dim=1) >= -1e-15).all()
        assert torch.equal(curves[:, -1], torch.ones(len(curves), dtype=torch.float64))
    for auc in (result.sic_auc, result.aic_auc):
        assert torch.isfinite(auc).all() and auc.min() >= 0 and auc.max() <= 1
    grid = result.grid
    assert grid[0] == 0 and grid[-1] == 1 and len(grid) == 1001


def test_curve_closed_form():
    # One point (0.5, 1): the curve is 2x up to 0.5, then 1 → AUC 0.25 + 0.5.
    grid, curves = pic_interpolate(torch.tensor([[0.5]]), torch.tensor([[1.0]]), 1000)
    expected = torch.clamp(2 * grid, max=1.0)
    torch.testing.assert_close(curves[0], expected, rtol=0, atol=1e-15)
    assert float(torch.trapezoid(curves[0], grid)) == pytest.approx(0.75, abs=1e-12)
    # Points at the clipped ends: (0, y) comes before the appended (0, 0), which wins at 0.
    x = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([[0.6, 0.9]], dtype=torch.float64)
    _, curves = pic_interpolate(x, y, 4)
    # Sorted: (0, 0.6), (0, 0), (1, 0.9), (1, 1) → 0 at 0, then the line to (1, 0.9).
    expected = torch.tensor([0.0, 0.225, 0.45, 0.675, 1.0], dtype=torch.float64)
    torch.testing.assert_close(curves[0], expected, rtol=0, atol=1e-15)


def test_interpolation_matches_interp1d_with_ties():
    rng = np.random.default_rng(5)
    x = np.clip(np.round(rng.normal(0.5, 0.4, (20, 6)), 1), 0, 1)
    y = np.maximum.accumulate(rng.random((20, 6)), axis=1)
    _, curves = pic_interpolate(torch.from_numpy(x), torch.from_numpy(y), 50)
    for i in range(20):
        interp = interp1d(x=[*x[i], 0.0, 1.0], y=[*y[i], 0.0, 1.0])
        expected = [float(interp(g)) for g in np.linspace(0, 1, 50, endpoint=False)] + [1.0]
        np.testing.assert_allclose(curves[i].numpy(), expected, rtol=0, atol=1e-15)


def test_constant_softmax_model_is_skipped(batch):
    _, images, maps, _, _ = batch
    classes = torch.ones(len(images), dtype=torch.long)
    out = pic_curves(
        ConstantNet(), images, maps, classes, mean=MEAN, std=STD, thresholds=(0.1, 0.5),
        indices=_indices(images),
    )  # fmt: skip
    assert torch.allclose(out.scores, torch.full_like(out.scores, out.scores[0, 0].item()))
    # score(start) == score(original): normalisation undefined → invalid, placeholder 0.
    assert not out.sic_valid.any() and not out.aic_valid.any()
    assert torch.equal(out.sic_points, torch.zeros_like(out.sic_points))
    assert torch.isfinite(out.sic_curves).all() and torch.isfinite(out.sic_auc).all()
    aggregated = aggregate_pic(out)
    assert aggregated["sic_count"] == 0 and torch.isnan(aggregated["sic_auc"])


def test_determinism_seed_and_executor(batch, result):
    _, images, maps, model, classes = batch
    masks = random_pixel_masks(len(images), SIZE, SIZE, 0.01, seed=0)
    assert torch.equal(masks, random_pixel_masks(len(images), SIZE, SIZE, 0.01, seed=0))
    assert (masks.sum(dim=(1, 2)) == int(SIZE * SIZE * 0.01)).all()
    assert not torch.equal(masks, random_pixel_masks(len(images), SIZE, SIZE, 0.01, seed=1))
    with ThreadPoolExecutor(max_workers=3) as executor:
        again = pic_curves(
            model, images, maps, classes, mean=MEAN, std=STD, executor=executor, ties="keep_all"
        )
    for name, value in vars(result).items():
        assert torch.equal(value, getattr(again, name)), name


def test_batch_size_invariance():
    """batch_size only changes how the queries are chunked: CPU-side values are identical,
    scores equal up to the model's float32 batch-dependent kernels."""
    torch.manual_seed(1)
    model = TinyCAMNet(channels=5, num_classes=3).eval()
    pixels = structured_images()[:4]
    images = from_uint8_pixels(torch.from_numpy(pixels), MEAN, STD)
    maps = torch.rand(4, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    classes = torch.tensor([0, 1, 2, 0])
    kwargs = {"mean": MEAN, "std": STD, "thresholds": (0.05, 0.2), "min_confidence": 0.0}
    kwargs["indices"] = _indices(images)
    one = pic_curves(model, images, maps, classes, batch_size=1, **kwargs)
    many = pic_curves(model, images, maps, classes, batch_size=64, **kwargs)
    for name in ("information", "correct", "normalised_information", "sic_valid", "aic_valid"):
        assert torch.equal(getattr(one, name), getattr(many, name)), name
    torch.testing.assert_close(one.scores, many.scores, rtol=0, atol=1e-6)
    for name in ("sic_points", "sic_curves", "sic_auc", "aic_curves", "aic_auc"):
        torch.testing.assert_close(getattr(one, name), getattr(many, name), rtol=0, atol=1e-4)


def test_not_monotone_keeps_raw_points(batch, result):
    _, images, maps, model, classes = batch
    raw = pic_curves(
        model, images, maps, classes, mean=MEAN, std=STD, monotone=False, ties="keep_all"
    )
    assert torch.equal(raw.sic_points.cummax(dim=1).values, result.sic_points)
    assert (raw.sic_points <= result.sic_points).all()


def test_aggregate_mean_and_several_batches(result):
    single = aggregate_pic(result, method="mean")
    valid = result.sic_curves[result.sic_valid]
    torch.testing.assert_close(single["sic_curve"], valid.mean(dim=0))
    both = aggregate_pic([result, result])
    assert both["sic_count"] == 2 * single["sic_count"]
    torch.testing.assert_close(both["sic_curve"], aggregate_pic(result)["sic_curve"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"thresholds": (0.1, 0.05)}, "strictly increasing"),
        ({"thresholds": (0.0, 0.5)}, r"\(0, 1\]"),
        ({"mean": (0.5, 0.5)}, "one value per image channel"),
        ({"batch_size": 0}, "batch_size"),
        ({"random_masks": torch.zeros(2, 4, 4, dtype=torch.bool)}, "random_masks"),
        ({"indices": None}, "indices"),
        ({"indices": torch.arange(2)}, "indices"),
        ({"ties": "first"}, "ties"),
    ],
)
def test_errors(batch, kwargs, message):
    _, images, maps, model, classes = batch
    arguments = {"mean": MEAN, "std": STD, "indices": _indices(images), **kwargs}
    with pytest.raises(ValueError, match=message):
        pic_curves(model, images, maps, classes, **arguments)


def test_shape_errors(batch):
    _, images, maps, model, classes = batch
    pic_curves = functools.partial(_pic_curves, indices=_indices(images))
    with pytest.raises(ValueError, match="upsample"):
        pic_curves(model, images, maps[:, :16], classes, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="classes"):
        pic_curves(model, images, maps, classes[:2], mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="NaN"):
        pic_curves(model, images, maps * float("nan"), classes, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="results is empty"):
        aggregate_pic([])


def test_keep_masks_break_ties_at_the_quantile_at_random_keeping_the_reference_count():
    generator = torch.Generator().manual_seed(4)
    thresholds = DEFAULT_THRESHOLDS
    index = torch.arange(3) + 20
    # Distinct values: both rules are the reference's ``saliency >= np.quantile(...)``.
    distinct = torch.rand(3, SIZE, SIZE, generator=generator, dtype=torch.float64)
    for maps in (distinct, distinct.float()):
        random = saliency_keep_masks(maps, thresholds, index)
        assert torch.equal(random, saliency_keep_masks(maps, thresholds, ties="keep_all"))
        for t, keep in zip(thresholds, random, strict=True):
            for i in range(3):
                values = maps[i].double().numpy()
                reference = values >= np.quantile(values, 1 - t)
                assert np.array_equal(keep[i].numpy(), reference)
    # A sparse map, zero on 90 % of the pixels: the reference keeps every zero once the
    # quantile is 0 (t ≥ 0.1 here: the whole image); the default keeps as many pixels as the
    # reference keeps when the zeros are made distinct, all positives plus a random share of
    # the zeros keyed by the index.
    sparse = torch.where(distinct < 0.9, 0.0, distinct)
    keep_all = saliency_keep_masks(sparse, thresholds, ties="keep_all")
    random = saliency_keep_masks(sparse, thresholds, index)
    perturbed = torch.where(sparse == 0, -1e-9 * distinct, sparse)  # zeros → distinct negatives
    for t, everything, keep in zip(thresholds, keep_all, random, strict=True):
        for i in range(3):
            values = perturbed[i].numpy()
            count = int((values >= np.quantile(values, 1 - t)).sum())
            assert int(keep[i].sum()) == count, t
            assert keep[i][sparse[i] > 0].all() or count <= int((sparse[i] > 0).sum())
        if t >= 0.21:
            assert everything.all() and not keep.all()
    assert not torch.equal(random[-1, 0], random[-1, 1])  # different indices, different draws
    alone = saliency_keep_masks(sparse[1:2], thresholds, index[1:2])
    assert torch.equal(alone[:, 0], random[:, 1])  # the draw follows the index, not the batch
    with pytest.raises(ValueError, match="indices"):
        saliency_keep_masks(sparse, thresholds)


def test_matches_pairs_own_compute_pic_metric(batch, result, monkeypatch):
    """The real reference: PAIR's ``saliency.metrics.pic.compute_pic_metric`` (a dev
    dependency; importable beside this project since the core is ``contrastive_saliency``), per
    image, with our random masks, thresholds and the same model as its ``pred_func``. Where PAIR
    skips an image (``ComputePicMetricError``) ours marks the curve invalid; elsewhere the SIC
    and AIC curves and AUCs agree (float32 noise of batched vs single-image forwards)."""
    pair_pic = pytest.importorskip("saliency.metrics.pic")
    # PAIR 0.2.1 integrates with np.trapz, which NumPy 2.4 removed; np.trapezoid is the same rule
    monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)
    pixels, _, maps, model, classes = batch
    masks = random_pixel_masks(len(pixels), SIZE, SIZE, 0.01, seed=0).numpy()
    compared = 0
    for kind, prefix in (("softmax", "sic"), ("accuracy", "aic")):
        for i in range(len(pixels)):

            def predict(images, i=i, kind=kind):
                return [ref_predict(model, image, int(classes[i]), kind) for image in images]

            with threadpool_limits(1):
                try:
                    theirs = pair_pic.compute_pic_metric(
                        pixels[i], maps[i].numpy(), masks[i], predict, DEFAULT_THRESHOLDS,
                        min_pred_value=0.8, keep_monotonous=True, num_data_points=1000,
                    )  # fmt: skip
                except pair_pic.ComputePicMetricError:
                    assert not bool(getattr(result, f"{prefix}_valid")[i]), (kind, i)
                    continue
            assert bool(getattr(result, f"{prefix}_valid")[i]), (kind, i)
            curve = getattr(result, f"{prefix}_curves")[i].numpy()
            np.testing.assert_allclose(curve, theirs.curve_y, rtol=0, atol=1e-6)
            np.testing.assert_allclose(result.grid.numpy(), theirs.curve_x, rtol=0, atol=1e-12)
            assert float(getattr(result, f"{prefix}_auc")[i]) == pytest.approx(theirs.auc, abs=1e-6)
            compared += 1
    assert compared >= 4  # both curve kinds, several valid images
