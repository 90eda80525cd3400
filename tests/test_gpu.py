"""The checks a GPU machine must pass, parametrised by device so the same code runs on CPU.

Each check runs once per device: ``cuda`` (marked ``gpu``: skipped without CUDA, run by
``bash benchmarks/gpu_suite.sh`` or ``uv run pytest -m gpu``) and ``cpu`` (fast ones in the
default suite, slow ones marked ``slow``; ``bash benchmarks/gpu_suite.sh --device cpu --quick``
runs all of them), so the code path cannot rot between GPU windows.

- every method family (gradient CAMs incl. CASE / Finer-CAM, VAR, Score-CAM family and ClusCAM,
  CAAP, attention rollout and the ViT attention attributions, input-gradient methods incl.
  GradientSHAP and DeepLIFT, FullGrad, LRP, RISE, occlusion, the reference maps) and every
  metric family
  equals a float64 CPU reference on the device, and keeps its result on the device;
- host round trips (device → host waits) per call do not grow with the batch or the number
  of classes (no per-image or per-class ``.item()``/``bool()`` on a hot path);
- ``torch.autocast`` float16 / bfloat16 maps and metric values stay within tolerances
  derived from the formats' unit roundoff (:func:`test_autocast_maps_stay_within_tolerance`);
- ``train.py`` with ``trainer.deterministic: true`` reproduces itself bit for bit.

TF32 is switched off for these tests (:func:`exact_float32`): on Ampere and newer GPUs cuDNN
convolutions default to TF32, whose 10-bit mantissa gives "float32" results with the unit
roundoff of float16 (2⁻¹¹), far from the CPU's.
"""

from __future__ import annotations

import copy
import os
from functools import partial

# cuBLAS is deterministic only with a fixed workspace, read when its handle is created: before
# any test of this process touches CUDA (Lightning sets it too, but only when the Trainer is
# built, which may be after an earlier test created the handle).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest
import torch
from torch import nn

from benchmarks._host_syncs import HostRoundTrips
from contrastive_saliency.methods import create_method, list_methods
from contrastive_saliency.metrics import functional as M
from contrastive_saliency.targets import ConfusionContrast, LogitNeighbours

NUM_CLASSES = 6
CPU, CUDA = pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)
SLOW_CPU = pytest.param("cpu", id="cpu", marks=pytest.mark.slow)
DEVICES = [CPU, CUDA]
SLOW_DEVICES = [SLOW_CPU, CUDA]
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one CPU thread is fastest


@pytest.fixture(autouse=True)
def exact_float32():
    """Full float32 on CUDA (no TF32) for the duration of a test; restored afterwards."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class SmallReLUNet(nn.Module):
    """Conv net with nn.ReLU modules (guided backprop, LRP) and a named CAM layer."""

    default_saliency_layer = "features.3"

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 12, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(12, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def tiny_vit() -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=NUM_CLASSES, img_size=32,
        patch_size=8, depth=3,
    ).eval()  # fmt: skip


# Every registered method belongs to one family; a new method must be placed here (checked
# by test_every_registered_method_is_in_a_family), so the GPU suite covers it.
METHOD_FAMILIES = {
    "gradient_cams": [
        "grad_cam", "grad_cam_pp", "xgrad_cam", "layer_cam", "hires_cam", "eigen_cam", "case",
        "finer_cam",
    ],
    "var": ["var"],
    "score_cams": ["score_cam", "ablation_cam", "finer_score_cam", "cluscam"],
    "vit": [
        "caap", "attention_rollout", "grad_rollout", "transition_attention",
        "bidirectional_attention", "transformer_attribution", "inflow", "simple_insertion",
        "simple_deletion",
    ],
    "input_gradients": [
        "saliency", "input_x_gradient", "integrated_gradients", "smoothgrad", "guided_backprop",
        "guided_grad_cam", "gradient_shap", "deeplift",
    ],
    "full_grad": ["full_grad"],
    "lrp": ["lrp"],
    "rise": ["rise"],
    "occlusion": ["occlusion"],
    "reference_maps": ["oracle_part", "oracle_object", "random", "edge"],
}  # fmt: skip


def method_fields(method, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The batch fields ``method`` declares (reference maps read masks and the sample index),
    fabricated on CPU generators and moved to the images' device: the same on every device."""
    batch, size = images.shape[0], images.shape[-1]
    masks = torch.rand(batch, size, size, generator=torch.Generator().manual_seed(3)) > 0.5
    available = {"part_mask": masks, "mask": ~masks, "index": torch.arange(batch) * 7919 + 3}
    return {k: available[k].to(images.device) for k in getattr(method, "batch_fields", ())}


def method_kwargs(name: str) -> dict:
    """Arguments each method needs beyond defaults, sized for tiny inputs; random draws stay
    on CPU generators (the same on every device). SmoothGrad's noise comes from a generator
    on the images' device, so it runs with ``sigma=0`` here (its seeding is tested in
    tests/test_gradient_attributions.py)."""
    matrix = torch.rand(NUM_CLASSES, NUM_CLASSES, generator=torch.Generator().manual_seed(1))
    return {
        "case": {"contrast": ConfusionContrast(matrix, k=2)},
        "finer_cam": {"references": LogitNeighbours(2)},
        "integrated_gradients": {"steps": 8},
        "smoothgrad": {"n_samples": 3, "sigma": 0.0},
        "rise": {"n_masks": 64, "grid_size": 4, "batch_size": 50},
        "occlusion": {"window": 4, "stride": 4, "batch_size": 64},  # 16 windows: one chunk
        "gradient_shap": {"n_samples": 3, "stdevs": 0.1},  # draws seeded by the sample index
        "score_cam": {"batch_size": 7},
        "ablation_cam": {"batch_size": 7},
        "finer_score_cam": {"batch_size": 7},
        "cluscam": {"num_clusters": 4, "batch_size": 7},
        # the papers' first blocks assume 12 blocks; tiny_vit has 3
        "transition_attention": {"first_block": 1, "steps": 4, "batch_size": 5},
        "bidirectional_attention": {"first_block": 1, "steps": 4, "batch_size": 5},
    }.get(name, {})


def model_and_batch(
    name: str, batch: int = 3, k: int = 2
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The float32 CPU model a method is tested on, images and ``[batch, k]`` classes."""
    generator = torch.Generator().manual_seed(2)
    if name in METHOD_FAMILIES["vit"]:
        model, size = tiny_vit(), 32
    else:
        torch.manual_seed(0)
        model, size = SmallReLUNet().eval(), 16
    images = torch.randn(batch, 3, size, size, generator=generator)
    classes = torch.stack(
        [torch.randperm(NUM_CLASSES, generator=generator)[:k] for _ in range(batch)]
    )
    return model, images, classes


def maps_on(name: str, model: nn.Module, images, classes, device: str, dtype=torch.float32):
    net = copy.deepcopy(model).to(device=device, dtype=dtype)
    method = create_method(name, net, **method_kwargs(name))
    images = images.to(device=device, dtype=dtype)
    return method(images, classes.to(device), **method_fields(method, images))


def test_every_registered_method_is_in_a_family():
    placed = [name for names in METHOD_FAMILIES.values() for name in names]
    assert sorted(placed) == list_methods(), (
        "add new methods to METHOD_FAMILIES in tests/test_gpu.py so the GPU suite covers them"
    )


# ------------------------------------------------------------------ methods on the device
@pytest.mark.parametrize("family", list(METHOD_FAMILIES))
@pytest.mark.parametrize("device", DEVICES)
def test_method_family_matches_float64_reference(device, family):
    """Float32 maps on ``device`` equal the same method run in float64 on the CPU, within
    1e-4 of the largest |value| (float32's unit roundoff is 6e-8; measured here ≤ 1e-5), and
    come back float32, finite and on ``device``."""
    for name in METHOD_FAMILIES[family]:
        model, images, classes = model_and_batch(name)
        maps = maps_on(name, model, images, classes, device)
        reference = maps_on(name, model, images, classes, "cpu", torch.float64).double()
        assert maps.device.type == device and maps.dtype == torch.float32, name
        assert maps.shape == (*classes.shape, *images.shape[-2:]), name
        assert torch.isfinite(maps).all(), name
        scale = reference.abs().max().clamp_min(1e-12)
        error = (maps.cpu().double() - reference).abs().max() / scale
        assert error <= 1e-4, f"{name} on {device}: max error {float(error):.2e} of max |map|"


@pytest.mark.parametrize("device", DEVICES)
def test_host_round_trips_do_not_grow_with_batch_or_classes(device):
    """Every method asks the device for host values a fixed number of times per call (input
    checks, one test per k-means iteration), never once per image or per class: the counts
    for 1 image × 1 class and 3 images × 2 classes (both within one forward chunk of the
    chunked methods) are equal. On CUDA the synchronisations the runtime reports are compared
    too. ClusCAM's k-means stops when converged, so its count follows the data: two extra
    iterations are allowed (one k-means per image would add a check per image and iteration)."""
    grown = {}
    for name in list_methods():
        counts = []
        for batch, k in ((1, 1), (3, 2)):
            model, images, classes = model_and_batch(name, batch, k)
            net = copy.deepcopy(model).to(device)
            method = create_method(name, net, **method_kwargs(name))
            images, classes = images.to(device), classes.to(device)
            fields = method_fields(method, images)
            method(images, classes, **fields)  # warm-up: lazy initialisation is not per call
            with HostRoundTrips(device) as counter:
                method(images, classes, **fields)
            counts.append((counter.requests, counter.cuda_syncs))
        (small, small_cuda), (large, large_cuda) = counts
        slack = 2 if name == "cluscam" else 0  # one convergence check per extra iteration
        if large > small + slack or (large_cuda or 0) > (small_cuda or 0) + slack:
            grown[name] = counts
    assert not grown, f"host round trips grow with the batch: {grown} ((1×1), (3×2) images×classes)"


# ------------------------------------------------------------------ metrics on the device
def metric_batch(device: str, dtype: torch.dtype) -> dict:
    """A model, images, four maps per image (pair, single and 2×2 grid policies read the
    first 2, 1 and 4) and every annotation a metric may need, on ``device`` in ``dtype``."""
    generator = torch.Generator().manual_seed(4)
    torch.manual_seed(0)
    model = SmallReLUNet().eval().to(device=device, dtype=dtype)
    size, batch = 16, 4
    images = torch.randn(batch, 3, size, size, generator=generator)
    maps = torch.rand(batch, 4, size, size, generator=generator)
    classes = torch.stack(
        [torch.randperm(NUM_CLASSES, generator=generator)[:4] for _ in range(batch)]
    )
    mask = torch.zeros(batch, size, size, dtype=torch.bool)
    mask[:, 4:12, 3:11] = True
    part = torch.zeros_like(mask)
    part[:, 5:8, 4:7] = True
    boxes = torch.tensor([[3.0, 4.0, 11.0, 12.0]]).expand(batch, 1, 4).clone()
    on = {"device": device}
    images, maps = images.to(dtype=dtype, **on), maps.to(dtype=dtype, **on)
    with torch.no_grad():
        logits = model(images)
    annotations = {
        "index": torch.arange(batch), "label": classes[:, 0], "mask": mask, "part_mask": part,
        "boxes": boxes.to(dtype), "grid_labels": classes,
    }  # fmt: skip
    return {
        "model": model, "images": images, "maps": maps, "classes": classes.to(device),
        "logits": logits, "batch": {k: v.to(device) for k, v in annotations.items()},
    }  # fmt: skip


def _input_x_gradient(
    model: torch.nn.Module, images: torch.Tensor, classes: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """Input × gradient maps ``[N, K, H, W]`` of ``classes`` ``[N, K]``: the explain function
    a robustness metric re-runs on its noisy copies (MetricInputs.explain)."""
    with torch.enable_grad():
        images = images.detach().requires_grad_(True)
        scores = model(images).gather(1, classes)
        columns = [
            torch.autograd.grad(scores[:, k].sum(), images, retain_graph=True)[0]
            for k in range(classes.shape[1])
        ]
    return torch.stack([(g * images).sum(dim=1) for g in columns], dim=1).detach()


def evaluation_metric_outputs(name: str, device: str, dtype: torch.dtype) -> dict:
    """Values and curves of the registered metric ``name``, fed as evaluate.py feeds it
    (``update(**update_arguments(inputs))``), its state kept in ``dtype``."""
    from contrastive_saliency.metrics.registry import MetricInputs, create_metric

    inputs = metric_batch(device, dtype)
    metric = create_metric(name, batch_size=7).to(device)
    metric.set_dtype(dtype)
    columns = {"pair": 2, "random_pair": 2, "single": 1, "grid": 4}[metric.target_kind]
    metric_inputs = MetricInputs(
        model=inputs["model"], images=inputs["images"], maps=inputs["maps"][:, :columns],
        classes=inputs["classes"][:, :columns], logits=inputs["logits"], batch=inputs["batch"],
        explain=partial(_input_x_gradient, inputs["model"]) if metric.needs_explainer else None,
    )  # fmt: skip
    metric.update(**metric.update_arguments(metric_inputs))
    _, values = metric.labelled_values(name, sync=False)
    curves = {curve.kind: metric.per_sample_curves()[1] for curve in metric.curves}
    return {
        **{f"value {k}": v for k, v in values.items()},
        **{f"curve {k}": v for k, v in curves.items()},
    }


def analysis_metric_outputs(family: str, device: str, dtype: torch.dtype) -> dict:
    """The metrics outside the evaluation loop: the sanity check's map similarities, PIC and
    channel activity."""
    inputs = metric_batch(device, dtype)
    maps = inputs["maps"]
    if family == "map_similarity":
        return {
            "spearman": M.spearman_similarity(maps[:, 0], maps[:, 1], absolute=True),
            "ssim": M.ssim_similarity(maps[:, 0], maps[:, 1]),
            "hog": M.hog_similarity(maps[:, 0], maps[:, 1], pixels_per_cell=(4, 4)),
        }
    if family == "pic":
        result = M.pic_curves(
            inputs["model"], inputs["images"], maps[:, 0], inputs["classes"][:, 0],
            mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), batch_size=7,
            indices=inputs["batch"]["index"],
        )  # fmt: skip
        return {
            "information": result.information,
            "scores": result.scores,
            "sic": result.sic_points,
        }
    if family == "channel_activity":
        activations = inputs["model"].features(inputs["images"])
        return {"active_channels": M.channel_activity(activations, tau=0.05)}
    raise ValueError(family)


def _evaluation_metric_names() -> list[str]:
    from contrastive_saliency.metrics.registry import list_metrics

    return list_metrics()


METRIC_FAMILIES = [*_evaluation_metric_names(), "map_similarity", "pic", "channel_activity"]


@pytest.mark.parametrize("family", METRIC_FAMILIES)
@pytest.mark.parametrize("device", DEVICES)
def test_metric_family_matches_float64_reference(device, family):
    """Every metric of evaluate.py (its registered class) and the analysis metrics on
    ``device`` in float32 equal a float64 CPU reference within 1e-5 + 1e-4·|value|, and return
    their values on ``device``. PIC rounds images to 8-bit pixels before WebP, so float64
    images may round differently: its reference is the float32 CPU run (on the CPU that
    leaves the device, dtype and finiteness checks)."""
    compute = (
        analysis_metric_outputs if family in METRIC_FAMILIES[-3:] else evaluation_metric_outputs
    )
    outputs = compute(family, device, torch.float32)
    reference = compute(family, "cpu", torch.float32 if family == "pic" else torch.float64)
    assert outputs.keys() == reference.keys()
    for key, value in outputs.items():
        assert value.device.type == device, f"{family} {key} comes back on {value.device}"
        if value.is_floating_point():
            assert torch.isfinite(value).all(), f"{family} {key}"
        torch.testing.assert_close(
            value.cpu().double(), reference[key].cpu().double(), rtol=1e-4, atol=1e-5,
            msg=lambda text, key=key: f"{family} {key} on {device}: {text}",
        )  # fmt: skip


# ------------------------------------------------------------------------------ autocast
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
AUTOCAST_DTYPES = [
    pytest.param(torch.float16, id="float16"),
    pytest.param(torch.bfloat16, id="bfloat16"),
]
# Methods whose maps are continuous functions of the network's activations and gradients at
# one layer (or of the model's scores): rounding moves them by a bounded multiple of u.
CONTINUOUS = {*METHOD_FAMILIES["gradient_cams"], *METHOD_FAMILIES["vit"], "score_cam",
              "ablation_cam", "finer_score_cam", "rise"} - {"transformer_attribution"}  # fmt: skip
# Methods with hard decisions that rounding can flip (the ReLU derivative of every unit on an
# input-gradient path, guided backprop's and LRP's rules — also T-LRP's sign splits and its
# divisions by signed pre-activations —, VAR's q_c > 1/K threshold, ClusCAM's k-means
# assignment and bottom-r % discard, FullGrad's ReLU derivatives): a flipped decision moves a
# value by O(1), so no multiple of u bounds them; their bound only catches gross errors
# (T-LRP, CPU: median 81u float16, 47u bfloat16). Occlusion joins them for another reason: its
# map is a difference of two nearly equal scores, S_c(x) − S_c(occluded x), whose cancellation
# no fixed κ bounds; so does Simple Deletion (CAAP App. B.2), the same difference.
DECISIONS = {*METHOD_FAMILIES["input_gradients"], *METHOD_FAMILIES["occlusion"], "lrp",
             "transformer_attribution", "var", "cluscam", "full_grad",
             "simple_deletion"}  # fmt: skip
MAP_TOLERANCE_U = {"continuous": 64, "decisions": 256}


class AutocastNet(nn.Module):
    """Three conv layers with BatchNorm, GAP and a linear head: depth L = 4 layers."""

    default_saliency_layer = "features.7"

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(32, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def _autocast_setup(device: str, dtype: torch.dtype, name: str = "grad_cam"):
    if device == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    generator = torch.Generator().manual_seed(1)
    if name in METHOD_FAMILIES["vit"]:
        model = tiny_vit()
    else:
        torch.manual_seed(0)
        model = AutocastNet().eval()
    images = torch.randn(4, 3, 32, 32, generator=generator).to(device)
    classes = torch.stack([torch.randperm(NUM_CLASSES, generator=generator)[:2] for _ in range(4)])
    return model.to(device), images, classes.to(device)


def relative_rms_error(maps: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """‖E − E_ref‖₂ / ‖E_ref‖₂ per map ``[B, K]`` (0 where both are zero)."""
    error = (maps - reference).flatten(2).norm(dim=-1)
    return error / reference.flatten(2).norm(dim=-1).clamp_min(1e-30)


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("device", SLOW_DEVICES)
def test_autocast_maps_stay_within_tolerance(device, dtype):
    """Maps under ``torch.autocast(dtype)`` vs float32, every method: finite float32 maps
    whose relative RMS error, median over the batch's maps, is ≤ 64·u for continuous methods
    and ≤ 256·u for methods with hard decisions (u = 2⁻¹¹ for float16, 2⁻⁸ for bfloat16).

    Where 64·u comes from: autocast rounds the inputs and the output of each low-precision
    op (convolutions, matrix products) to relative error ≤ u and accumulates in float32. A
    map at depth L passes about 4L such roundings through the forward and the backward
    pass (L = 4 here: n ≈ 16); independent rounding errors add like √n·u = 4u. The map is
    then a sum of channel terms of both signs, whose cancellation multiplies the relative
    error by its condition number κ = Σ|w_k A_k| / |Σ w_k A_k| (random-init weights cancel
    strongly: κ up to ≈ 8 here), and a factor 2 of margin: 2·κ·√n·u = 64u (float16: 3.1 %,
    bfloat16: 25 %). Measured with CPU autocast on this network and batch: continuous methods
    ≤ 21u (XGrad-CAM, bfloat16; the others ≤ 6u), decision methods ≤ 43u (Input×Gradient,
    float16) before issue 19's methods; occlusion 78u (bfloat16), GradientSHAP 61u (float16),
    DeepLIFT ≤ 8u, FullGrad ≤ 5u. CUDA kernels round the same values, so their errors should be alike. The decision bound 256u
    (float16: 12.5 %; bfloat16: the whole map, i.e. only NaN/inf/dtype errors) is a detector
    of gross errors, not a precision claim; their effect on results is what the metric test
    below bounds.
    """
    failures = []
    for name in sorted(CONTINUOUS | DECISIONS):
        model, images, classes = _autocast_setup(device, dtype, name)
        method = create_method(name, model, **method_kwargs(name))
        fields = method_fields(method, images)
        reference = method(images, classes, **fields)
        with torch.autocast(device, dtype=dtype):
            maps = method(images, classes, **fields)
        assert maps.dtype == torch.float32 and torch.isfinite(maps).all(), name
        error = relative_rms_error(maps, reference).median() / UNIT_ROUNDOFF[dtype]
        kind = "continuous" if name in CONTINUOUS else "decisions"
        if not error <= MAP_TOLERANCE_U[kind]:
            failures.append(f"{name}: {float(error):.1f}u > {MAP_TOLERANCE_U[kind]}u")
    assert not failures, failures


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("device", SLOW_DEVICES)
def test_autocast_metric_values_stay_within_tolerance(device, dtype):
    """Metric values under autocast (as ``evaluate.py --evaluation.autocast true`` computes
    them) vs float32, per sample, within bounds that follow from the metric's formula:

    - model-querying metrics, on the same float32 maps, so only the metric's own forwards
      run in low precision. A softmax probability moves by at most ½·max_j|Δz_j| when the
      logits move by Δz (Σ_j |∂p_c/∂z_j| = 2p_c(1 − p_c) ≤ ½). δz = the largest logit error
      of autocast on the clean, the all-zero and the blurred images (the two ends of every
      deletion/insertion path), doubled for the images in between. Deletion/insertion AUC
      (means of probabilities): ½·2δz; confidence drop (difference of two): 2δz; average
      drop 100·(Y − O)/Y: 100·2δz/Y; average gain 100·(O − Y)/(1 − Y): 100·2δz/(1 − Y).
    - the energy pointing game of the autocast maps: the share of positive mass inside the
      mask moves by at most 2‖ΔE⁺‖₁ / ΣE⁺ when the map moves by ΔE: the metric computed under
      autocast must equal that of its maps within that bound (a float16 sum over a
      224×224 map would overflow; autocast runs sums in float32).
    """
    model, images, classes = _autocast_setup(device, dtype)
    classes = classes[:, 0]
    maps = create_method("grad_cam", model)(images, classes)[:, 0]
    from torchvision.transforms.functional import gaussian_blur  # insertion's start image

    probes = torch.cat(
        [images, torch.zeros_like(images), gaussian_blur(images, [11, 11], [5.0, 5.0])]
    )
    with torch.no_grad():
        reference_logits = model(probes)
        with torch.autocast(device, dtype=dtype):
            low_logits = model(probes).float()
    delta_z = 2 * (low_logits - reference_logits).abs().max()

    indices = torch.arange(len(images), device=images.device)  # seeds the tie-breaking orders

    def model_metrics() -> dict[str, torch.Tensor]:
        terms = M.drop_increase_gain(model, images, maps, classes, batch_size=7)
        return {
            "deletion_auc": M.deletion_auc(model, images, maps, classes, pixels_per_step=32, batch_size=7, indices=indices),
            "insertion_auc": M.insertion_auc(model, images, maps, classes, pixels_per_step=32, batch_size=7, indices=indices),
            "confidence_drop": M.confidence_drop(model, images, maps, classes, batch_size=7, indices=indices),
            "average_drop": terms["average_drop"],
            "average_gain": terms["average_gain"],
        }  # fmt: skip

    reference = model_metrics()
    with torch.autocast(device, dtype=dtype):
        low = model_metrics()
    with torch.no_grad():
        score = reference_logits[: len(images)].softmax(1).gather(1, classes[:, None])[:, 0]
    bounds = {
        "deletion_auc": delta_z / 2,
        "insertion_auc": delta_z / 2,
        "confidence_drop": delta_z,
        "average_drop": 100 * delta_z / score,
        "average_gain": 100 * delta_z / (1 - score),
    }
    for key, bound in bounds.items():
        difference = (low[key].float() - reference[key].float()).abs()
        assert (difference <= bound + 1e-6).all(), f"{key}: {difference.tolist()} > {bound}"

    mask = torch.zeros_like(maps, dtype=torch.bool)
    mask[:, 8:24, 6:20] = True
    with torch.autocast(device, dtype=dtype):
        low_maps = create_method("grad_cam", model)(images, classes)[:, 0]
        low_energy = M.energy_pointing_game(low_maps, mask)
    energy = M.energy_pointing_game(maps, mask)
    positive, low_positive = maps.clamp_min(0), low_maps.clamp_min(0)
    bound = 2 * (low_positive - positive).abs().flatten(1).sum(1) / low_positive.flatten(1).sum(1)
    difference = (low_energy.float() - energy).abs()
    assert (difference <= bound + 1e-6).all(), f"energy: {difference.tolist()} > {bound.tolist()}"


# ------------------------------------------------------------------- deterministic training
@pytest.mark.parametrize("device", SLOW_DEVICES)
def test_deterministic_training_reproduces_bit_for_bit(device, tmp_path):
    """Two ``train.py`` runs with ``--trainer.deterministic true`` and the same seed give
    identical weights and identical logged metrics, bit for bit.

    Lightning's ``deterministic=True`` calls ``torch.use_deterministic_algorithms(True)``
    (deterministic cuDNN convolution algorithms, cuDNN benchmarking off, deterministic
    scatter/index kernels) and needs a fixed cuBLAS workspace, CUBLAS_WORKSPACE_CONFIG=:4096:8
    (set at the top of this file, before CUDA starts). An op without a deterministic CUDA
    kernel (e.g. the backward of ``F.interpolate(mode="bilinear")``, AdaptiveAvgPool2d to a
    size other than 1, ``NLLLoss`` over 2-d targets) makes the run stop with a RuntimeError
    naming it — never silently irreproducible. ``--trainer.deterministic warn`` then runs
    with a warning instead, and results may differ between runs in the last bits.
    """
    import pandas as pd

    import train
    from tests.conftest import tiny_train_args

    accelerator = ["--trainer.accelerator", "gpu" if device == "cuda" else "cpu"]
    extra = [*accelerator, "--trainer.deterministic", "true", "--data.num_workers", "0"]
    saved = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    try:
        for run in ("first", "second"):
            train.main(tiny_train_args(tmp_path, run, 7, *extra))
    finally:  # Lightning leaves the global flags set: do not leak them into other tests
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.benchmark = saved[1]
    weights = [
        torch.load(tmp_path / run / "checkpoints" / "last.ckpt", map_location="cpu",
                   weights_only=False)["state_dict"]
        for run in ("first", "second")
    ]  # fmt: skip
    assert weights[0].keys() == weights[1].keys()
    different = [k for k in weights[0] if not torch.equal(weights[0][k], weights[1][k])]
    assert not different, f"weights differ between identical deterministic runs: {different}"
    metrics = [pd.read_csv(tmp_path / run / "metrics.csv") for run in ("first", "second")]
    pd.testing.assert_frame_equal(*metrics, check_exact=True)
